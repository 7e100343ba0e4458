"""Method 4: the kernel's own timers - SO_KEEPALIVE and TCP_USER_TIMEOUT.

Keepalive (``net/ipv4/tcp_timer.c``, ``tcp_keepalive_timer``) only runs
while nothing is in flight: after ``idle`` seconds without receiving
anything it sends a probe every ``interval`` seconds and, after ``count``
unanswered probes, drops the connection with ETIMEDOUT.  Kernel defaults:
7200 s idle, 75 s interval, 9 probes: a silent death is found after
7200 + 9 x 75 = 7875 s.  (The article's "11 min 15 s after the first
probe" is 9 x 75 s.)  A frozen (SIGSTOPped) peer's kernel still answers
probes, so keepalive calls it alive.

While data is unacknowledged keepalive is off and the retransmission timer
decides: ``net.ipv4.tcp_retries2`` = 15 retries, about 924.6 s at the
minimum RTO.  TCP_USER_TIMEOUT bounds that (ETIMEDOUT once data has been
unacknowledged that long) and, when set, also replaces ``count`` as
keepalive's limit.  Setting both is the only way to bound idle and busy
connections alike: :func:`detect_within` does it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ._lib import SocketLike, check_rc, fd_of, ffi, lib

__all__ = [
    "DEFAULT_IDLE", "DEFAULT_INTERVAL", "DEFAULT_COUNT", "DEFAULT_RETRIES2", "BUSY_SLACK",
    "KeepaliveSettings", "get_keepalive", "set_keepalive", "retransmit_timeout", "detection_time",
    "read_sysctl_defaults", "Bound", "plan_within", "detect_within",
]

#: The kernel's own defaults (net.ipv4.tcp_keepalive_*), in seconds.
DEFAULT_IDLE = 7200
DEFAULT_INTERVAL = 75
DEFAULT_COUNT = 9
DEFAULT_RETRIES2 = 15
_RTO_MIN = 0.2     # TCP_RTO_MIN, seconds
_RTO_MAX = 120.0   # TCP_RTO_MAX, seconds
#: Seconds by which a busy connection's ETIMEDOUT may come after
#: TCP_USER_TIMEOUT: the kernel checks the timeout only when a
#: retransmission timer fires, and the first retransmission comes ~0.2-0.4 s
#: after the data (tail-loss probe, then RTO); with the link down, failed
#: transmits are retried as local congestion every 0.5 s.  Measured here:
#: 0.4-1.2 s over.
BUSY_SLACK = 1.5


@dataclass(frozen=True)
class KeepaliveSettings:
    """A socket's keepalive and user-timeout settings (seconds)."""

    enabled: bool
    idle: int
    interval: int
    count: int
    user_timeout: float = 0.0   #: TCP_USER_TIMEOUT in seconds; 0 = off


def get_keepalive(sock: SocketLike) -> KeepaliveSettings:
    """Read SO_KEEPALIVE, TCP_KEEPIDLE/INTVL/CNT and TCP_USER_TIMEOUT.
    Unset options read as the namespace's sysctl values.  OSError for
    anything that is not a TCP socket."""
    out = ffi.new("struct fl_keepalive *")
    check_rc(lib.fl_get_keepalive(fd_of(sock), out))
    return KeepaliveSettings(bool(out.enabled), out.idle_s, out.interval_s,
                             out.count, out.user_timeout_ms / 1000.0)


def _secs(name: str, value: Optional[int], lo: int, hi: int) -> int:
    if value is None:
        return -1
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {value!r}")
    return value


def set_keepalive(sock: SocketLike, enabled: bool = True, *,
                  idle: Optional[int] = None, interval: Optional[int] = None,
                  count: Optional[int] = None,
                  user_timeout: Optional[float] = None) -> KeepaliveSettings:
    """Set what is given (None leaves an option as it is) and return the
    settings now in force.  Limits are the kernel's: idle and interval
    1..32767 s, count 1..127, user_timeout >= 0 s (0 turns it off)."""
    ut_ms = 0
    if user_timeout is not None:
        if not user_timeout >= 0 or user_timeout > 0x7FFFFFFF / 1000:
            raise ValueError(f"user_timeout must be >= 0 seconds, got {user_timeout!r}")
        ut_ms = int(round(user_timeout * 1000))
    fd = fd_of(sock)
    check_rc(lib.fl_set_keepalive(
        fd, 1 if enabled else 0,
        _secs("idle", idle, 1, 32767), _secs("interval", interval, 1, 32767),
        _secs("count", count, 1, 127), user_timeout is not None, ut_ms))
    return get_keepalive(fd)


def retransmit_timeout(retries: int = DEFAULT_RETRIES2) -> float:
    """Seconds the kernel retransmits before ETIMEDOUT for ``retries``
    (tcp_retries2), as ``retransmits_timed_out()`` computes it from the
    minimum RTO with exponential backoff capped at TCP_RTO_MAX."""
    thresh = int(math.log2(_RTO_MAX / _RTO_MIN))   # 9
    if retries <= thresh:
        return ((2 << retries) - 1) * _RTO_MIN
    return ((2 << thresh) - 1) * _RTO_MIN + (retries - thresh) * _RTO_MAX


def detection_time(settings: KeepaliveSettings, *, busy: bool = False,
                   retries2: int = DEFAULT_RETRIES2) -> float:
    """Worst-case seconds from the peer's silent death until the kernel
    reports ETIMEDOUT, for these settings.

    ``busy=False``: nothing in flight, keepalive decides (``inf`` when off).
    With TCP_USER_TIMEOUT set, keepalive stops at the first probe time at
    or past the user timeout instead of after ``count`` probes.
    ``busy=True``: data unacknowledged, the retransmission timer decides:
    the user timeout (plus :data:`BUSY_SLACK`) if set, else
    ``retransmit_timeout(retries2)``.
    """
    ut = settings.user_timeout
    if busy:
        return ut + BUSY_SLACK if ut > 0 else retransmit_timeout(retries2)
    if not settings.enabled:
        return math.inf
    idle, iv = settings.idle, settings.interval
    if ut > 0:
        probes = max(1, math.ceil((ut - idle) / iv))
        return float(idle + iv * probes)
    return float(idle + iv * settings.count)


def read_sysctl_defaults() -> KeepaliveSettings:
    """The namespace's keepalive sysctls (what unset sockets use)."""
    def rd(name: str, default: int) -> int:
        try:
            with open(f"/proc/sys/net/ipv4/{name}") as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return default
    return KeepaliveSettings(False, rd("tcp_keepalive_time", DEFAULT_IDLE),
                             rd("tcp_keepalive_intvl", DEFAULT_INTERVAL),
                             rd("tcp_keepalive_probes", DEFAULT_COUNT))


@dataclass(frozen=True)
class Bound:
    """What :func:`detect_within` arranged."""

    seconds: float               #: worst case, idle or busy
    settings: KeepaliveSettings  #: as read back from the socket


def plan_within(seconds: float) -> KeepaliveSettings:
    """The keepalive/user-timeout settings :func:`detect_within` uses for a
    bound of ``seconds`` (>= 2): up to 3 probes (one lost probe is not a
    death), probe interval about a sixth of the bound, the rest idle, and a
    user timeout :data:`BUSY_SLACK` short of the bound, so a busy connection
    gets the same bound as an idle one.  (With a user timeout set, the
    kernel's keepalive stops at the first probe time at or past it.)"""
    if not seconds >= 2:
        raise ValueError(f"the bound must be at least 2 seconds, got {seconds!r}")
    whole = int(min(seconds, 32767))
    count = min(3, whole - 1)
    interval = max(1, whole // (2 * count))
    idle = whole - interval * count
    return KeepaliveSettings(True, idle, interval, count,
                             max(0.5, whole - BUSY_SLACK))


def detect_within(sock: SocketLike, seconds: float) -> Bound:
    """"Tell me within N seconds": arm keepalive and TCP_USER_TIMEOUT so
    that a silently dead peer is reported (ETIMEDOUT on the socket: a read,
    write, poll POLLERR or SO_ERROR sees it) within ``seconds``, whether the
    connection is idle or has data in flight.  Returns the bound achieved
    (whole seconds, <= ``seconds``), counted from the last segment received
    from the peer (idle) or from the first unacknowledged send (busy).
    """
    plan = plan_within(seconds)
    got = set_keepalive(sock, True, idle=plan.idle, interval=plan.interval,
                        count=plan.count, user_timeout=plan.user_timeout)
    bound = max(detection_time(got), detection_time(got, busy=True))
    return Bound(bound, got)
