"""Loads the compiled core and holds the few helpers every module shares."""
from __future__ import annotations

import os
from typing import Protocol, Union

from ._version import __version__

try:
    from ._native import ffi as ffi, lib as lib
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "fastlive's compiled core (fastlive._native) is missing: install the "
        "package with 'pip install .' or build it in place with "
        "'python build_ffi.py'") from exc

_built = ffi.string(lib.fl_version()).decode()
if _built != __version__:  # pragma: no cover - stale build
    raise ImportError(
        f"fastlive._native was built for version {_built}, the Python code is "
        f"{__version__}: rebuild it (pip install . or python build_ffi.py)")


class HasFileno(Protocol):
    def fileno(self) -> int: ...


#: Anything the checks accept: a socket-like object or a file descriptor.
SocketLike = Union[int, HasFileno]


def fd_of(sock: SocketLike) -> int:
    """The file descriptor behind ``sock``.

    A closed Python socket reports -1; that, like any negative number, is
    passed through so the C side can return an INVALID verdict (EBADF)
    instead of an exception.  Anything that is neither an int nor has
    ``fileno()`` is a TypeError.
    """
    if isinstance(sock, bool):
        raise TypeError("expected a socket or a file descriptor, got bool")
    if isinstance(sock, int):
        fd = sock
    else:
        fileno = getattr(sock, "fileno", None)
        if fileno is None:
            raise TypeError(
                f"expected a socket or a file descriptor, got {type(sock).__name__}")
        try:
            fd = fileno()
        except (OSError, ValueError):  # e.g. a closed file object
            return -1
        if not isinstance(fd, int) or isinstance(fd, bool):
            raise TypeError("fileno() did not return an int")
    if fd > 0x7FFFFFFF:
        return -1
    return fd


def check_rc(rc: int) -> int:
    """Raise ``OSError`` for a ``-errno`` return of the C core."""
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))
    return rc


def timeout_ms(timeout: float | None) -> int:
    """Seconds (float) to the milliseconds poll() takes; None is refused:
    every check in fastlive is bounded in time."""
    if timeout is None:
        raise ValueError("a timeout in seconds is required (checks never block forever)")
    if timeout != timeout or timeout < 0:
        raise ValueError(f"timeout must be >= 0 seconds, got {timeout!r}")
    ms = int(timeout * 1000 + 0.999999)
    return min(ms, 0x7FFFFFFF)
