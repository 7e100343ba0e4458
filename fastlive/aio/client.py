"""Client-side helpers for drivers that open their sockets themselves."""
from __future__ import annotations

import socket
from typing import Any, Callable, Sequence

from ..keepalive import plan_next, set_keepalive
from .target import check_within

__all__ = ["socket_factory"]


def socket_factory(within: float) -> Callable[[Sequence[Any]], socket.socket]:
    """A ``socket_factory`` for aiohttp's ``TCPConnector`` (>= 3.12) and
    aiohappyeyeballs: every socket it makes has keepalive and
    TCP_USER_TIMEOUT armed (:func:`~fastlive.keepalive.plan_next`) before
    it connects, so a silently dead server turns into the driver's own
    connection error (ETIMEDOUT on the socket) within ``within`` seconds,
    idle or busy.  ``addr_info`` is ``(family, type, proto, canonname,
    sockaddr)``."""
    w = check_within(within)
    if w is None:
        raise TypeError("within must be seconds, got None")

    def make(addr_info: Sequence[Any]) -> socket.socket:
        family, type_, proto = addr_info[0], addr_info[1], addr_info[2]
        s = socket.socket(family, type_, proto)
        try:
            if type_ == socket.SOCK_STREAM and family in (socket.AF_INET, socket.AF_INET6):
                plan = plan_next(w)
                set_keepalive(s, idle=plan.idle, interval=plan.interval, count=plan.count,
                              user_timeout=plan.user_timeout)
        except BaseException:
            s.close()
            raise
        return s

    return make
