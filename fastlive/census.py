"""A census of the machine's TCP sockets: one netlink dump, filtered in the kernel.

:func:`census` asks the kernel's ``sock_diag`` interface (``NETLINK_SOCK_DIAG``,
``SOCK_DIAG_BY_FAMILY`` with ``struct inet_diag_req_v2``) for every TCP socket
of this network namespace, IPv4 and IPv6, each with its ``struct tcp_info``
(``INET_DIAG_INFO``).  The kernel walks its TCP hash tables once and streams
the answer in ~32 KiB datagrams; the C core reads them into one reused buffer
and keeps the results as compact C records (:class:`Census`), so no Python
object exists for a socket until it is looked at.

Filters run in the kernel: ``states`` becomes the request's state bit mask
(``idiag_states``) and ``port`` a bytecode program (``INET_DIAG_REQ_BYTECODE``)
that the kernel runs per socket before building its message; a socket that
does not match costs the table walk only.

What a non-root user sees: the dump is not restricted - every socket of the
namespace, of every user, with its ``tcp_info`` (the kernel keeps only the
socket mark and class id for ``CAP_NET_ADMIN``).  TIME_WAIT and request
(SYN_RECV) sockets come without ``tcp_info`` and with inode 0.

:func:`census_follow` is the death log: a netlink socket bound to the
``SKNLGRP_INET_TCP_DESTROY`` / ``SKNLGRP_INET6_TCP_DESTROY`` groups receives one
message as the kernel frees each full TCP socket, with its final state and
``tcp_info``.  Binding needs no privilege (sock_diag's netlink family sets
``NL_CFG_F_NONROOT_RECV``).  Events that overflow the socket's receive queue
are lost (the kernel reports ENOBUFS); :attr:`Follow.lost` counts them.
"""
from __future__ import annotations

import enum
import errno
import socket
import threading
import time
from typing import (Any, Dict, Iterable, Iterator, List, Optional, Sequence,
                    Tuple, Union, overload)

from ._lib import check_rc, count, ffi, lib, seconds, timeout_ms
from .tcpinfo import TcpInfo
from .tcpstate import TcpState

__all__ = ["census", "census_follow", "Census", "CensusEntry", "Follow", "Timer",
           "parse_states", "ALL_STATES", "WHY", "why_names"]

_REC = "struct fl_census_rec"
_REC_SIZE: int = ffi.sizeof(_REC)
_INFO_OFF: int = ffi.offsetof(_REC, "info")
#: Every TCP state, as census(states=...) takes them.
ALL_STATES: Tuple[TcpState, ...] = tuple(TcpState)
_STATE = {int(s): s for s in TcpState}
_NTOP = socket.inet_ntop
_OFF_FAMILY: int = ffi.offsetof(_REC, "family")
_OFF_STATE: int = ffi.offsetof(_REC, "state")
_OFF_DST: int = ffi.offsetof(_REC, "dst")

#: Why a socket looks dead or suspect: bit -> name (fl_census_why in C).
WHY: Dict[int, str] = {
    1: "close-wait",       # the peer closed (FIN received), this side did not
    2: "retransmitting",   # RTO retransmissions or backoff outstanding
    4: "zero-window",      # zero-window probe timer, or no send window with data queued
    8: "no-ack",           # data unacknowledged and no ACK for more than 2 RTOs
    16: "keepalive",       # keepalive probes sent and unanswered
}


def why_names(bits: int) -> List[str]:
    """The names of the reason bits in ``bits`` (see :data:`WHY`)."""
    return [name for bit, name in WHY.items() if bits & bit]


class Timer(enum.IntEnum):
    """``idiag_timer``: which kernel timer is pending on the socket."""

    NONE = 0
    RETRANSMIT = 1      #: retransmission (or loss probe) timer
    KEEPALIVE = 2       #: keepalive timer (also SYN-ACK timer for requests)
    TIME_WAIT = 3
    ZERO_WINDOW = 4     #: zero-window probe timer
    LOSS_PROBE = 5      #: tail loss probe (newer kernels)
    REO_TIMEOUT = 6     #: RACK reordering timer


def parse_states(states: Union[None, int, str, Iterable[Union[int, str]]]) -> int:
    """The kernel's state bit mask (``1 << TCP_*``) for ``states``: None (all),
    a :class:`TcpState`, a state number or name (``"close-wait"``,
    ``"CLOSE_WAIT"``), or an iterable of those."""
    if states is None:
        return 0
    if isinstance(states, (int, str)):
        states = [states]
    try:
        items = list(states)
    except TypeError:
        raise TypeError("states must be a TcpState, a state name or number, or an "
                        f"iterable of them, not {type(states).__name__}") from None
    if not items:
        raise ValueError("states is empty: give None for every state")
    mask = 0
    for s in items:
        if isinstance(s, bool):
            raise TypeError("states: expected a TcpState, got bool")
        if isinstance(s, str):
            key = s.strip().upper().replace("-", "_")
            if key not in TcpState.__members__:
                raise ValueError(f"states: unknown TCP state {s!r} (one of "
                                 f"{', '.join(m.lower() for m in TcpState.__members__)})")
            mask |= 1 << TcpState[key]
        elif isinstance(s, int):
            if s not in _STATE:
                raise ValueError(f"states: {s!r} is not a TCP state (1..11)")
            mask |= 1 << s
        else:
            raise TypeError(f"states: expected a TcpState, got {type(s).__name__}")
    return mask


def _families(family: Optional[int]) -> int:
    if family is None:
        return 3
    if isinstance(family, bool) or not isinstance(family, int):
        raise TypeError(f"family must be socket.AF_INET, socket.AF_INET6 or None, "
                        f"not {type(family).__name__}")
    if family in (socket.AF_INET, 4):
        return 1
    if family in (socket.AF_INET6, 6):
        return 2
    raise ValueError(f"family must be socket.AF_INET, socket.AF_INET6 or None, not {family!r}")


def _port(port: Optional[int]) -> int:
    if port is None:
        return -1
    return count("port", port, 0, 65535)


class CensusEntry:
    """One TCP socket as the kernel reported it.

    A view onto a C record (of a :class:`Census`, or a copy for the death
    log): fields are read on access.  ``local``/``remote`` are ``(host,
    port)``; ``info`` is the socket's :class:`~fastlive.tcpinfo.TcpInfo`
    (None for TIME_WAIT and request sockets, which have none).
    """

    __slots__ = ("_owner", "_r")

    def __init__(self, owner: Any, rec: Any) -> None:
        self._owner = owner      # keeps the C memory alive
        self._r = rec

    @classmethod
    def _copy(cls, rec: Any) -> CensusEntry:
        own = ffi.new(_REC + " *")
        ffi.memmove(own, rec, _REC_SIZE)
        return cls(own, own)

    @property
    def family(self) -> socket.AddressFamily:
        """AF_INET or AF_INET6 (inet_diag's idiag_family)."""
        return socket.AddressFamily(self._r.family)

    def _addr(self, raw: Any) -> str:
        if self._r.family == socket.AF_INET:
            return _NTOP(socket.AF_INET, bytes(ffi.buffer(raw, 4)))
        return _NTOP(socket.AF_INET6, bytes(ffi.buffer(raw, 16)))

    @property
    def local(self) -> Tuple[str, int]:
        """(address, port) of this end."""
        return self._addr(self._r.src), int(self._r.sport)

    @property
    def remote(self) -> Tuple[str, int]:
        """(address, port) of the peer ("0.0.0.0"/"::" and 0 when listening)."""
        return self._addr(self._r.dst), int(self._r.dport)

    @property
    def state(self) -> Union[TcpState, int]:
        """The TCP state the kernel reported (idiag_state) as a TcpState."""
        st = int(self._r.state)
        return _STATE.get(st, st)

    @property
    def inode(self) -> int:
        """The socket's inode (0 for TIME_WAIT and request sockets)."""
        return int(self._r.inode)

    @property
    def uid(self) -> int:
        """The owner's uid (idiag_uid)."""
        return int(self._r.uid)

    @property
    def rqueue(self) -> int:
        """Bytes received and not read (listening: the accept queue)."""
        return int(self._r.rqueue)

    @property
    def wqueue(self) -> int:
        """Bytes sent and not acknowledged (listening: the backlog)."""
        return int(self._r.wqueue)

    @property
    def timer(self) -> Union[Timer, int]:
        """The kernel's pending timer for the socket (idiag_timer: 0 none,
        1 retransmit, 2 keepalive, 3 TIME_WAIT, 4 zero-window probe)."""
        t = self._r.timer
        try:
            return Timer(t)
        except ValueError:
            return int(t)

    @property
    def retrans(self) -> int:
        """Retries of the pending timer (retransmissions or probes)."""
        return int(self._r.retrans)

    @property
    def expires_ms(self) -> int:
        """Milliseconds until the pending timer fires."""
        return int(self._r.expires)

    @property
    def cookie(self) -> int:
        """The kernel's socket cookie (``SO_COOKIE``)."""
        return int(self._r.cookie)

    @property
    def fd(self) -> Optional[int]:
        """This process's fd for the socket (``census(own=True)``), else None."""
        fd = self._r.fd
        return None if fd < 0 else int(fd)

    @property
    def info(self) -> Optional[TcpInfo]:
        """``struct tcp_info`` as the kernel sent it (decoded by its length)."""
        n = self._r.info_len
        if n == 0:
            return None
        return TcpInfo.from_bytes(ffi.buffer(ffi.addressof(self._r, "info"), n)[:])

    @property
    def suspect(self) -> bool:
        """Retransmissions, keepalive probes or RTO backoff outstanding, or
        data unacknowledged with no ACK for over 2 RTOs (the rule of
        :func:`fastlive.check_tcp_info`)."""
        n = self._r.info_len
        return n > 0 and bool(lib.fl_tcp_info_suspect(ffi.addressof(self._r, "info"), n))

    @property
    def why(self) -> List[str]:
        """Why the socket looks dead or suspect (names from :data:`WHY`; []
        when nothing does): CLOSE_WAIT, retransmitting, zero window, no ACK
        for over 2 RTOs, keepalive probes unanswered."""
        return why_names(lib.fl_census_why(self._r))

    def as_dict(self) -> Dict[str, Any]:
        """Plain values, for JSON."""
        info = self.info
        st = self.state
        tm = self.timer
        return {
            "family": 4 if self._r.family == socket.AF_INET else 6,
            "state": st.name if isinstance(st, TcpState) else st,
            "local": list(self.local), "remote": list(self.remote),
            "inode": self.inode, "uid": self.uid, "cookie": self.cookie,
            "rqueue": self.rqueue, "wqueue": self.wqueue,
            "timer": tm.name.lower() if isinstance(tm, Timer) else tm,
            "retrans": self.retrans, "expires_ms": self.expires_ms,
            "fd": self.fd, "suspect": self.suspect, "why": self.why,
            "info": info.as_dict() if info is not None else None,
        }

    def __repr__(self) -> str:
        st = self.state
        name = st.name if isinstance(st, TcpState) else str(st)
        (lh, lp), (rh, rp) = self.local, self.remote
        return f"<CensusEntry {name} {lh}:{lp} -> {rh}:{rp} inode={self.inode}>"


class Census(Sequence[CensusEntry]):
    """The sockets of one dump, held as C records.

    ``census[i]`` is a :class:`CensusEntry` view (made on access).
    :attr:`interrupted` is True when the kernel flagged the dump as racing
    socket changes (``NLM_F_DUMP_INTR``) even after the retries; the
    records are then complete for each socket but the set may miss or
    repeat sockets that came or went during the walk.
    """

    __slots__ = ("_c", "_n")

    def __init__(self, cdata: Any) -> None:
        self._c = cdata
        self._n = int(cdata.n)

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> CensusEntry: ...
    @overload
    def __getitem__(self, i: slice) -> List[CensusEntry]: ...

    def __getitem__(self, i: Union[int, slice]) -> Any:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(self._n))]
        k: int = i + self._n if i < 0 else i
        if not 0 <= k < self._n:
            raise IndexError("census index out of range")
        return CensusEntry(self._c, self._c.recs + k)

    def __iter__(self) -> Iterator[CensusEntry]:
        c, recs = self._c, self._c.recs
        for k in range(self._n):
            yield CensusEntry(c, recs + k)

    @property
    def interrupted(self) -> bool:
        """The kernel said the dump raced socket changes (after retries)."""
        return bool(self._c.flags & lib.FL_CENSUS_INTR)

    @property
    def retries(self) -> int:
        """Dumps restarted because the kernel flagged NLM_F_DUMP_INTR."""
        return int(self._c.retries)

    @property
    def skipped(self) -> int:
        """Malformed messages or attributes skipped (0 from a sane kernel)."""
        return int(self._c.bad)

    @property
    def messages(self) -> int:
        """Netlink messages read (one per socket, plus the DONEs)."""
        return int(self._c.messages)

    @property
    def bytes_read(self) -> int:
        """Bytes the kernel sent for this census."""
        return int(self._c.bytes)

    def states(self) -> bytes:
        """The state of every record, one byte each, in dump order."""
        return bytes(self.raw()[_OFF_STATE::_REC_SIZE])

    def _classify(self) -> Tuple[bytes, List[int]]:
        why = ffi.new("uint8_t[]", max(1, self._n))
        states = ffi.new("uint32_t[16]")
        lib.fl_census_classify(self._c, why, states)
        return bytes(ffi.buffer(why, self._n)), list(states)

    def counts(self) -> Dict[Union[TcpState, int], int]:
        """How many sockets are in each state (counted in C)."""
        _why, states = self._classify()
        return {_STATE.get(st, st): n for st, n in enumerate(states) if n}

    def why(self) -> bytes:
        """Per record, the bits of :data:`WHY` (0: nothing suspect), in
        dump order; computed in C in one pass."""
        return self._classify()[0]

    def remote_hosts(self) -> List[str]:
        """The remote address of every record, as text, in dump order."""
        mv = self.raw()
        seen: Dict[bytes, str] = {}
        out: List[str] = []
        for base in range(0, self._n * _REC_SIZE, _REC_SIZE):
            fam = mv[base + _OFF_FAMILY]
            raw = bytes(mv[base + _OFF_DST: base + _OFF_DST + (4 if fam == socket.AF_INET else 16)])
            host = seen.get(raw)
            if host is None:
                host = seen[raw] = _NTOP(socket.AF_INET if fam == socket.AF_INET else socket.AF_INET6,
                                         raw)
            out.append(host)
        return out

    def raw(self) -> memoryview:
        """All records as one read-only buffer of ``struct fl_census_rec``."""
        if self._n == 0:
            return memoryview(b"")
        held = ffi.gc(ffi.cast("char *", self._c.recs), lambda _p, _o=self._c: None)
        return memoryview(ffi.buffer(held, _REC_SIZE * self._n)).toreadonly()

    def __repr__(self) -> str:
        return f"<Census n={self._n}{' interrupted' if self.interrupted else ''}>"


def _new_c() -> Any:
    ptr = ffi.new("struct fl_census **")
    check_rc(lib.fl_census_new(ptr))
    return ffi.gc(ptr[0], lib.fl_census_free)


def census(*, states: Union[None, int, str, Iterable[Union[int, str]]] = None,
           port: Optional[int] = None, family: Optional[int] = None,
           own: bool = False, info: bool = True) -> Census:
    """Every TCP socket of this network namespace, from one kernel dump per
    address family.

    ``states`` (TcpState values or names) and ``port`` (local or remote
    port) are filters the kernel applies; ``family`` is ``socket.AF_INET``
    or ``socket.AF_INET6`` (None: both).  ``own=True`` keeps only this
    process's sockets and gives each its fd (matched by inode through
    ``/proc/self/fd``).  ``info=False`` skips ``tcp_info`` (a smaller dump).
    """
    mask = parse_states(states)
    p = _port(port)
    fams = _families(family)
    if not isinstance(own, bool):
        raise TypeError(f"own must be a bool, not {type(own).__name__}")
    c = _new_c()
    rc = lib.fl_census_dump(c, fams, mask, p, 1 if info else 0)
    if rc < 0:
        check_rc(rc)
    if own:
        check_rc(lib.fl_census_keep_own(c))
    return Census(c)


class Follow(Iterator[CensusEntry]):
    """The death log: TCP sockets as the kernel frees them.

    Iterating yields a :class:`CensusEntry` (a copy; ``uid`` and ``inode``
    are 0, the kernel does not send them) per socket destroyed in this
    network namespace, until :meth:`stop` or :meth:`close` (from any
    thread: a blocked wait wakes at once) or until ``timeout`` seconds have
    passed since the start (None: no limit).  :meth:`poll` is the batch
    form.  :attr:`lost` counts events the kernel dropped because the
    receive queue was full (ENOBUFS).
    """

    def __init__(self, family: Optional[int] = None, timeout: Optional[float] = None,
                 rcvbuf: int = 4 << 20) -> None:
        fams = _families(family)
        limit = None if timeout is None else seconds("timeout", timeout)
        count("rcvbuf", rcvbuf, 0, 0x7FFFFFFF)
        self._lock = threading.Lock()
        self._busy = False          # a thread is inside fl_census_follow_wait
        self._closing = False       # close() asked while busy: the waiter closes
        self._lost_final = 0
        self._pending: List[CensusEntry] = []
        c = _new_c()
        check_rc(lib.fl_census_follow_open(c, fams, rcvbuf))
        self._c: Any = c
        self._deadline = None if limit is None else time.monotonic() + limit

    @property
    def lost(self) -> int:
        """Events the kernel dropped (ENOBUFS: the receive queue was full)."""
        c = self._c
        return int(c.lost) if c is not None else self._lost_final

    def poll(self, timeout: float = 0.0) -> List[CensusEntry]:
        """Waits up to ``timeout`` seconds for deaths and returns what
        arrived ([] on timeout, after :meth:`stop` or once closed)."""
        ms = timeout_ms(timeout)
        with self._lock:
            c = self._c
            if c is None or self._busy:
                return []
            self._busy = True
        try:
            rc = lib.fl_census_follow_wait(c, ms)   # GIL released while waiting
            out = [CensusEntry._copy(c.recs + k) for k in range(rc)] if rc > 0 else []
        finally:
            with self._lock:
                self._busy = False
                closing = self._closing
        if closing or rc == -errno.ECANCELED:
            self.close()
            return out
        if rc < 0:
            check_rc(rc)
        return out

    def __iter__(self) -> Follow:
        return self

    def __next__(self) -> CensusEntry:
        while not self._pending:
            if self._c is None:
                raise StopIteration
            wait = 1.0
            if self._deadline is not None:
                wait = self._deadline - time.monotonic()
                if wait <= 0:
                    self.close()
                    raise StopIteration
                wait = min(wait, 1.0)
            self._pending = self.poll(wait)
            self._pending.reverse()
        return self._pending.pop()

    def stop(self) -> None:
        """Ends the iteration and unsubscribes; wakes a thread blocked in it."""
        self.close()

    def close(self) -> None:
        """Unsubscribes (closes the netlink socket); thread-safe.  A thread
        blocked in :meth:`poll` or the iteration wakes and stops."""
        with self._lock:
            c = self._c
            if c is None:
                return
            if self._busy:              # the waiter closes when it wakes
                self._closing = True
                lib.fl_census_follow_stop(c)
                return
            self._c = None
            self._lost_final = int(c.lost)
            lib.fl_census_follow_close(c)

    @property
    def closed(self) -> bool:
        """Whether stop()/close() ended the subscription."""
        return self._c is None

    def __enter__(self) -> Follow:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Follow {'closed' if self._c is None else 'open'} lost={self.lost}>"


def census_follow(*, family: Optional[int] = None, timeout: Optional[float] = None,
                  rcvbuf: int = 4 << 20) -> Follow:
    """Subscribe to the kernel's TCP socket-destroy broadcasts (see
    :class:`Follow`); ``rcvbuf`` is the receive queue asked for in bytes
    (``SO_RCVBUFFORCE`` with CAP_NET_ADMIN, else capped by the kernel at
    ``net.core.rmem_max``)."""
    return Follow(family, timeout, rcvbuf)
