"""Loads the compiled core and holds the few helpers every module shares."""
from __future__ import annotations

import errno
import math
import os
import time
from typing import Callable, Protocol, Union

from ._version import __version__

__all__ = ["HasFileno", "SocketLike", "fd_of", "check_rc", "MAX_SECONDS", "seconds", "to_units", "count",
           "timeout_ms", "interruptible", "forked_error", "EINTR_RC", "FORKED_RC"]

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
    """Anything with a ``fileno()``: a socket, a file, a transport's socket."""

    def fileno(self) -> int:
        """The file descriptor number (-1 once closed)."""


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
    if fd > 0x7FFFFFFF or fd < -0x80000000:
        return -1               # no such fd: an INVALID/EBADF verdict, not OverflowError
    return fd


#: What the C core returns when a signal interrupted a wait (-EINTR), and
#: when an object is used in a forked child of the process that made it.
EINTR_RC = -errno.EINTR
FORKED_RC = -lib.FL_E_FORKED


def forked_error(what: str, pid: int) -> RuntimeError:
    """The error for an engine used in a forked child."""
    return RuntimeError(f"{what} was created in process {pid}; a forked child must "
                        f"create its own (this is process {os.getpid()})")


def check_rc(rc: int) -> int:
    """Raise ``OSError`` for a ``-errno`` return of the C core."""
    if rc < 0:
        if rc == FORKED_RC:
            raise RuntimeError("used in a forked child: create a new object there")
        raise OSError(-rc, os.strerror(-rc))
    return rc


def interruptible(call: Callable[[int], int], ms: int) -> int:
    """PEP 475 for the C core's waits: ``call(ms)`` returns -EINTR as soon
    as a signal interrupts its wait.  The signal's Python handler runs right
    after that call returns (CPython runs pending handlers at the next
    bytecode boundary); if it raises, the exception propagates from here;
    if it returns, ``call`` is made again with the time left."""
    if ms == 0:
        rc = call(0)
        while rc == EINTR_RC:
            rc = call(0)
        return rc
    deadline = time.monotonic() + ms / 1000.0
    rc = call(ms)
    while rc == EINTR_RC:
        left = deadline - time.monotonic()
        rc = call(min(ms, math.ceil(left * 1000.0)) if left > 0 else 0)
    return rc


#: The longest wait any fastlive call accepts, in seconds (2**31 - 1 ms,
#: about 24.8 days: what poll(2) and epoll_wait(2) take).  Longer values are
#: refused with ValueError rather than silently capped.
MAX_SECONDS = 0x7FFFFFFF / 1000.0


def seconds(name: str, value: object, *, positive: bool = False,
            maximum: float = MAX_SECONDS) -> float:
    """The one validator for durations: ``value`` (int or float seconds, not
    bool) must be finite, ``>= 0`` (``> 0`` with ``positive``) and
    ``<= maximum``.  TypeError / ValueError name the parameter."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    v = float(value)
    if v != v:
        raise ValueError(f"{name} must be a number of seconds, got nan")
    if positive and not v > 0:
        raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
    if v < 0:
        raise ValueError(f"{name} must be >= 0 seconds, got {value!r}")
    if v > maximum:
        raise ValueError(f"{name} must be <= {maximum:g} seconds, got {value!r}")
    return v


def to_units(name: str, value: object, unit: float, *, positive: bool = False,
             maximum: float = MAX_SECONDS) -> int:
    """:func:`seconds`, converted to whole units of ``unit`` seconds (1e-3 for ms, 1e-6
    for us), rounded *up*: a tiny positive duration becomes one unit, never
    0 (which the kernel reads as "no timeout")."""
    v = seconds(name, value, positive=positive, maximum=maximum)
    n = int(-(-v // unit))          # ceil without float round-off past 2**53
    if n * unit < v:
        n += 1
    if v > 0 and n == 0:
        n = 1
    return n


def count(name: str, value: object, lo: int, hi: int) -> int:
    """The one validator for counts: an int (not bool) in ``lo..hi``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in {lo}..{hi}, got {value!r}")
    return value


def timeout_ms(timeout: object, name: str = "timeout") -> int:
    """A timeout in seconds as the milliseconds poll()/epoll_wait() take,
    rounded up (see :func:`to_units`).  None is refused: every wait in
    fastlive is bounded in time."""
    if timeout is None:
        raise ValueError(f"{name}: a timeout in seconds is required (checks never block forever)")
    return to_units(name, timeout, 1e-3)
