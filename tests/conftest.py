"""Register fastlive's pytest plugin when running from a source tree that
was built in place but not installed (an install registers it through the
``pytest11`` entry point)."""
import fastlive.testing


def pytest_configure(config):
    pm = config.pluginmanager
    if not pm.is_registered(fastlive.testing):
        pm.register(fastlive.testing, "fastlive")
