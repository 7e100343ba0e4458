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
the socket's last fd is closed, and the fd number can come back as another
socket.  The monitor remembers each socket's identity (``SO_COOKIE``, a
per-socket id the kernel does not reuse; the fstat inode where it is
missing) and checks it whenever it acts on an fd number: on ``add`` of a
number it already holds, on ``remove``, on every event, and for every
registration in :meth:`Monitor.verify` (the O(N) scan to run now and then
when sockets may be closed without ``remove``).  A socket closed or replaced
behind its back is reported once, as a death with status CLOSED, errno
EBADF and ``behind_back=True``; the new socket under the same number is a
separate registration.  Each registration's token (slot and generation) is
stored in the epoll event, so a late event for a removed registration is
recognised and dropped.  While a socket is registered the monitor holds a
reference to it, so the garbage collector does not close it.
"""
from __future__ import annotations

import threading
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from ._lib import SocketLike, check_rc, fd_of, ffi, lib, timeout_ms
from .keepalive import Bound, detect_within
from .verdict import Flag, Method, Status

__all__ = ["Monitor", "Death"]

_BEHIND_BACK = lib.FL_F_BEHIND_BACK
_FLAG_MASK = 0xFF
# Enum members by value, looked up per death (an Enum call costs ~10x more).
_STATUS = {int(s): s for s in Status}
_METHOD = {int(m): m for m in Method}
_FLAGS = {i: Flag(i) for i in range(_FLAG_MASK + 1)}


class Death(NamedTuple):
    """A connection the monitor saw die (or lose its fd)."""

    fd: int            #: the fd number when it was added
    key: Any           #: ``key`` given to add(), else the socket itself
    status: Status
    errno: int
    method: Method     #: EPOLL; KEEPALIVE / USER_TIMEOUT for an armed timer
    flags: Flag = Flag.NONE
    behind_back: bool = False  #: fd closed or reused without remove()
    events: int = 0    #: the epoll event bits that reported it


class Monitor:
    """Watch many connections for death with one epoll set.

    One thread may sleep in :meth:`wait` while others :meth:`add`,
    :meth:`remove` or :meth:`verify` (epoll allows that, and the monitor's
    tables are locked for the short moments they change, never during the
    sleep); a second thread calling :meth:`wait` at the same time gets
    RuntimeError.  ``max_events`` is the size of the fixed event array
    filled per ``epoll_wait``; more deaths than that are collected by
    looping.
    """

    def __init__(self, max_events: int = 256) -> None:
        self._m: Any = None
        ptr = ffi.new("struct fl_monitor **")
        check_rc(lib.fl_monitor_new(max_events, ptr))
        self._m = ffi.gc(ptr[0], lib.fl_monitor_free)
        self._max = max_events
        self._out = ffi.new("struct fl_death[]", max_events)
        self._tok = ffi.new("uint64_t *")
        self._reg: Dict[int, Tuple[int, Any, SocketLike]] = {}
        self._lock = threading.Lock()      # _reg and add/remove/verify
        self._waiting = threading.Lock()   # the one waiter
        self._wait = lib.fl_monitor_wait

    def _live(self) -> Any:
        m = self._m
        if m is None:
            raise ValueError("the monitor is closed")
        return m

    def add(self, sock: SocketLike, within: Optional[float] = None, *,
            key: Any = None) -> Optional[Bound]:
        """Watch ``sock`` (a connected TCP socket or its fd).

        ``within`` (seconds, >= 2) also arms keepalive and TCP_USER_TIMEOUT
        so that a silent death is reported within that bound; the
        :class:`~fastlive.keepalive.Bound` achieved is returned.  ``key``
        is handed back in the :class:`Death` (default: ``sock``).  Adding a
        socket already watched only updates its key.  OSError for a bad fd,
        a non-TCP socket (EOPNOTSUPP, ENOTSOCK) or a listening one.
        """
        fd = fd_of(sock)
        with self._lock:
            m = self._live()
            bound = detect_within(fd, within) if within is not None else None
            rc = check_rc(lib.fl_monitor_add(m, fd, within is not None, self._tok))
            token = int(self._tok[0])
            if rc == 0 and token in self._reg and key is None:
                key = self._reg[token][1]
            self._reg[token] = (fd, sock if key is None else key, sock)
            return bound

    def _token_for(self, m: Any, what: Any) -> int:
        if isinstance(what, int) and not isinstance(what, bool):
            return int(lib.fl_monitor_token_of(m, what))
        try:
            fd = fd_of(what)
        except TypeError:
            fd = -1
        if fd >= 0:
            tok = int(lib.fl_monitor_token_of(m, fd))
            if tok:
                return tok
        for tok, (_fd, key, obj) in self._reg.items():   # closed socket, key: scan
            if obj is what or key is what:
                return tok
        return 0

    def remove(self, what: Any) -> bool:
        """Stop watching a socket (by the socket, its fd or its key).
        Returns False when it was not watched (or its death was already
        reported)."""
        with self._lock:
            m = self._live()
            tok = self._token_for(m, what)
            if not tok or lib.fl_monitor_remove(m, tok) < 0:
                return False
            self._reg.pop(tok, None)
            return True

    def wait(self, timeout: float = 0.0) -> List[Death]:
        """The connections that died since the last call, waiting up to
        ``timeout`` seconds (0: just look) for the first.  Each is reported
        once and no longer watched afterwards.  Returns early (possibly
        empty) when :meth:`close` is called from another thread."""
        ms = timeout_ms(timeout)
        if not self._waiting.acquire(blocking=False):
            raise RuntimeError("another thread is already in Monitor.wait()")
        try:
            n = self._wait(self._live(), ms, self._out, self._max)
            if n == 0:
                return []
            if n < 0:
                check_rc(n)
            out = []
            with self._lock:
                reg, new = self._reg, tuple.__new__
                for i in range(n):
                    d = self._out[i]
                    fl = d.flags
                    fd, key, _obj = reg.pop(d.token, (d.fd, None, None))
                    out.append(new(Death, (fd, key, _STATUS[d.status], d.err,
                                           _METHOD[d.method], _FLAGS[fl & _FLAG_MASK],
                                           bool(fl & _BEHIND_BACK), d.events)))
            return out
        finally:
            self._waiting.release()

    def verify(self) -> int:
        """Check every registration's socket identity (O(N) syscalls) and
        queue a death for each fd closed or reused behind the monitor's
        back; they are returned by the next :meth:`wait` (which the
        monitor's fd then wakes).  Returns how many were found."""
        with self._lock:
            return check_rc(lib.fl_monitor_verify(self._live()))

    def __len__(self) -> int:
        """Registrations being watched."""
        with self._lock:
            m = self._m
            return 0 if m is None else int(lib.fl_monitor_count(m))

    def __contains__(self, what: Any) -> bool:
        with self._lock:
            m = self._m
            return m is not None and self._token_for(m, what) != 0

    def fileno(self) -> int:
        """The epoll fd: readable when :meth:`wait` has something to return."""
        return int(lib.fl_monitor_fileno(self._live()))

    def close(self) -> None:
        """Close the epoll set (the watched sockets stay open).  A thread
        sleeping in :meth:`wait` is woken and returns first."""
        m = self._m
        if m is None:
            return
        lib.fl_monitor_wake(m)
        with self._waiting, self._lock:
            if self._m is None:
                return
            self._m = None
            self._reg.clear()
            ffi.release(m)

    @property
    def closed(self) -> bool:
        return self._m is None

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._m is None:
            return "<Monitor closed>"
        return f"<Monitor fd={self.fileno()} watching={len(self)}>"
