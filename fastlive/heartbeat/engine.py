"""The C heartbeat engine: PING/PONG for thousands of connections from one
epoll set and one timing wheel, run by a native thread of its own (method
6; see the package docstring and docs/heartbeat.md)."""
from __future__ import annotations

import errno as _errno
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Deque, Dict, List, Optional, Tuple

from .. import _registry
from .._lib import (FORKED_RC, SocketLike, check_rc, count, fd_of, ffi, forked_error, lib,
                   timeout_ms, to_units)
from ..verdict import Verdict

__all__ = ["HeartbeatDeath", "RttSample", "EngineStats", "HeartbeatEngine"]


@dataclass(frozen=True)
class HeartbeatDeath:
    """A connection the engine gave up on (it no longer watches it; the
    socket stays open and is the caller's to close)."""

    fd: int                  #: the fd number the socket had when it was added
    verdict: Verdict         #: why: a PING went unanswered, FIN, RST, a bad frame...
    silent: float            #: seconds since anything was last heard
    sock: Optional[SocketLike] = None   #: the object given to add() (that registration's)
    detected: float = 0.0    #: time.monotonic() when the engine found it


@dataclass(frozen=True)
class RttSample:
    """One PING's round trip (connections added with ``rtt=True``)."""

    fd: int
    rtt: float               #: seconds from PING sent to PONG read
    sock: Optional[SocketLike] = None


@dataclass(frozen=True)
class EngineStats:
    """The engine's counters since it started (or :meth:`HeartbeatEngine.reset_stats`)."""

    conns: int               #: registrations watched now
    queued: int              #: deaths found and not yet collected
    pings_sent: int
    pings_skipped: int       #: a PING was due but the send queue was full (or, shared, not empty)
    pongs_received: int
    pings_answered: int      #: the peer's PINGs this end answered
    misses: int              #: PINGs with no answer before the next PING or the death
    withheld: int            #: PINGs/PONGs not sent because the application made no progress
    graced: int              #: deaths put off because this engine's own PING went out late
    frames_received: int
    bytes_received: int
    timer_fires: int         #: deadlines served
    wakeups: int             #: epoll_wait returns of the engine thread
    coalesced: int           #: sleeps to a due tick instead of an epoll_wait per event
    deaths: int
    rtt_dropped: int         #: RTT samples lost because the ring was full
    rtt_buckets: Tuple[Tuple[float, int], ...]  #: (upper bound s, count) per bucket, +inf last
    rtt_sum: float           #: seconds, sum of all RTTs in the histogram
    late_max: float          #: seconds, deadline tick -> handled (worst)
    late_mean: float
    tick: float

    @property
    def rtt_count(self) -> int:
        """PONGs in the RTT histogram."""
        return sum(n for _, n in self.rtt_buckets)


_RTT_BOUNDS: Tuple[float, ...] = tuple(
    (b / 1e6 if b >= 0 else float("inf"))
    for b in (int(lib.fl_hb_rtt_bound(i)) for i in range(lib.FL_HB_RTT_BUCKETS)))


def _check_schedule(interval: object, misses: object) -> Tuple[int, int]:
    """interval (seconds, > 0) in ms rounded up, misses in 2..1000."""
    ms = to_units("interval", interval, 1e-3, positive=True)
    return ms, count("misses", misses, 2, 1000)


class HeartbeatEngine:
    """Heartbeats for many TCP connections, run by a native thread.

    The engine's own thread (C, no GIL, all signals blocked) sends the PINGs,
    answers the peers' PINGs, reads and keeps every deadline, whatever the
    application's Python does: a GC pause, a slow request or a busy loop
    holding the GIL does not make a healthy peer look dead, and does not make
    this end look dead to its peers.  Deaths wait in a queue in C until
    :meth:`wait` or :meth:`poll` collects them; :meth:`fileno` (an eventfd) is
    readable while deaths are queued, for use inside another event loop.

    ``tick`` is the timer granularity: a deadline is served at the first
    tick boundary at or after it, and while deadlines are due every tick
    the thread sleeps to the boundary and harvests all readiness in one
    pass (FIN/RST are then reported up to one tick later).

    Thread-safe: add(), remove(), wait() and close() may be called from any
    thread.  Not usable in a forked child (RuntimeError there; the engine
    thread exists only in the parent): create a new engine in the child.
    """

    _BATCH = 256

    def __init__(self, tick: float = 0.01, capacity: int = 1024,
                 rtt_samples: int = 4096) -> None:
        tick_ms = to_units("tick", tick, 1e-3, positive=True, maximum=1.0)
        capacity = count("capacity", capacity, 0, 1 << 24)
        rtt_samples = count("rtt_samples", rtt_samples, 1, 1 << 24)
        pp = ffi.new("struct fl_hb **")
        check_rc(lib.fl_hb_new(tick_ms, capacity, pp))
        self._hb: Any = ffi.gc(pp[0], lib.fl_hb_free)
        self._pid = os.getpid()
        self._out = ffi.new("struct fl_hb_event[]", self._BATCH)
        self._consumed = ffi.new("int *")
        self._token = ffi.new("uint64_t *")
        # token -> (fd, socket object); fd -> token of the registration now
        # holding that number.  Both change only under _lock.
        self._reg: Dict[int, Tuple[int, SocketLike]] = {}
        self._by_fd: Dict[int, int] = {}
        self._lock = threading.Lock()
        # deaths taken from C but not yet handed to a caller (a signal
        # handler raised in between): the next wait() returns them first
        self._carry: List[HeartbeatDeath] = []
        self._forgetting: List[Tuple[int, HeartbeatDeath]] = []
        self.rtt: Deque[RttSample] = deque(maxlen=rtt_samples)
        #: deaths by (status, method) and detection times, for the exporters
        self.counters = _registry.DeathCounters()
        _registry.track(self)

    # ---- lifecycle ------------------------------------------------------

    def _live(self) -> Any:
        hb = self._hb
        if os.getpid() != self._pid:
            # the engine thread runs only in the parent; nothing is touched
            raise forked_error("this HeartbeatEngine", self._pid)
        if hb is None:
            raise ValueError("the engine is closed")
        return hb

    def _rc(self, rc: int) -> int:
        if rc == -_errno.ESHUTDOWN:
            raise ValueError("the engine is closed")
        if rc == FORKED_RC:
            raise forked_error("this HeartbeatEngine", self._pid)
        return check_rc(rc)

    def close(self) -> None:
        """Stop the engine thread and wake every thread in :meth:`wait` at
        once (they raise ValueError); the sockets stay open and are the
        caller's.  Deaths not yet collected are dropped.  In a forked child
        close() only forgets the parent's engine (it touches nothing)."""
        hb = self._hb
        if hb is None:
            return
        if os.getpid() != self._pid:
            self._hb = None       # the child's copy is freed by ffi.gc, parent untouched
            return
        lib.fl_hb_close(hb)       # joins the thread (GIL released); waiters wake
        with self._lock:
            self._hb = None
            self._reg.clear()
            self._by_fd.clear()
        # memory goes when the last waiter drops its reference (ffi.gc)

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._hb is None

    def __enter__(self) -> HeartbeatEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._hb is None:
            return "<HeartbeatEngine closed>"
        if os.getpid() != self._pid:
            return f"<HeartbeatEngine of parent process {self._pid}>"
        st = self.stats()
        return (f"<HeartbeatEngine fd={self.fileno()} watching={st.conns} "
                f"deaths_queued={st.queued} tick={st.tick:g}s>")

    def fileno(self) -> int:
        """The engine's eventfd: readable while deaths wait to be collected
        with :meth:`poll` (and for good once the engine is closed)."""
        return self._rc(int(lib.fl_hb_fileno(self._live())))

    # ---- registrations --------------------------------------------------

    def add(self, sock: SocketLike, interval: float = 1.0, misses: int = 3, *,
            shared: bool = False, rtt: bool = False, progress: Optional[float] = None) -> None:
        """Watch ``sock`` (a connected TCP socket or fd): PING it after
        ``interval`` seconds of silence, report it dead after ``misses *
        interval`` seconds without a byte.

        ``shared=False``: the engine owns the read side; every byte must be
        a heartbeat frame.  ``shared=True``: the application reads; see the
        module docstring for its duties.  ``rtt=True`` queues an
        :class:`RttSample` per PONG in :attr:`rtt`.  ``progress`` (seconds):
        the engine vouches for this end (answers and sends PINGs) only while
        the application calls :meth:`progress` at least that often; see
        docs/heartbeat.md.  Keep the socket open until it is removed or
        reported dead.  A socket closed behind the engine's back is never
        written to or read (its SO_COOKIE is checked before each PING and
        read); its registration dies INVALID (EBADF) and a new socket with
        the same fd number can be added at once.
        """
        ms, misses = _check_schedule(interval, misses)
        pms = 0 if progress is None else to_units("progress", progress, 1e-3, positive=True)
        if not isinstance(shared, bool) or not isinstance(rtt, bool):
            raise TypeError("shared and rtt must be bool")
        fd = fd_of(sock)
        flags = (lib.FL_HB_SHARED if shared else 0) | (lib.FL_HB_RTT if rtt else 0)
        hb = self._live()
        with self._lock:
            self._rc(lib.fl_hb_add(hb, fd, ms, misses, flags, pms, self._token))
            tok = int(self._token[0])
            self._reg[tok] = (fd, sock)
            self._by_fd[fd] = tok

    def _token_of(self, sock: SocketLike) -> Optional[int]:
        fd = fd_of(sock)
        tok = self._by_fd.get(fd) if fd >= 0 else None
        if tok is not None and (isinstance(sock, int) or self._reg[tok][1] is sock):
            return tok
        if isinstance(sock, int):
            return None
        # a closed socket object (fileno() -1) or one whose number was taken
        # over: find it by identity
        return next((t for t, (_fd, s) in self._reg.items() if s is sock), None)

    def remove(self, sock: SocketLike) -> bool:
        """Stop watching ``sock``; False if it was not watched (or its death
        was already collected).  Call it before closing the socket.  A socket
        object that is already closed is still found, by identity; a death
        of it not yet collected is dropped."""
        hb = self._live()
        with self._lock:
            tok = self._token_of(sock)
            if tok is None:
                return False
            rc = lib.fl_hb_remove(hb, tok)
            fd, _ = self._reg.pop(tok)
            if self._by_fd.get(fd) == tok:
                del self._by_fd[fd]
        if rc == -_errno.ENOENT:
            return False
        self._rc(rc)
        return True

    def __len__(self) -> int:
        """Registrations watched (deaths not yet collected included)."""
        return len(self._reg)

    def __contains__(self, sock: SocketLike) -> bool:
        """Whether ``sock`` (that object, or that fd number) is registered."""
        with self._lock:
            return self._token_of(sock) is not None

    # ---- collecting -----------------------------------------------------

    def wait(self, timeout: float = 0.0) -> List[HeartbeatDeath]:
        """The connections found dead since the last call, waiting up to
        ``timeout`` seconds (0: just look) for the first.  The engine runs
        all the time in its own thread; wait() only collects.  A signal
        gives control back at once: the handler runs, and wait() goes on
        with the remaining time if it returns, or raises what it raises
        (no death is lost: they stay queued for the next call).  Raises
        ValueError once :meth:`close` is called, also from another thread."""
        ms = timeout_ms(timeout)
        hb = self._live()
        end = time.monotonic() + ms / 1000.0
        while True:
            deaths = self._collect(hb)
            if deaths:
                return deaths
            left = end - time.monotonic()
            if left <= 0:
                return []
            rc = lib.fl_hb_ready(hb, max(1, int(-(-left * 1000 // 1))))
            if rc == -_errno.EINTR:
                continue        # the handler runs here; raise or retry with what is left
            self._rc(rc)

    def poll(self) -> List[HeartbeatDeath]:
        """The deaths queued now, without waiting (for use with :meth:`fileno`)."""
        return self.wait(0.0)

    def progress(self) -> None:
        """Tell the engine the application makes progress (see ``progress``
        in :meth:`add`); one atomic store, no lock, no syscall but the clock."""
        lib.fl_hb_progress(self._live())

    def _collect(self, hb: Any) -> List[HeartbeatDeath]:
        with self._lock:
            if not self._carry:
                self._take_rtt(hb)
                n = self._rc(lib.fl_hb_peek(hb, self._out, self._BATCH, self._consumed))
                k = self._consumed[0]
                if k == 0:
                    return []
                toks, deaths = self._build(n)
                # From the commit on, the deaths live in self._carry until a
                # caller has them: a signal handler raising after the commit
                # (CPython runs handlers only between bytecodes that check
                # for them, e.g. right after a call) cannot lose them.
                self._forgetting = list(zip(toks, deaths))
                self._carry = deaths
                self._rc(lib.fl_hb_commit(hb, k))
            # idempotent, so a raise half-way is finished by the next call
            pend = self._forgetting
            while pend:
                self._forget(*pend[-1])
                pend.pop()
        # no handler can run between these two stores: a death is handed out once
        out = self._carry
        self._carry = []
        return out

    def _build(self, n: int) -> Tuple[List[int], List[HeartbeatDeath]]:
        # reads only: nothing changes until the commit
        toks: List[int] = []
        out: List[HeartbeatDeath] = []
        reg = self._reg
        for k in range(n):
            e = self._out[k]
            tok = int(e.token)
            fd, sock = reg.get(tok, (e.fd, None))
            toks.append(tok)
            out.append(HeartbeatDeath(fd, Verdict._from_c(e.verdict), e.silent_us / 1e6, sock,
                                      e.detected_us / 1e6))
        return toks, out

    def _forget(self, tok: int, d: HeartbeatDeath) -> None:
        # under _lock, once the death is committed: the registration is gone
        if self._reg.pop(tok, None) is None:
            return
        if self._by_fd.get(d.fd) == tok:
            del self._by_fd[d.fd]
        self.counters.record(int(d.verdict.status), int(d.verdict.method), d.silent)

    def _take_rtt(self, hb: Any) -> None:
        n = lib.fl_hb_rtt(hb, self._out, self._BATCH)
        for k in range(max(0, n)):
            e = self._out[k]
            entry = self._reg.get(int(e.token))
            self.rtt.append(RttSample(e.fd, e.rtt_us / 1e6, entry[1] if entry else None))

    # ---- counters -------------------------------------------------------

    def stats(self) -> EngineStats:
        """A consistent snapshot of the engine's counters (taken under its mutex)."""
        st = ffi.new("struct fl_hb_stats *")
        self._rc(lib.fl_hb_get_stats(self._live(), st))
        buckets = tuple((b, int(st.rtt_hist[i])) for i, b in enumerate(_RTT_BOUNDS))
        return EngineStats(
            st.conns, st.queued, st.pings_sent, st.pings_skipped, st.pongs_received,
            st.pings_answered, st.misses, st.withheld, st.graced, st.frames_received, st.bytes_received,
            st.timer_fires, st.wakeups, st.coalesced, st.deaths, st.rtt_dropped,
            buckets, st.rtt_sum_us / 1e6, st.late_max_us / 1e6,
            (st.late_sum_us / st.late_count / 1e6) if st.late_count else 0.0,
            st.tick_us / 1e6)

    def reset_stats(self) -> None:
        """Zero the counters of :meth:`stats` (for measuring a window)."""
        self._rc(lib.fl_hb_reset_stats(self._live()))

