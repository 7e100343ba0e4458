"""fastlive: is the peer of a TCP connection still there?

Six ways the Linux kernel can tell (after the article this project comes
from), each as a check that takes a socket or a file descriptor and
returns a :class:`Verdict`:

1. reads and writes - :func:`check_peek`, :func:`send`, :func:`check_so_error`
2. readiness - :func:`check_select`, :func:`check_poll`
3. TCP_INFO - :func:`tcp_info`, :func:`check_tcp_info`
4. keepalive and TCP_USER_TIMEOUT - :func:`set_keepalive`, :func:`detect_within`
5. SO_RCVTIMEO - :func:`set_timeouts`, :func:`check_rcvtimeo`
6. an application heartbeat - :class:`HeartbeatEngine`

Thousands at once: :class:`Batch` (one C call per sweep) and
:class:`Monitor` (epoll: O(deaths), not O(connections)).
"""
from __future__ import annotations

from typing import Callable, Dict

from ._lib import SocketLike
from ._version import __version__
from .keepalive import (ArmingStats, Bound, KeepaliveBurstWarning, KeepaliveSettings,
                        arming_stats, detect_within, detection_time, get_keepalive,
                        plan_next, plan_within, retransmit_timeout, set_keepalive)
from .readiness import FD_SETSIZE, check_poll, check_select
from .rw import SendResult, check_peek, check_so_error, send
from .tcpinfo import TCP_INFO_SIZE, TcpInfo, check_tcp_info, tcp_info
from .tcpstate import TcpState
from .timeouts import check_rcvtimeo, get_timeouts, set_timeouts
from .verdict import Flag, Method, Status, Verdict

# Many connections at once: batch sweeps and the epoll Monitor.
from .batch import Batch, Dead, TcpInfoRecords
from .monitor import Death, Monitor

# Method 6, the heartbeat engine.
from .heartbeat import HeartbeatDeath, HeartbeatEngine, PyHeartbeatPeer, RttSample

# The machine's TCP sockets: one sock_diag dump, and the death log.
from .census import Census, CensusEntry, Follow, census, census_follow

_CHECKS: Dict[Method, Callable[[SocketLike], Verdict]] = {
    Method.PEEK: check_peek,
    Method.SO_ERROR: check_so_error,
    Method.SELECT: check_select,
    Method.POLL: check_poll,
    Method.TCP_INFO: check_tcp_info,
}


def check(sock: SocketLike, method: Method = Method.POLL) -> Verdict:
    """Run one non-blocking check by method (default: poll with POLLRDHUP,
    which sees FIN, RST and pending errors without touching the stream)."""
    try:
        fn = _CHECKS[Method(method)]
    except (KeyError, ValueError):
        raise ValueError(f"{method!r} is not a non-blocking check; use one of "
                         f"{', '.join(m.name for m in _CHECKS)}") from None
    return fn(sock)


__all__ = [
    "__version__", "SocketLike",
    "Status", "Method", "Flag", "Verdict", "TcpState",
    "check", "check_peek", "check_so_error", "send", "SendResult",
    "check_select", "check_poll", "FD_SETSIZE",
    "tcp_info", "TcpInfo", "check_tcp_info", "TCP_INFO_SIZE",
    "KeepaliveSettings", "Bound", "get_keepalive", "set_keepalive",
    "detection_time", "detect_within", "plan_within", "retransmit_timeout",
    "plan_next", "arming_stats", "ArmingStats", "KeepaliveBurstWarning",
    "set_timeouts", "get_timeouts", "check_rcvtimeo",
    "Batch", "Dead", "TcpInfoRecords", "Monitor", "Death",
    "HeartbeatEngine", "PyHeartbeatPeer", "HeartbeatDeath", "RttSample",
    "census", "census_follow", "Census", "CensusEntry", "Follow",
]
