"""cffi builder for fastlive's compiled core (API mode, out of line).

The C API is declared once, in ``csrc/fl_*.h``: cffi's cdef reads those
files and the C sources ``#include`` them, so the compiler checks that both
agree.  ``fl_core.h`` comes first (other headers use its types); the rest
follow in name order.  Every ``csrc/*.c`` is compiled into the module.

Run directly (``python build_ffi.py``) to build the module in place.
"""
from __future__ import annotations

import os
import pathlib
import re

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
CSRC = HERE / "csrc"
MODULE = "fastlive._native"


def _version() -> str:
    text = (HERE / "fastlive" / "_version.py").read_text()
    match = re.search(r'__version__\s*=\s*"([^"]+)"', text)
    if not match:
        raise RuntimeError("fastlive/_version.py has no __version__")
    return match.group(1)


def api_headers() -> list[pathlib.Path]:
    """The cdef-clean API headers, in declaration order."""
    rest = sorted(p for p in CSRC.glob("fl_*.h")
                  if p.name not in ("fl_core.h", "fl_prelude.h"))
    return [CSRC / "fl_core.h", *rest]


def c_sources(absolute: bool = False) -> list[str]:
    """The C files; relative to the project for setuptools (which refuses
    absolute paths in wheels), absolute for a build run from elsewhere."""
    files = sorted(CSRC.glob("*.c"))
    return [str(p if absolute else p.relative_to(HERE)) for p in files]


def _strip_comments(text: str) -> str:
    # pycparser reads the cdef; C comments are fine for it, but keep the
    # cdef small and the line numbers in its errors honest.
    return re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group(0).count("\n"),
                  text, flags=re.S)


def make_ffi(absolute: bool = False) -> FFI:
    ffi = FFI()
    headers = api_headers()
    ffi.cdef("\n".join(_strip_comments(h.read_text()) for h in headers))
    includes = "\n".join(f'#include "{h.name}"' for h in headers)
    cflags = ["-std=gnu11", "-Wall", "-Wextra", "-O2"]
    extra = os.environ.get("FASTLIVE_CFLAGS")
    if extra:
        cflags += extra.split()
    ffi.set_source(
        MODULE,
        '#include "fl_prelude.h"\n' + includes,
        sources=c_sources(absolute),
        include_dirs=[str(CSRC if absolute else CSRC.relative_to(HERE))],
        define_macros=[("_GNU_SOURCE", "1"),
                       ("FL_VERSION", f'"{_version()}"')],
        extra_compile_args=cflags,
        extra_link_args=((extra.split() if extra and "-fsanitize" in extra else [])
                         + os.environ.get("FASTLIVE_LDFLAGS", "").split()),
        py_limited_api=True,
    )
    return ffi


ffibuilder = make_ffi()

if __name__ == "__main__":
    import shutil

    os.chdir(HERE)
    built = make_ffi(absolute=True).compile(tmpdir=str(HERE / "build" / "ffi"), verbose=False)
    target = HERE / "fastlive" / pathlib.Path(built).name
    shutil.copy2(built, target)
    print(target)
