"""Client-side helpers for drivers that open their sockets themselves.

aiohttp's ``TCPConnector`` (>= 3.12) and aiohappyeyeballs take a
``socket_factory``: :func:`socket_factory` makes sockets with keepalive and
TCP_USER_TIMEOUT armed before they connect.

Why the bound is split.  A driver call can outlive the connection it started
on: aiohttp retries an idempotent request (GET, HEAD, OPTIONS, TRACE, PUT,
DELETE) once on a *new* connection when the first one fails
(``ClientSession._request``, RFC 9112 section 9.3.1), and against a dead
server that new connection's SYN is never answered.  So the call fails only
after the first connection's ETIMEDOUT *plus* the second one's handshake
timeout.  Measured (``tests/test_aio_real.py``, server blackholed, bound 5 s,
the whole bound spent on each socket): the established connection timed out
3.0 s after the blackhole, aiohttp's retry sent its SYN at once and the
kernel gave up on it 3.5 s later (TCP_USER_TIMEOUT also bounds SYN
retransmissions): 6.6 s.  With ``reconnects=1`` (the default) each handshake
gets ``max(1, within / 4)`` seconds and the established connection the rest,
so the first failure plus the retry fit in ``within``.
"""
from __future__ import annotations

import asyncio
import math
import numbers
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from ..keepalive import KeepaliveSettings, plan_next, plan_within, set_keepalive
from ..tcpinfo import tcp_info
from ..tcpstate import TcpState
from .target import check_within

__all__ = ["socket_factory", "ClientPlan", "plan_client", "MAX_RECONNECTS"]

#: ``reconnects`` accepted by :func:`socket_factory` (aiohttp needs 1).
MAX_RECONNECTS = 8
_MIN_HANDSHAKE = 1.0      # seconds: the kernel's first SYN retransmission comes after 1 s
_REARM_RETRY = 0.1        # seconds between checks while a connect is still in progress
_REARM_TRIES = 50         # bounded: 5 s of re-checks at most


@dataclass(frozen=True)
class ClientPlan:
    """How :func:`socket_factory` spends a bound of ``within`` seconds."""

    within: float                 #: the bound asked for, seconds
    reconnects: int               #: fresh connections one call may open after the first dies
    handshake: float              #: TCP_USER_TIMEOUT while the SYN is unanswered, seconds
    established: KeepaliveSettings  #: keepalive + user timeout once connected

    @property
    def connected_bound(self) -> float:
        """Worst case for an established connection, idle or busy:
        ``within - reconnects x handshake``."""
        return self.within - self.reconnects * self.handshake


def _check_reconnects(reconnects: object) -> int:
    if isinstance(reconnects, bool) or not isinstance(reconnects, numbers.Integral):
        raise TypeError(f"reconnects must be an int, got {type(reconnects).__name__}")
    r = int(reconnects)
    if not 0 <= r <= MAX_RECONNECTS:
        raise ValueError(f"reconnects must be 0..{MAX_RECONNECTS}, got {reconnects!r}")
    return r


def plan_client(within: float, reconnects: int = 1) -> ClientPlan:
    """The split :func:`socket_factory` uses (see the module docstring).

    ``reconnects=0``: the whole bound for the connection
    (:func:`~fastlive.keepalive.plan_within`), the handshake bounded by the
    same user timeout.  ``reconnects=r > 0``: each handshake gets ``h =
    max(1, within / 4)`` seconds (a SYN unanswered that long fails with
    ETIMEDOUT) and the established connection ``within - r x h`` (at least
    2 s, else ValueError naming ``within``)."""
    w = check_within(within)
    if w is None:
        raise TypeError("within must be seconds, got None")
    r = _check_reconnects(reconnects)
    if r == 0:
        est = plan_within(w)
        return ClientPlan(w, 0, est.user_timeout, est)
    hs = math.ceil(max(_MIN_HANDSHAKE, w / 4) * 1000) / 1000
    rest = w - r * hs
    if rest < 2.0:
        need = 2.0 + r * _MIN_HANDSHAKE
        raise ValueError(f"within must be at least {need:g} seconds with reconnects={r} (2 s for the "
                         f"connection, 1 s for each reconnect's handshake), got {within!r}")
    return ClientPlan(w, r, hs, plan_within(rest))


def _rearm(loop: asyncio.AbstractEventLoop, fd: int, ino: int, user_timeout: float,
           tries: int) -> None:
    """Once the handshake is over, give the connection its own user timeout
    (the handshake's was shorter).  The fd must still name the socket the
    factory made (same inode); a failed or closed connect is left alone."""
    try:
        if os.fstat(fd).st_ino != ino:
            return                       # closed (and the number reused)
        state = tcp_info(fd).state
    except OSError:
        return                           # closed
    if state == TcpState.SYN_SENT:
        if tries > 0:                    # the kernel's handshake timer has not fired yet
            loop.call_later(_REARM_RETRY, _rearm, loop, fd, ino, user_timeout, tries - 1)
        return
    if state in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT):
        try:
            set_keepalive(fd, True, user_timeout=user_timeout)
        except OSError:
            pass                         # closed in between


def socket_factory(within: float, *, reconnects: int = 1
                   ) -> Callable[[Sequence[Any]], socket.socket]:
    """A ``socket_factory`` for aiohttp's ``TCPConnector`` (>= 3.12) and
    aiohappyeyeballs: every TCP socket it makes has keepalive and
    TCP_USER_TIMEOUT armed before it connects, so that a call on a silently
    dead server fails with the driver's own connection error (ETIMEDOUT on
    the socket) within ``within`` seconds, idle or busy, *including* up to
    ``reconnects`` fresh connections the driver opens for the same call
    (aiohttp retries an idempotent request once: keep the default 1).

    The split (:func:`plan_client`): a handshake gets ``max(1, within / 4)``
    seconds, an established connection ``within - reconnects x that``.
    When called inside a running loop (aiohappyeyeballs calls it there), a
    ``call_later`` at the end of the handshake gives the connected socket its
    own, longer, user timeout; until then the shorter one holds (stricter,
    never later).  Outside a loop the handshake's user timeout stays.

    One address per host is assumed: aiohappyeyeballs tries a host's
    addresses one after another (staggered by ``happy_eyeballs_delay``), each
    handshake with its own bound.  ``addr_info`` is ``(family, type, proto,
    canonname, sockaddr)``.  TypeError / ValueError name the parameter.
    """
    plan = plan_client(within, reconnects)

    def make(addr_info: Sequence[Any]) -> socket.socket:
        family, type_, proto = addr_info[0], addr_info[1], addr_info[2]
        s = socket.socket(family, type_, proto)
        try:
            if type_ == socket.SOCK_STREAM and family in (socket.AF_INET, socket.AF_INET6):
                # plan.established, with the idle of this burst's slot
                est = plan_next(plan.connected_bound)
                set_keepalive(s, idle=est.idle, interval=est.interval, count=est.count,
                              user_timeout=plan.handshake)
                if plan.handshake != est.user_timeout:
                    loop: Optional[asyncio.AbstractEventLoop]
                    try:
                        loop = asyncio.get_running_loop()
                    except RuntimeError:
                        loop = None
                    if loop is not None:
                        fd = s.fileno()
                        loop.call_later(plan.handshake, _rearm, loop, fd, os.fstat(fd).st_ino,
                                        est.user_timeout, _REARM_TRIES)
        except BaseException:
            s.close()
            raise
        return s

    return make

