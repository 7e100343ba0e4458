"""setuptools needs this file only to name the cffi module; the rest of the
metadata lives in pyproject.toml."""
from setuptools import setup

setup(cffi_modules=["build_ffi.py:ffibuilder"])
