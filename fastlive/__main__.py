"""``python -m fastlive``: the ``fastlive`` command."""
import sys

from .tools.cli import main

sys.exit(main())
