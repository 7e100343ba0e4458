"""The package version (the compiled core is built for the same one)."""
__version__ = "0.1.0"
