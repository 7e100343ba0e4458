"""The C core compiles without a warning under -Wall -Wextra (and a few
more), as C11 with GNU extensions, exactly as the build compiles it."""
import pathlib
import shutil
import subprocess
import sysconfig

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.c")))
def test_no_warnings(source):
    cmd = ["gcc", "-std=gnu11", "-fsyntax-only", "-O2", "-Wall", "-Wextra",
           "-Wshadow", "-Wformat=2", "-Wstrict-prototypes", "-Werror",
           "-D_GNU_SOURCE=1", "-DFL_VERSION=\"test\"", f"-I{CSRC}",
           f"-I{sysconfig.get_paths()['include']}", str(CSRC / source)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_headers_are_cdef_clean():
    """The fl_*.h API headers are read by cffi's cdef: no #include, no #if,
    no macros (constants are enums)."""
    for h in CSRC.glob("fl_*.h"):
        if h.name == "fl_prelude.h":
            continue
        for n, line in enumerate(h.read_text().splitlines(), 1):
            assert not line.lstrip().startswith("#"), f"{h.name}:{n}: {line}"


def test_exported_symbols_are_prefixed():
    import fastlive._native as native
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("binutils' nm is not installed")
    out = subprocess.run([nm, "-D", "--defined-only", native.__file__],
                         capture_output=True, text=True, timeout=60).stdout
    names = [line.split()[-1] for line in out.splitlines() if " T " in line]
    ours = [n for n in names if not n.startswith(("PyInit_", "_init", "_fini"))]
    assert ours and all(n.startswith("fl_") for n in ours), ours
