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
connections alike: :func:`detect_within` does it.  It sets TCP_USER_TIMEOUT
:data:`BUSY_SLACK` (1.5 s) short of the bound, because the kernel checks
the user timeout only when a retransmission timer fires, so a busy
connection's ETIMEDOUT comes up to that much after it: ``detect_within(sock,
10)`` sets keepalive 7/1/3 (idle, after 7 + 3 x 1 = 10 s) and a user timeout
of 8.5 s (busy, by 8.5 + 1.5 = 10 s).

Thousands of sockets armed at once would all probe in one timer tick, and
on loopback/veth whatever exceeds ``net.core.netdev_max_backlog`` is
dropped: live peers time out.  :func:`plan_next` (behind every ``within``)
spreads a burst over :func:`spread_count` idle times, all within the bound,
and :func:`detect_within` arms each timer from the connection's last
received segment; past what that can carry, :class:`KeepaliveBurstWarning`
and :func:`arming_stats` say so (docs/batch.md, "Thousands of connections
armed at once").
"""
from __future__ import annotations

import functools
import math
import os
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from ._lib import SocketLike, check_rc, count, fd_of, ffi, lib, seconds, to_units

__all__ = [
    "DEFAULT_IDLE", "DEFAULT_INTERVAL", "DEFAULT_COUNT", "DEFAULT_RETRIES2", "BUSY_SLACK",
    "KeepaliveSettings", "get_keepalive", "set_keepalive", "retransmit_timeout", "detection_time",
    "read_sysctl_defaults", "SYSCTL_DIR", "Bound", "plan_within", "detect_within",
    "SPREAD_MAX", "SPREAD_FLOOR", "SPREAD_BLOCK", "BACKLOG_SHARE", "NETDEV_MAX_BACKLOG", "spread_count",
    "plan_next", "ArmingStats", "arming_stats", "KeepaliveBurstWarning",
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
    """A socket's keepalive and user-timeout settings, as the kernel holds
    them (an option the socket never set reads as the namespace's sysctl)."""

    enabled: bool               #: SO_KEEPALIVE: probe an idle connection
    idle: int                   #: TCP_KEEPIDLE: seconds of silence before the first probe
    interval: int               #: TCP_KEEPINTVL: seconds between unanswered probes
    count: int                  #: TCP_KEEPCNT: unanswered probes before ETIMEDOUT
    user_timeout: float = 0.0   #: TCP_USER_TIMEOUT in seconds (ms precision); 0 = off


def get_keepalive(sock: SocketLike) -> KeepaliveSettings:
    """Read SO_KEEPALIVE, TCP_KEEPIDLE/INTVL/CNT and TCP_USER_TIMEOUT with
    getsockopt.  Options the socket never set read as the namespace's
    sysctl values (the kernel falls back to them per read).  OSError for
    anything that is not a TCP socket."""
    out = ffi.new("struct fl_keepalive *")
    check_rc(lib.fl_get_keepalive(fd_of(sock), out))
    return KeepaliveSettings(bool(out.enabled), out.idle_s, out.interval_s,
                             out.count, out.user_timeout_ms / 1000.0)


def _opt_count(name: str, value: Optional[int], lo: int, hi: int) -> int:
    """A count or whole-seconds option, -1 for None (leave it as it is)."""
    return -1 if value is None else count(name, value, lo, hi)


def set_keepalive(sock: SocketLike, enabled: bool = True, *,
                  idle: Optional[int] = None, interval: Optional[int] = None,
                  count: Optional[int] = None,
                  user_timeout: Optional[float] = None) -> KeepaliveSettings:
    """Set what is given (None leaves an option as it is) and return the
    settings now in force, as read back from the socket.

    ``enabled`` is SO_KEEPALIVE; ``idle``, ``interval`` and ``count`` are
    TCP_KEEPIDLE / TCP_KEEPINTVL (whole seconds, 1..32767, the kernel's
    MAX_TCP_KEEPIDLE/INTVL) and TCP_KEEPCNT (1..127).  The times are set
    before SO_KEEPALIVE because the kernel arms the timer with the idle
    time in force when keepalive turns on.  ``user_timeout`` is
    TCP_USER_TIMEOUT in seconds (0 turns it off), rounded *up* to the
    kernel's milliseconds so that a tiny timeout never becomes 0 (off).
    TypeError / ValueError name the parameter; OSError for anything that is
    not a TCP socket.
    """
    ut_ms = 0 if user_timeout is None else to_units("user_timeout", user_timeout, 1e-3)
    args = (_opt_count("idle", idle, 1, 32767), _opt_count("interval", interval, 1, 32767),
            _opt_count("count", count, 1, 127))
    fd = fd_of(sock)
    check_rc(lib.fl_set_keepalive(fd, 1 if enabled else 0, *args,
                                  user_timeout is not None, ut_ms))
    return get_keepalive(fd)


def retransmit_timeout(retries: int = DEFAULT_RETRIES2) -> float:
    """Seconds the kernel retransmits before ETIMEDOUT for ``retries``
    (tcp_retries2), as ``retransmits_timed_out()`` computes it from the
    minimum RTO with exponential backoff capped at TCP_RTO_MAX."""
    retries = count("retries", retries, 0, 0x7FFFFFFF)
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
    if not isinstance(settings, KeepaliveSettings):
        raise TypeError(f"settings must be a KeepaliveSettings, got {type(settings).__name__}")
    ut = settings.user_timeout
    if busy:
        if ut > 0:
            return ut + BUSY_SLACK
        return retransmit_timeout(count("retries2", retries2, 0, 0x7FFFFFFF))
    if not settings.enabled:
        return math.inf
    idle, iv = settings.idle, settings.interval
    if ut > 0:
        probes = max(1, math.ceil((ut - idle) / iv))
        return float(idle + iv * probes)
    return float(idle + iv * settings.count)


#: Where the namespace's TCP sysctls live.
SYSCTL_DIR = "/proc/sys/net/ipv4"


def read_sysctl_defaults(directory: str = SYSCTL_DIR) -> KeepaliveSettings:
    """The network namespace's keepalive sysctls: what a socket that did
    not set TCP_KEEPIDLE/INTVL/CNT uses (``net.ipv4.tcp_keepalive_time``,
    ``_intvl``, ``_probes``).  ``enabled`` is False: SO_KEEPALIVE is off
    unless a socket turns it on.  An unreadable or malformed file raises
    (OSError / ValueError naming the file): a guess would hide it."""
    def rd(name: str) -> int:
        path = f"{directory}/{name}"
        with open(path) as f:
            text = f.read()
        try:
            return int(text.split()[0])
        except (ValueError, IndexError):
            raise ValueError(f"{path}: expected an integer, got {text[:40]!r}") from None
    return KeepaliveSettings(False, rd("tcp_keepalive_time"), rd("tcp_keepalive_intvl"),
                             rd("tcp_keepalive_probes"))


@dataclass(frozen=True)
class Bound:
    """What :func:`detect_within` arranged: the worst-case seconds until the
    kernel reports ETIMEDOUT for a silent peer, and the settings read back."""

    seconds: float               #: worst case, idle or busy
    settings: KeepaliveSettings  #: as read back from the socket


def _bound(value: object) -> float:
    v = seconds("seconds", value)
    if not v >= 2:
        raise ValueError(f"seconds: the bound must be at least 2 seconds, got {value!r}")
    return v


#: How many whole-second idle values :func:`plan_within` spreads a burst of
#: armings over, at most.
SPREAD_MAX = 16
#: The lowest idle of the spread, as a share of the plan's idle (rounded up,
#: >= 1 s): lower idles mean more probes on a healthy idle connection.
SPREAD_FLOOR = 0.25
#: Sockets per slot before a burst moves on to the next idle value.
SPREAD_BLOCK = 128
#: Fraction of ``net.core.netdev_max_backlog`` one timer tick may bring as
#: keepalive probes before the burst counts as overloaded (measured: see
#: docs/keepalive.md, "Thousands of connections armed at once").
BACKLOG_SHARE = 0.5
#: Where the kernel's per-CPU input backlog limit lives.
NETDEV_MAX_BACKLOG = "/proc/sys/net/core/netdev_max_backlog"
_DEFAULT_BACKLOG = 1000


def _base(whole: int) -> Tuple[int, int, int, float]:
    cnt = min(3, whole - 1)
    interval = max(1, whole // (2 * cnt))
    return whole - interval * cnt, interval, cnt, max(0.5, whole - BUSY_SLACK)


def spread_count(seconds: float) -> int:
    """How many different plans :func:`plan_within` has for this bound (its
    ``slot`` wraps around at this count): one per whole second of idle from
    the plan's idle down to :data:`SPREAD_FLOOR` of it, at most
    :data:`SPREAD_MAX`."""
    idle = _base(int(min(_bound(seconds), 32767)))[0]
    return min(SPREAD_MAX, idle - max(1, math.ceil(idle * SPREAD_FLOOR)) + 1)


def plan_within(seconds: float, slot: int = 0) -> KeepaliveSettings:
    """The keepalive/user-timeout settings :func:`detect_within` uses for a
    bound of ``seconds`` (>= 2).

    Slot 0 (the default) is the plan: up to 3 probes (one lost probe is not
    a death), probe interval about a sixth of the bound, the rest idle, and
    a user timeout :data:`BUSY_SLACK` short of the bound, so a busy
    connection gets the same bound as an idle one.  (With a user timeout
    set, the kernel's keepalive stops at the first probe time at or past
    it.)

    Slot ``s`` (taken modulo :func:`spread_count`) lowers the idle time by
    ``s`` whole seconds, with the largest interval that still keeps the
    bound (so more probes fit before the user timeout): the same bound,
    probes ``s`` seconds earlier.  :func:`detect_within` rotates the slots
    over a burst of armings so that their first probes do not all fall into
    one kernel timer-wheel bucket (see :func:`arming_stats`).
    """
    bound = _bound(seconds)
    s = count("slot", slot, 0, 2**63 - 1)
    whole = int(min(bound, 32767))
    return _plan(whole, s % spread_count(bound), SPREAD_FLOOR, SPREAD_MAX)


@functools.lru_cache(maxsize=1024)
def _plan(whole: int, s: int, _floor: float, _max: int) -> KeepaliveSettings:
    """plan_within for a whole bound and a slot < spread_count (cached: the
    spread constants are part of the key)."""
    idle0, interval0, cnt0, ut = _base(whole)
    if s == 0:
        return KeepaliveSettings(True, idle0, interval0, cnt0, ut)
    idle = idle0 - s
    for interval in range(interval0, 0, -1):
        probes = max(1, math.ceil((ut - idle) / interval))
        if idle + interval * probes <= whole:
            return KeepaliveSettings(True, idle, interval, min(127, probes), ut)
    raise AssertionError("unreachable: interval 1 always keeps the bound")  # pragma: no cover


@dataclass(frozen=True)
class ArmingStats:
    """What :func:`detect_within` has armed in this process."""

    armed: int       #: sockets armed by detect_within (and Monitor.add / fastlive.aio with within=)
    overloaded: int  #: of those, armed while a burst exceeded the safe load (see :func:`arming_stats`)
    backlog: int     #: net.core.netdev_max_backlog as last read


class _Arming:
    """Counts armings per burst and per plan (keyed by the plan's idle): a
    burst is a run of armings each less than ``max(1 s, idle / 8)`` after
    the one before (the kernel's timer wheel groups timers that far apart
    into one bucket, granularity <= 1/8 of the delay).  A gap, not a fixed
    window, ends it: the timers run from each connection's last received
    segment, not from when it was armed, so a burst armed slowly (a slow
    or emulated CPU, a loaded machine) must keep rotating its slots.  The
    load the warning is about is counted per window of that length, so a
    steady trickle of armings never warns."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # idle -> [last arming, n in the burst, this window's start, n in the window]
        self.windows: Dict[int, List[float]] = {}
        self.armed = 0
        self.overloaded = 0
        self.backlog = 0

    def _read_backlog(self) -> int:
        try:
            with open(NETDEV_MAX_BACKLOG) as f:
                return max(1, int(f.read().split()[0]))
        except (OSError, ValueError, IndexError):
            return _DEFAULT_BACKLOG

    def next_slot(self, bound: float) -> Tuple[int, Optional[str]]:
        """(slot for the next socket armed with this bound, warning text or
        None)."""
        whole = int(min(bound, 32767))
        idle = _base(whole)[0]
        k = spread_count(bound)
        gap = max(1.0, idle / 8)
        now = time.monotonic()
        with self.lock:
            w = self.windows.get(idle)
            if w is None or now - w[0] > gap:
                if len(self.windows) > 64:
                    self.windows.clear()
                w = self.windows[idle] = [now, 0, now, 0]
                self.backlog = self._read_backlog()
            elif now - w[2] > gap:          # the burst goes on; the load is counted per window
                w[2], w[3] = now, 0
            n, m = int(w[1]), int(w[3])
            w[0], w[1], w[3] = now, n + 1, m + 1
            self.armed += 1
            safe = k * max(1, int(self.backlog * BACKLOG_SHARE))
            if m < safe:
                return n // SPREAD_BLOCK, None
            self.overloaded += 1
            if m != safe:
                return n // SPREAD_BLOCK, None
        return n // SPREAD_BLOCK, (
            f"fastlive: more than {safe} sockets armed with a {whole} s bound within "
            f"{gap:g} s in this process: their keepalive probes come in bursts "
            f"that can overflow net.core.netdev_max_backlog ({self.backlog}) on loopback/veth, and "
            f"dropped probes turn into false ETIMEDOUT deaths.  Arm them over more time, use a "
            f"longer bound, or raise net.core.netdev_max_backlog (see fastlive.arming_stats())")


_ARMING = _Arming()
if hasattr(os, "register_at_fork"):     # a child must not inherit a lock held by another thread
    os.register_at_fork(after_in_child=lambda: setattr(_ARMING, "lock", threading.Lock()))


class KeepaliveBurstWarning(RuntimeWarning):
    """More sockets were armed at once than their keepalive probes can
    safely share the kernel's input backlog with (see :func:`arming_stats`)."""


def arming_stats() -> ArmingStats:
    """How many sockets this process armed with a bound, and how many of
    them while a burst was over the safe load.

    Keepalive timers armed within one kernel timer-wheel bucket fire in one
    timer tick; on loopback and veth every probe then goes through the
    CPU's input backlog, and what exceeds ``net.core.netdev_max_backlog``
    is dropped (``/proc/net/softnet_stat`` column 2), so peers that are
    alive miss their probes and time out.  :func:`plan_within` spreads a
    burst over :func:`spread_count` idle values; the safe load of a burst
    is ``spread_count x netdev_max_backlog x`` :data:`BACKLOG_SHARE`
    sockets.  Past it, ``overloaded`` counts up and a
    :class:`KeepaliveBurstWarning` is issued once per window of
    ``max(1 s, idle / 8)`` that arms more."""
    with _ARMING.lock:
        return ArmingStats(_ARMING.armed, _ARMING.overloaded,
                           _ARMING.backlog or _ARMING._read_backlog())


def plan_next(seconds: float) -> KeepaliveSettings:
    """The plan for the next socket this process arms with a bound of
    ``seconds``: :func:`plan_within` with the slot of this burst of
    armings.  The one planning call behind :func:`detect_within`,
    ``Monitor.add(within=)`` and fastlive.aio's ``within=``; issues a
    :class:`KeepaliveBurstWarning` when a burst is over the safe load."""
    bound = _bound(seconds)
    slot, warn = _ARMING.next_slot(bound)
    if warn is not None:
        warnings.warn(warn, KeepaliveBurstWarning, stacklevel=3)
    return plan_within(bound, slot)


def detect_within(sock: SocketLike, seconds: float) -> Bound:
    """"Tell me within N seconds": arm keepalive and TCP_USER_TIMEOUT so
    that a silently dead peer is reported (ETIMEDOUT on the socket: a read,
    write, poll POLLERR or SO_ERROR sees it) within ``seconds``, whether the
    connection is idle or has data in flight.  Returns the bound achieved
    (whole seconds, <= ``seconds``), counted from the last segment received
    from the peer (idle) or from the first unacknowledged send (busy).

    Many sockets armed at once get different idle times (:func:`plan_next`,
    :func:`plan_within` slots), all within the same bound, so that their
    probes do not all leave in one timer tick; past what that can spread,
    a :class:`KeepaliveBurstWarning` says so (see :func:`arming_stats`).
    """
    _bound(seconds)                   # validates before touching the socket
    fd = fd_of(sock)
    plan = plan_next(seconds)
    # SO_KEEPALIVE first, then the times: turning keepalive on arms the timer
    # at now + idle (tcp_set_keepalive), which would line up every socket
    # armed in this burst; TCP_KEEPIDLE with keepalive on re-arms it at
    # last segment received + idle (tcp_sock_set_keepidle_locked), or at
    # once when the connection has been idle longer: each connection keeps
    # its own phase, and a long-idle one is probed now, so its full probe
    # budget starts from the answer.
    check_rc(lib.fl_set_keepalive(fd, 1, -1, -1, -1, 0, 0))
    got = set_keepalive(fd, True, idle=plan.idle, interval=plan.interval,
                        count=plan.count, user_timeout=plan.user_timeout)
    bound = max(detection_time(got), detection_time(got, busy=True))
    return Bound(bound, got)
