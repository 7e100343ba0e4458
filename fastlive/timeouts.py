"""Method 5: SO_RCVTIMEO / SO_SNDTIMEO.

With SO_RCVTIMEO set, a blocking read that waits longer than the timeout
fails with EAGAIN.  That says only that nothing arrived in time: a peer that
is alive but quiet looks exactly like one that is gone, so this method
needs traffic it can count on (the article's echo loop, or a heartbeat).
SO_SNDTIMEO bounds a write blocked on a full send buffer the same way.
"""
from __future__ import annotations

from typing import Optional, Tuple

from ._lib import SocketLike, check_rc, fd_of, ffi, lib, timeout_ms
from .verdict import Verdict, new_c_verdict

__all__ = ["set_timeouts", "get_timeouts", "check_rcvtimeo"]


def _us(name: str, value: Optional[float]) -> int:
    if value is None:
        return -1
    if not value >= 0 or value > 2**31:
        raise ValueError(f"{name} must be >= 0 seconds, got {value!r}")
    return int(round(value * 1_000_000))


def set_timeouts(sock: SocketLike, recv: Optional[float] = None,
                 send: Optional[float] = None) -> None:
    """Set SO_RCVTIMEO / SO_SNDTIMEO in seconds (0 = wait forever, None =
    leave as is).  OSError for a non-socket."""
    check_rc(lib.fl_set_timeouts(fd_of(sock), _us("recv", recv), _us("send", send)))


def get_timeouts(sock: SocketLike) -> Tuple[float, float]:
    """(SO_RCVTIMEO, SO_SNDTIMEO) in seconds; 0 means none."""
    rcv = ffi.new("int64_t *")
    snd = ffi.new("int64_t *")
    check_rc(lib.fl_get_timeouts(fd_of(sock), rcv, snd))
    return rcv[0] / 1e6, snd[0] / 1e6


def check_rcvtimeo(sock: SocketLike, timeout: Optional[float] = None) -> Verdict:
    """Wait for data as a read with SO_RCVTIMEO would, without taking any:
    TIMED_OUT (errno EAGAIN) when nothing arrived within the socket's
    SO_RCVTIMEO (or ``timeout`` seconds when given).  A socket with neither
    is INVALID (EINVAL) rather than a check that could block forever."""
    v = new_c_verdict()
    ms = -1 if timeout is None else timeout_ms(timeout)
    lib.fl_check_rcvtimeo(fd_of(sock), ms, v)
    return Verdict._from_c(v)
