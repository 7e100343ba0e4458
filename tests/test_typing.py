"""The package type-checks under mypy --strict (it ships py.typed)."""
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_py_typed_is_shipped():
    import fastlive
    pkg = pathlib.Path(fastlive.__path__[0])      # the installed package
    assert (pkg / "py.typed").exists()
    assert (pkg / "_native.pyi").exists()


def test_mypy_strict(tmp_path):
    pytest.importorskip("mypy", reason="mypy is not installed (pip install -e '.[test]')")
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path),
         "-p", "fastlive"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
