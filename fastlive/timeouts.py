"""Method 5: SO_RCVTIMEO / SO_SNDTIMEO.

With SO_RCVTIMEO set, a blocking read that waits longer than the timeout
fails with EAGAIN.  That says only that nothing arrived in time: a peer that
is alive but quiet looks exactly like one that is gone, so this method
needs traffic it can count on (the article's echo loop, or a heartbeat).
SO_SNDTIMEO bounds a write blocked on a full send buffer the same way.
"""
from __future__ import annotations

from typing import Optional, Tuple

from ._lib import SocketLike, check_rc, fd_of, ffi, interruptible, lib, timeout_ms, to_units
from .verdict import Verdict, new_c_verdict

__all__ = ["set_timeouts", "get_timeouts", "check_rcvtimeo"]


def _us(name: str, value: Optional[float]) -> int:
    """Seconds to whole microseconds, rounded up (1e-7 is 1 us, never 0,
    which the kernel reads as "no timeout"); None leaves the option."""
    if value is None:
        return -1
    return to_units(name, value, 1e-6)


def set_timeouts(sock: SocketLike, recv: Optional[float] = None,
                 send: Optional[float] = None) -> None:
    """Set SO_RCVTIMEO / SO_SNDTIMEO in seconds (0 = wait forever, None =
    leave as is).  The kernel keeps microseconds: a value is rounded *up*
    to the next microsecond, so a tiny positive timeout stays a timeout.
    At most :data:`~fastlive._lib.MAX_SECONDS` (24.8 days, the longest wait
    poll() takes and so :func:`check_rcvtimeo` can honour); longer values
    are refused with ValueError.  OSError for a non-socket."""
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
    is INVALID (EINVAL) rather than a check that could block forever; so is
    one whose SO_RCVTIMEO (set outside fastlive) exceeds 24.8 days, the
    longest wait poll() takes.  Signals as for
    :func:`~fastlive.check_poll`: the handler runs at once, the wait goes on
    for the time left."""
    fd, v = fd_of(sock), new_c_verdict()
    if timeout is None:
        ms = lib.fl_rcvtimeo_ms(fd) if fd >= 0 else -1
        if ms < 0:
            lib.fl_check_rcvtimeo(fd, -1, v)     # INVALID, with the reason
            return Verdict._from_c(v)
    else:
        ms = timeout_ms(timeout)
    interruptible(lambda t: lib.fl_check_rcvtimeo(fd, t, v), ms)
    return Verdict._from_c(v)
