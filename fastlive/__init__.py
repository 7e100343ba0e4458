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

import importlib
from typing import TYPE_CHECKING, Any, Callable, Dict, List

from ._version import __version__
from .verdict import Flag, Method, Status, Verdict
# Loaded now: ``census`` names both the function and its module, and an
# import of the module after the function was handed out would rebind
# ``fastlive.census`` to the module.
from .census import Census, CensusEntry, Follow, census, census_follow
from ._lib import SocketLike
from .tcpinfo import TCP_INFO_SIZE, TcpInfo, check_tcp_info, tcp_info
from .tcpstate import TcpState

if TYPE_CHECKING:  # the names, for type checkers; at run time they load on first use
    from .keepalive import (ArmingStats, Bound, KeepaliveBurstWarning, KeepaliveSettings,
                            arming_stats, detect_within, detection_time, get_keepalive,
                            plan_next, plan_within, retransmit_timeout, set_keepalive)
    from .readiness import FD_SETSIZE, check_poll, check_select
    from .rw import SendResult, check_peek, check_so_error, send
    from .timeouts import check_rcvtimeo, get_timeouts, set_timeouts
    from .batch import Batch, Dead, TcpInfoRecords
    from .monitor import Death, Monitor
    from .heartbeat import HeartbeatDeath, HeartbeatEngine, PyHeartbeatPeer, RttSample

#: public name -> the submodule that defines it.  ``import fastlive`` loads
#: none of these: a name's module is imported the first time it is used (a
#: process that only needs the census, or only the CLI's --help, does not
#: pay for the heartbeat engine, the batch sweeps or the keepalive planner;
#: on an emulated ARM CPU that is a second per process).
_WHERE: Dict[str, str] = {}
for _mod, _names in {
    "keepalive": "ArmingStats Bound KeepaliveBurstWarning KeepaliveSettings arming_stats "
                 "detect_within detection_time get_keepalive plan_next plan_within "
                 "retransmit_timeout set_keepalive",
    "readiness": "FD_SETSIZE check_poll check_select",
    "rw": "SendResult check_peek check_so_error send",
    "timeouts": "check_rcvtimeo get_timeouts set_timeouts",
    "batch": "Batch Dead TcpInfoRecords",
    "monitor": "Death Monitor",
    "heartbeat": "HeartbeatDeath HeartbeatEngine PyHeartbeatPeer RttSample",
}.items():
    for _name in _names.split():
        _WHERE[_name] = _mod
del _mod, _names, _name

#: submodules that ``import fastlive`` used to load, reachable as attributes
_SUBMODULES = frozenset(("keepalive", "readiness", "rw", "timeouts", "batch",
                         "monitor", "heartbeat", "_registry"))


def _load(name: str) -> Any:
    """Import the submodule that defines ``name`` and keep the value here."""
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'fastlive' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


if not TYPE_CHECKING:  # type checkers see the imports above, and flag typos
    __getattr__ = _load  # PEP 562: called only for names not loaded yet


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_WHERE))


_CHECKS: Dict[Method, str] = {
    Method.PEEK: "check_peek",
    Method.SO_ERROR: "check_so_error",
    Method.SELECT: "check_select",
    Method.POLL: "check_poll",
    Method.TCP_INFO: "check_tcp_info",
}


def check(sock: SocketLike, method: Method = Method.POLL) -> Verdict:
    """Run one non-blocking check by method (default: poll with POLLRDHUP,
    which sees FIN, RST and pending errors without touching the stream)."""
    try:
        name = _CHECKS[Method(method)]
    except (KeyError, ValueError):
        raise ValueError(f"{method!r} is not a non-blocking check; use one of "
                         f"{', '.join(m.name for m in _CHECKS)}") from None
    fn: Callable[[SocketLike], Verdict] = globals().get(name) or _load(name)
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
