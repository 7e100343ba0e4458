"""The C heartbeat engine: PING/PONG for thousands of connections from one
epoll set and one timing wheel (method 6; see the package docstring)."""
from __future__ import annotations

import errno as _errno
import threading
from collections import deque
from dataclasses import dataclass
from typing import Deque, Dict, List, Optional, Tuple

from .._lib import SocketLike, check_rc, fd_of, ffi, lib, timeout_ms
from ..verdict import Verdict

__all__ = ["HeartbeatDeath", "RttSample", "EngineStats", "HeartbeatEngine"]

@dataclass(frozen=True)
class HeartbeatDeath:
    """A connection the engine gave up on (it no longer watches it; the
    socket stays open and is the caller's to close)."""

    fd: int
    verdict: Verdict
    silent: float            #: seconds since anything was last heard
    sock: Optional[SocketLike] = None


@dataclass(frozen=True)
class RttSample:
    fd: int
    rtt: float               #: seconds from PING sent to PONG read


@dataclass(frozen=True)
class EngineStats:
    conns: int
    pings_sent: int
    pings_skipped: int
    pongs_received: int
    pings_answered: int
    frames_received: int
    bytes_received: int
    timer_fires: int
    wakeups: int
    coalesced: int
    deaths: int
    rtt_dropped: int
    late_max: float          #: seconds, deadline -> handled (worst)
    late_mean: float
    tick: float


def _check_schedule(interval: float, misses: int) -> Tuple[int, int]:
    if not interval == interval or interval <= 0 or interval > 0x7FFFFFFF / 1000:
        raise ValueError(f"interval must be > 0 seconds (and < 24 days), got {interval!r}")
    ms = max(1, int(round(interval * 1000)))
    if isinstance(misses, bool) or not isinstance(misses, int) or not 2 <= misses <= 1000:
        raise ValueError(f"misses must be an int in 2..1000, got {misses!r}")
    return ms, misses


class HeartbeatEngine:
    """Heartbeats for many TCP connections, run in C.

    ``wait(timeout)`` runs the engine (releasing the GIL) and returns the
    connections found dead.  The engine is locked while it runs: add() and
    remove() from another thread wait for wait() to return (keep timeouts
    short there).  Inside another event loop, watch :meth:`fileno` for
    readability and call :meth:`poll`.

    ``tick`` is the timer granularity: a deadline is served at the first
    tick boundary at or after it, and while deadlines are due every tick
    the engine sleeps to the boundary and harvests all readiness in one
    pass (FIN/RST are then reported up to one tick later).
    """

    _BATCH = 256

    def __init__(self, tick: float = 0.01, capacity: int = 1024,
                 rtt_samples: int = 4096) -> None:
        tick_ms = int(round(tick * 1000))
        if not 1 <= tick_ms <= 1000:
            raise ValueError(f"tick must be 0.001..1 s, got {tick!r}")
        pp = ffi.new("struct fl_hb **")
        check_rc(lib.fl_hb_new(tick_ms, max(0, int(capacity)), pp))
        self._hb = ffi.gc(pp[0], lib.fl_hb_free)
        self._out = ffi.new("struct fl_hb_event[]", self._BATCH)
        self._socks: Dict[int, SocketLike] = {}
        # sockets whose fd number was reused under them (see add())
        self._stale: Dict[int, SocketLike] = {}
        self._lock = threading.Lock()
        self.rtt: Deque[RttSample] = deque(maxlen=max(1, rtt_samples))

    def _live(self) -> ffi.CData:
        if self._hb is None:
            raise ValueError("the engine is closed")
        return self._hb

    def add(self, sock: SocketLike, interval: float = 1.0, misses: int = 3, *,
            shared: bool = False, rtt: bool = False) -> None:
        """Watch ``sock`` (a connected TCP socket or fd).

        ``shared=False``: the engine owns the read side; every byte must be
        a heartbeat frame.  ``shared=True``: the application reads; see the
        module docstring for its duties.  Keep the socket open until it is
        removed or reported dead.  A socket closed behind the engine's back
        is never written to or read: the engine checks the socket's SO_COOKIE
        before each PING and each read, reports the registration INVALID (EBADF) instead, and a
        new socket that got the same fd number can be added at once.
        """
        ms, misses = _check_schedule(interval, misses)
        fd = fd_of(sock)
        flags = (lib.FL_HB_SHARED if shared else 0) | (lib.FL_HB_RTT if rtt else 0)
        with self._lock:
            check_rc(lib.fl_hb_add(self._live(), fd, ms, misses, flags))
            prev = self._socks.get(fd)
            if prev is not None and prev is not sock:
                self._stale[fd] = prev   # its EBADF death comes with the next wait
            self._socks[fd] = sock

    def remove(self, sock: SocketLike) -> bool:
        """Stop watching; False if it was not watched.  Call it before
        closing the socket: a closed fd number can be reused by the next
        socket, which the engine would then ping.  (A socket object that is
        already closed is still found, by identity.)"""
        fd = fd_of(sock)
        if fd < 0:
            fd = next((k for k, v in self._socks.items() if v is sock), -1)
        with self._lock:
            rc = lib.fl_hb_remove(self._live(), fd)
            self._socks.pop(fd, None)
        if rc == -_errno.ENOENT:
            return False
        check_rc(rc)
        return True

    def __len__(self) -> int:
        return len(self._socks)

    def __contains__(self, sock: SocketLike) -> bool:
        return fd_of(sock) in self._socks

    def fileno(self) -> int:
        """The engine's epoll fd (readable when :meth:`poll` has work)."""
        return int(lib.fl_hb_fileno(self._live()))

    def wait(self, timeout: float) -> List[HeartbeatDeath]:
        """Run for up to ``timeout`` seconds; return as soon as something
        died (every death found so far), or ``[]`` at the timeout."""
        ms = timeout_ms(timeout)
        with self._lock:        # add()/remove() from other threads wait for it
            n = check_rc(lib.fl_hb_wait(self._live(), ms, self._out, self._BATCH))
            return self._collect(n)

    def poll(self) -> List[HeartbeatDeath]:
        """One non-blocking pass (for use with :meth:`fileno`)."""
        return self.wait(0)

    def _collect(self, n: int) -> List[HeartbeatDeath]:
        deaths: List[HeartbeatDeath] = []
        for k in range(n):
            e = self._out[k]
            if e.kind == lib.FL_HB_RTT_SAMPLE:
                self.rtt.append(RttSample(e.fd, e.rtt_us / 1e6))
                continue
            v = Verdict._from_c(e.verdict)
            if v.errno == _errno.EBADF and e.fd in self._stale:
                sock = self._stale.pop(e.fd, None)
            else:
                sock = self._socks.pop(e.fd, None)
            deaths.append(HeartbeatDeath(e.fd, v, e.silent_us / 1e6, sock))
        return deaths

    def stats(self) -> EngineStats:
        st = ffi.new("struct fl_hb_stats *")
        lib.fl_hb_get_stats(self._live(), st)
        return EngineStats(
            st.conns, st.pings_sent, st.pings_skipped, st.pongs_received,
            st.pings_answered, st.frames_received, st.bytes_received,
            st.timer_fires, st.wakeups, st.coalesced, st.deaths, st.rtt_dropped,
            st.late_max_us / 1e6,
            (st.late_sum_us / st.late_count / 1e6) if st.late_count else 0.0,
            st.tick_us / 1e6)

    def reset_stats(self) -> None:
        """Zero the counters of :meth:`stats` (for measuring a window)."""
        lib.fl_hb_reset_stats(self._live())

    def close(self) -> None:
        """Release the engine (the sockets stay open)."""
        with self._lock:
            if self._hb is not None:
                hb, self._hb = self._hb, None
                ffi.release(hb)
                self._socks.clear()

    def __enter__(self) -> HeartbeatEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

