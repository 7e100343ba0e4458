"""Method 2: readiness (select, and poll with POLLRDHUP).

The kernel marks a socket readable when data, a FIN or an error arrives;
the article then calls read() and takes 0 as "peer closed".  fastlive peeks
instead of reading, so the application's bytes stay in the queue.

select() cannot name a descriptor >= FD_SETSIZE (1024): FD_SET on one
writes past the fd_set and corrupts memory.  :func:`check_select` checks
such descriptors with poll() instead and sets the ``SELECT_FALLBACK`` flag.

poll() with POLLRDHUP tells more, without a read: POLLRDHUP alone means the
peer shut its sending side (it may still read: ``WRITE_OPEN`` is set),
POLLHUP that both directions are shut, POLLERR that an error is pending.
"""
from __future__ import annotations

from ._lib import SocketLike, fd_of, interruptible, lib, timeout_ms
from .verdict import Verdict, new_c_verdict

__all__ = ["FD_SETSIZE", "check_select", "check_poll"]

#: select()'s limit on descriptor numbers.
FD_SETSIZE = 1024


def check_select(sock: SocketLike, timeout: float = 0.0) -> Verdict:
    """Wait up to ``timeout`` seconds for readability, then peek.  A signal
    during the wait runs its handler at once (PEP 475): the wait goes on
    for the time left if the handler returns, and its exception propagates
    if it raises."""
    fd, ms, v = fd_of(sock), timeout_ms(timeout), new_c_verdict()
    interruptible(lambda t: lib.fl_check_select(fd, t, v), ms)
    return Verdict._from_c(v)


def check_poll(sock: SocketLike, timeout: float = 0.0) -> Verdict:
    """Wait up to ``timeout`` seconds for POLLIN/POLLRDHUP/POLLHUP/POLLERR;
    signals as for :func:`check_select`."""
    fd, ms, v = fd_of(sock), timeout_ms(timeout), new_c_verdict()
    interruptible(lambda t: lib.fl_check_poll(fd, t, v), ms)
    return Verdict._from_c(v)
