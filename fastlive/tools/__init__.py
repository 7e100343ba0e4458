"""fastlive's tools: the ``fastlive`` command (:mod:`.cli`), the failure x
method demo (:mod:`.demo`), the article's programs (:mod:`.article`) and
the namespace sweeper (:mod:`.netns`).  Nothing in the library imports
this package."""

__all__ = []
