"""An epoll Monitor: deaths arrive as events, so a wait costs O(events),
not O(connections).

``Monitor.add(sock)`` registers the socket once with the kernel for
EPOLLRDHUP | EPOLLERR | EPOLLHUP (never EPOLLIN: the application's data
does not wake it).  The kernel's ``tcp_poll`` raises those for the peer's
FIN (RDHUP), a reset or fully closed connection (HUP) and a pending error
(ERR: ECONNRESET, ETIMEDOUT from keepalive or TCP_USER_TIMEOUT, ICMP
unreachable).  ``add(sock, within=10)`` also arms the kernel's own timers
(:func:`~fastlive.keepalive.detect_within`): keepalive probes for an idle
connection, TCP_USER_TIMEOUT for one with data in flight, so a peer that
died silently turns into an ETIMEDOUT event within about 10 s.

:meth:`Monitor.wait` returns the connections that died since the last call
with the reason and errno; each registration is reported once and then
removed.  :meth:`Monitor.fileno` is the epoll fd: it is readable when a
death is waiting, so a Monitor nests in ``selectors`` or in asyncio
(``loop.add_reader(mon.fileno(), ...)``) and ``wait(0)`` collects.

Trigger mode: level-triggered with EPOLLONESHOT.  A death is a state, so
level-triggered never misses one that already happened before ``add`` or
while an earlier event was unread; ONESHOT makes the kernel report each
registration once (a hung-up socket stays "ready" forever, so plain
level-triggered would return it on every wait, and edge-triggered would
return it again on later wakeups such as the RST after a FIN).

Closed and reused fds - the rule: the kernel forgets a registration when
the socket's last fd is closed (silently: no event, ever), and the fd
number can come back as another socket.  The monitor remembers each
socket's identity (``SO_COOKIE``, a per-socket id the kernel does not
reuse; the socket inode where it is missing) and checks it whenever it acts
on an fd number: on ``add`` of a number it already holds, on ``remove``, on
every event, for every registration in :meth:`Monitor.verify`, and in an
audit that :meth:`Monitor.wait` runs itself: while registrations exist a
timerfd in the epoll set fires every 0.5 s and the wait that sees it checks
the next 1,024 registrations.  So a socket closed or replaced behind the
monitor's back is reported by ``wait()`` within 0.5 s x ceil(N / 1024)
(``verify()`` finds them all at once), as a death with status INVALID,
errno EBADF, ``Flag.BEHIND_BACK`` and ``behind_back=True`` - what every
engine reports for such a socket.  The new socket under the same number is
a separate registration.  Each registration's token (slot and generation)
is stored in the epoll event, so a late event for a removed registration is
recognised and dropped.  While a socket is registered the monitor holds a
reference to it, so the garbage collector does not close it.

Keys are only ever keys: ``remove(sock)`` takes the socket (or its fd
number) and ends that socket's registration; ``remove(key=k)`` ends the
registrations added with ``key=k``.  An int passed positionally is an fd.

What each observation means is decided by the one rule of the C core
(``fl_verdict_decide``): the peer's FIN is PEER_CLOSED, our own
``shutdown(SHUT_RD)`` is CLOSED with ``Flag.LOCAL_SHUTDOWN``.  A socket
that is listening, still connecting (SYN_SENT) or was never connected is
refused by :meth:`Monitor.add` (OSError EOPNOTSUPP / ENOTCONN): add a
connecting socket once ``connect()`` completed.

Signals (PEP 475): a signal during :meth:`Monitor.wait` runs its Python
handler at once; if the handler returns, the wait goes on for the time
left; if it raises, the exception propagates and no death is lost: deaths
stay queued in C until ``wait()`` has built its result, and the next
``wait()`` returns them.

Threads: one thread waits at a time; ``add``/``remove``/``verify`` never
wait behind it (the C mutex is never held across ``epoll_wait``).
:meth:`Monitor.close` wakes the waiter at once; every later call raises
ValueError("the monitor is closed").

fork(): the child shares the epoll set with its parent.  Every method of a
Monitor made in the parent raises RuntimeError in a forked child ("Monitor
was created in process X; a forked child must create its own"), without
touching the parent's epoll set or locks; ``close()`` there only closes the
child's copies of the monitor's fds.
"""
from __future__ import annotations

import os
import struct
import threading
import time
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from . import _registry
from ._lib import (EINTR_RC, FORKED_RC, SocketLike, check_rc, count, fd_of, ffi, forked_error,
                   lib, timeout_ms)
from .keepalive import Bound, detect_within
from .tcpstate import TcpState
from .verdict import Flag, Method, Status, Verdict

__all__ = ["Monitor", "Death"]

_BEHIND_BACK = lib.FL_F_BEHIND_BACK
_FLAG_MASK = 0
for _f in Flag:
    _FLAG_MASK |= int(_f)
_CLOSED = -lib.FL_E_CLOSED
_BUSY = -lib.FL_E_BUSY
# Enum members by value, looked up per death (an Enum call costs ~10x more).
_STATUS = {int(s): s for s in Status}
_METHOD = {int(m): m for m in Method}
_FLAGS: Dict[int, Flag] = {0: Flag.NONE}
_monotonic = time.monotonic
#: struct fl_death as the C compiler lays it out (checked at import)
_DEATH = struct.Struct("=Q7i4x")
_DEATH_SIZE = _DEATH.size
if _DEATH_SIZE != ffi.sizeof("struct fl_death") or ffi.offsetof("struct fl_death", "tcp_state") != 32:
    raise ImportError("struct fl_death's layout changed: update monitor._DEATH")


def _flag(bits: int) -> Flag:
    f = _FLAGS.get(bits)
    if f is None:
        f = _FLAGS[bits] = Flag(bits)
    return f


class Death(NamedTuple):
    """A connection the monitor saw die (or lose its fd).  Like every death
    in fastlive (:class:`~fastlive.Dead`, :class:`~fastlive.HeartbeatDeath`)
    it carries :attr:`verdict`."""

    fd: int            #: the fd number when it was added
    key: Any           #: ``key`` given to add(), else the socket itself
    status: Status
    errno: int
    method: Method     #: EPOLL; KEEPALIVE / USER_TIMEOUT for an armed timer
    flags: Flag = Flag.NONE
    behind_back: bool = False  #: fd closed or reused without remove()
    events: int = 0    #: the epoll event bits that reported it
    tcp_state: int = -1  #: TCP state when decided, -1 if unknown
    sock: Any = None   #: the socket (or fd) given to add()

    @property
    def verdict(self) -> Verdict:
        """This death as a :class:`Verdict`."""
        st = self.tcp_state
        return Verdict(self.status, self.method, self.errno,
                       TcpState.of(st) if st >= 0 else None, self.flags)


_NOKEY: Any = object()
_NSTATUS, _NMETHOD = lib.FL_COUNT_STATUSES, lib.FL_COUNT_METHODS


class _Counters(_registry.DeathCounters):
    """The registry's counters for a Monitor: the deaths by (status,
    method) are counted in C when the caller acknowledges them (so a death
    returned again after an interrupted wait() is counted once, and wait()
    pays nothing for it) and merged in by :meth:`snapshot`.  Epoll does not
    say when a peer died: no detection times."""

    __slots__ = ("_mon",)

    def __init__(self, mon: Any) -> None:
        super().__init__()
        self._mon = mon

    def snapshot(self) -> Tuple[Dict[Tuple[int, int], int], List[int], float, int]:
        deaths, buckets, total, timed = super().snapshot()
        counts = ffi.new("uint64_t[]", _NSTATUS * _NMETHOD)
        lib.fl_monitor_counts(self._mon, counts)
        for i in range(_NSTATUS * _NMETHOD):
            if counts[i]:
                key = (i // _NMETHOD, i % _NMETHOD)
                deaths[key] = deaths.get(key, 0) + int(counts[i])
        return deaths, buckets, total, timed


class Monitor:
    """Watch many connections for death with one epoll set.

    One thread may sleep in :meth:`wait` while others :meth:`add`,
    :meth:`remove` or :meth:`verify` (epoll allows that, and the monitor's
    tables are locked for the short moments they change, never during the
    sleep); a second thread calling :meth:`wait` at the same time gets
    RuntimeError.  ``max_events`` (1..65536) is the size of the fixed event
    array filled per ``epoll_wait`` and the most deaths one ``wait()``
    returns; more are returned by the next calls.
    """

    __slots__ = ("_m", "_max", "_out", "_buf", "_tok", "_ack", "_reg", "_lock", "_cwait", "_cpoll", "_abort",
                 "_handed", "_closed", "_pid", "counters", "__weakref__")

    def __init__(self, max_events: int = 256) -> None:
        self._closed = True
        max_events = count("max_events", max_events, 1, 65536)
        ptr = ffi.new("struct fl_monitor **")
        check_rc(lib.fl_monitor_new(max_events, ptr))
        self._m: Any = ffi.gc(ptr[0], lib.fl_monitor_free)
        self._max = max_events
        self._out = ffi.new("struct fl_death[]", max_events)
        self._buf = ffi.buffer(self._out)
        self._tok = ffi.new("uint64_t *")
        self._ack = lib.fl_monitor_ack_cell(self._m)
        self._reg: Dict[int, Tuple[int, Any, SocketLike]] = {}
        self._lock = threading.Lock()      # _reg against add/remove/verify/close
        self._cwait = lib.fl_monitor_wait
        self._cpoll = lib.fl_monitor_poll
        lib.fl_monitor_set_out(self._m, self._out, max_events)
        self._abort = lib.fl_monitor_abort
        # tokens of the deaths the last wait() returned
        self._handed: Optional[List[int]] = None
        self._pid = os.getpid()
        self._closed = False
        self.counters: _registry.DeathCounters = _Counters(self._m)
        _registry.track(self)

    # -- errors ---------------------------------------------------------------

    def _fail(self, rc: int) -> Any:
        if rc == _CLOSED:
            raise ValueError("the monitor is closed")
        if rc == FORKED_RC:
            raise forked_error("Monitor", self._pid)
        if rc == _BUSY:
            raise RuntimeError("another thread is already in Monitor.wait()")
        return check_rc(rc)

    def _usable(self) -> Any:
        """The C monitor, after the checks every method but wait() makes
        in Python (wait() leaves them to C, on its fast path)."""
        if self._closed:
            raise ValueError("the monitor is closed")
        m = self._m
        if lib.fl_monitor_forked(m):
            raise forked_error("Monitor", self._pid)
        return m

    # -- registrations ------------------------------------------------------------

    def add(self, sock: SocketLike, within: Optional[float] = None, *,
            key: Any = None) -> Optional[Bound]:
        """Watch ``sock`` (a connected TCP socket or its fd).

        ``within`` (seconds, >= 2) also arms keepalive and TCP_USER_TIMEOUT
        so that a silent death is reported within that bound; the
        :class:`~fastlive.keepalive.Bound` achieved is returned.  ``key``
        is handed back in the :class:`Death` (default: ``sock``).  Adding a
        socket already watched only updates its key.  OSError for a bad fd
        (EBADF), a non-TCP socket (EOPNOTSUPP, ENOTSOCK), a listening one
        (EOPNOTSUPP), or one not connected yet or never (ENOTCONN).  Never
        waits behind a thread sleeping in :meth:`wait`.
        """
        fd = fd_of(sock)
        m = self._usable()
        with self._lock:
            bound = detect_within(fd, within) if within is not None else None
            rc = lib.fl_monitor_add(m, fd, within is not None, self._tok)
            if rc < 0:
                self._fail(rc)
            token = int(self._tok[0])
            if rc == 0 and key is None and token in self._reg:
                key = self._reg[token][1]
            self._reg[token] = (fd, sock if key is None else key, sock)
            return bound

    def _token_for(self, m: Any, sock: SocketLike) -> int:
        try:
            fd = fd_of(sock)
        except TypeError:
            raise TypeError(f"expected a socket or an fd number, got {type(sock).__name__}; "
                            "use remove(key=...) to remove by key") from None
        if fd >= 0:
            return int(lib.fl_monitor_token_of(m, fd))
        for tok, (_fd, _key, obj) in list(self._reg.items()):   # a closed socket: scan
            if obj is sock:
                return tok
        return 0

    def remove(self, sock: Optional[SocketLike] = None, *, key: Any = _NOKEY) -> bool:
        """Stop watching: ``remove(sock)`` ends the registration of that
        socket (a socket object or its fd number: an int is always an fd);
        ``remove(key=k)`` ends every registration added with ``key=k``.
        Returns False when nothing was watched (or its death was already
        reported)."""
        if (sock is None) == (key is _NOKEY):
            raise TypeError("remove() takes a socket (or fd number) or key=..., exactly one")
        m = self._usable()
        with self._lock:
            if key is _NOKEY:
                toks = [self._token_for(m, sock)]   # type: ignore[arg-type]
            else:
                toks = [t for t, (_fd, k, _o) in list(self._reg.items()) if k is key or k == key]
            done = False
            for tok in toks:
                if tok and lib.fl_monitor_remove(m, tok) == 0:
                    self._reg.pop(tok, None)
                    done = True
            return done

    # -- wait ------------------------------------------------------------------------

    def wait(self, timeout: float = 0.0) -> List[Death]:
        """The connections that died since the last call, waiting up to
        ``timeout`` seconds (0, the default: just look) for the first.  Each
        is reported once and no longer watched afterwards.

        ``timeout`` is validated like every fastlive timeout (a number of
        seconds, 0 .. 24.8 days; TypeError/ValueError otherwise).  A signal
        runs its handler at once; the wait goes on for the time left if it
        returns, and its exception propagates if it raises, with no death
        lost.  Returns early (possibly empty) when :meth:`close` is called
        from another thread; raises ValueError once closed, RuntimeError in
        a forked child or while another thread waits."""
        m, cls = self._m, timeout.__class__
        try:
            if (cls is float or cls is int) and not timeout and self._handed is None:
                n = self._cpoll(m)          # wait(0): one C call, one argument
                if not n:
                    return []
                if n < 0:
                    n = self._again(m, 0, 0.0, n)
                    if not n:
                        return []
            else:
                n = self._wait_slow(m, timeout)
                if not n:
                    return []
            out, toks = self._deaths(n)
        except BaseException:
            self._abort(m)               # the deaths stay queued for the next wait()
            raise
        # Plain stores and no call from here on: no signal handler can run
        # between the ack and the return, so no death is acked and lost.
        self._handed = toks
        self._ack[0] = n
        return out

    def _wait_slow(self, m: Any, timeout: object) -> int:
        """wait() with a timeout, or after deaths were returned: validate,
        forget the last deaths' entries, call C, handle -EINTR."""
        cls = timeout.__class__
        ms = 0 if (cls is float or cls is int) and not timeout else timeout_ms(timeout)
        t0 = _monotonic() if ms else 0.0
        if self._handed:
            self._forget()
        n = self._cwait(m, ms, self._out, self._max)
        return n if n >= 0 else self._again(m, ms, t0, n)

    def _again(self, m: Any, ms: int, t0: float, rc: int) -> int:
        """The rare returns of the C wait: -EINTR (the signal's handler
        already ran when the call returned; it did not raise, so wait the
        time left), or an error to raise."""
        while rc == EINTR_RC:
            left = t0 + ms / 1000.0 - _monotonic() if ms else 0.0
            rc = self._cwait(m, min(ms, int(left * 1000.0) + 1) if left > 0 else 0,
                             self._out, self._max)
        return rc if rc >= 0 else int(self._fail(rc))

    def _deaths(self, n: int) -> Tuple[List[Death], List[int]]:
        """Death objects for the first n entries of the out array (the
        registrations stay in ``_reg`` until the next wait: if this is
        interrupted, the same deaths come again, keys and all).  The array
        is read in one pass of struct.iter_unpack (a cffi field access per
        value would cost more than the rest together)."""
        out: List[Death] = []
        toks: List[int] = []
        reg, new, flags = self._reg, tuple.__new__, _FLAGS
        for tok, fd, st, err, mth, fl, ev, tcp in _DEATH.iter_unpack(self._buf[:n * _DEATH_SIZE]):
            entry = reg.get(tok)
            if entry is None:
                entry = self._late(tok, fd)
            f = fl & _FLAG_MASK
            out.append(new(Death, (entry[0], entry[1], _STATUS[st], err, _METHOD[mth],
                                   flags.get(f) or _flag(f), fl & _BEHIND_BACK != 0, ev, tcp,
                                   entry[2])))
            toks.append(tok)
        return out, toks

    def _late(self, tok: int, fd: int) -> Tuple[int, Any, Any]:
        """A death whose add() is still storing its entry: wait for it."""
        with self._lock:
            return self._reg.get(tok, (fd, None, None))

    def _forget(self) -> None:
        """The deaths the last wait() returned reached the caller: drop
        their registrations' entries."""
        toks, pop = self._handed, self._reg.pop
        self._handed = None
        if toks:
            for tok in toks:
                pop(tok, None)

    def verify(self) -> int:
        """Check every registration's socket identity (O(N) syscalls) and
        queue a death for each fd closed or reused behind the monitor's
        back; they are returned by the next :meth:`wait` (which the
        monitor's fd then wakes).  Returns how many were found.
        :meth:`wait` runs the same check itself, a slice at a time."""
        m = self._usable()
        with self._lock:
            rc = lib.fl_monitor_verify(m)
            return rc if rc >= 0 else int(self._fail(rc))

    # -- the rest of the contract ----------------------------------------------------

    def __len__(self) -> int:
        """Registrations being watched (0 once closed)."""
        if self._closed:
            return 0
        rc = lib.fl_monitor_count(self._m)
        return rc if rc >= 0 else int(self._fail(rc))

    def __contains__(self, sock: SocketLike) -> bool:
        """Whether the socket (or the socket an fd number names) is watched."""
        if self._closed:
            return False
        m = self._usable()
        with self._lock:
            return self._token_for(m, sock) != 0

    def fileno(self) -> int:
        """The epoll fd: readable when :meth:`wait` has something to return
        (and, while sockets are registered, every 0.5 s for the behind-back
        audit; that ``wait(0)`` may return ``[]``)."""
        return int(lib.fl_monitor_fileno(self._usable()))

    def close(self) -> None:
        """Close the epoll set (the watched sockets stay open).  A thread
        sleeping in :meth:`wait` is woken at once and returns what it has;
        every later call raises ValueError.  Closing twice is fine.  In a
        forked child this only closes the child's copies of the monitor's
        fds (the parent's epoll set and locks are not touched)."""
        if self._closed:
            return
        self._closed = True
        m = self._m
        if self._handed:
            self._forget()
        if lib.fl_monitor_forked(m):
            lib.fl_monitor_close(m)
            self._reg = {}
            return
        lib.fl_monitor_close(m)
        with self._lock:
            self._reg.clear()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran (and in a forked child, where the
        monitor cannot be used)."""
        return self._closed or bool(lib.fl_monitor_forked(self._m))

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._closed:
            return "<Monitor closed>"
        if lib.fl_monitor_forked(self._m):
            return f"<Monitor of process {self._pid}, unusable in this forked child>"
        return (f"<Monitor fd={lib.fl_monitor_fileno(self._m)} watching={len(self)} "
                f"max_events={self._max}>")
