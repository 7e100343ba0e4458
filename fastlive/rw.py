"""Method 1: what reads and writes tell.

The kernel reports a peer's FIN as a read of 0 bytes and its RST as
ECONNRESET on the next read or write (EPIPE on writes after that).  A write
to a connection whose peer is gone raises SIGPIPE, which kills a process
that does not handle it; :func:`send` uses MSG_NOSIGNAL so it never does.

Contrary to the article, recv() never returns EPIPE: EPIPE is a write
error.  And a successful write proves nothing: the bytes are only queued
in the local kernel.

Checks here never consume application bytes: the read probe uses
``recv(MSG_PEEK | MSG_DONTWAIT)``.  A pending socket error is reported by
the kernel once - whichever check reads it (peek, SO_ERROR) takes it, and
later reads see end-of-file.
"""
from __future__ import annotations

from typing import NamedTuple, Union

from ._lib import SocketLike, count, fd_of, ffi, lib
from .verdict import Verdict, new_c_verdict

__all__ = ["check_peek", "check_so_error", "SendResult", "send"]


def check_peek(sock: SocketLike) -> Verdict:
    """Peek one byte without waiting: 0 bytes means the peer's FIN arrived
    (PEER_CLOSED); ECONNRESET is RESET; EAGAIN or pending data is ALIVE
    (``DATA_PENDING`` flag when bytes are queued).  A FIN queued behind
    unread data is not visible to this probe (poll's POLLRDHUP sees it)."""
    v = new_c_verdict()
    lib.fl_check_peek(fd_of(sock), v)
    return Verdict._from_c(v)


def check_so_error(sock: SocketLike) -> Verdict:
    """Read (and so clear) the socket's pending error: ETIMEDOUT after a
    keepalive or TCP_USER_TIMEOUT expiry, ECONNRESET, EHOSTUNREACH..."""
    v = new_c_verdict()
    lib.fl_check_so_error(fd_of(sock), v)
    return Verdict._from_c(v)


class SendResult(NamedTuple):
    """What :func:`send` did: bytes the kernel queued, and the verdict."""

    sent: int          #: bytes queued (0 on error)
    verdict: Verdict   #: RESET for EPIPE/ECONNRESET, TIMED_OUT for ETIMEDOUT...


def send(sock: SocketLike, data: Union[bytes, bytearray, memoryview], flags: int = 0) -> SendResult:
    """``send(MSG_NOSIGNAL | flags)``: never raises SIGPIPE, never raises
    for a dead peer; the verdict classifies the error instead.  EAGAIN on a
    full non-blocking socket is ALIVE with 0 bytes sent.  The socket is
    examined only when the write fails (so a failed send on a listening,
    never-connected or non-TCP socket is INVALID, not RESET); a successful
    write costs nothing extra and is ALIVE, whatever the socket is.  A
    write refused after our own ``shutdown(SHUT_WR)`` is CLOSED with
    ``LOCAL_SHUTDOWN`` (EPIPE), not RESET: the state (FIN_WAIT1/2) shows the
    peer did nothing.  ``data`` must be bytes-like (TypeError otherwise)."""
    fd = fd_of(sock)
    if isinstance(data, str) or not isinstance(data, (bytes, bytearray, memoryview)):
        try:
            data = memoryview(data).cast("B")   # any other bytes-like object
        except TypeError:
            raise TypeError(f"data must be a bytes-like object, got {type(data).__name__}") from None
    elif isinstance(data, memoryview) and (data.itemsize != 1 or data.ndim != 1):
        data = data.cast("B")
    flags = count("flags", flags, 0, 0x7FFFFFFF)
    v = new_c_verdict()
    buf = ffi.from_buffer(data)
    n = lib.fl_send(fd, buf, len(buf), flags, v)
    return SendResult(max(n, 0), Verdict._from_c(v))
