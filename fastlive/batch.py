"""Batch sweeps: one C call checks thousands of connections.

A :class:`Batch` is built once from many sockets or fds.  The fds, the
``struct pollfd`` array and the result arrays live in C memory owned by the
batch; a sweep is a single call into C that runs one syscall per fd (or one
``poll()`` for all of them) and writes the answers into those arrays in
place.  Nothing is allocated per sweep and no Python object is made per
live connection: results are read as compact arrays (:attr:`Batch.statuses`,
:attr:`Batch.errnos`, ...) or as the short list of entries that are not
alive (:meth:`Batch.dead`).

What each sweep asks the kernel:

* :meth:`Batch.sweep_poll` - one ``poll(POLLIN|POLLRDHUP)`` over all fds.
  The kernel's ``tcp_poll`` reports a received FIN (RDHUP), a reset or
  fully shut connection (HUP) and a pending error (ERR, taken with
  ``SO_ERROR``; the kernel reports it once, the batch keeps the reason on
  later poll sweeps while the hangup persists).  Cheapest per fd.
* :meth:`Batch.sweep_states` - ``getsockopt(TCP_INFO)`` of one byte per fd:
  the TCP state (CLOSE_WAIT: the peer's FIN; CLOSE: reset or timed out).
* :meth:`Batch.sweep_tcp_info` - the whole ``struct tcp_info`` per fd, kept
  in a C array; a :class:`~fastlive.tcpinfo.TcpInfo` is made only for the
  index a caller asks for.  Adds the SUSPECT flag (retransmitting, probing).
* :meth:`Batch.sweep_peek` - ``recv(MSG_PEEK|MSG_DONTWAIT)`` of one byte
  per fd: 0 bytes is the peer's FIN, ECONNRESET its RST.  Consumes nothing.

None of these sees a peer that vanished silently (power, cable): arm the
kernel's timers (:func:`~fastlive.keepalive.detect_within`) and the death
shows up in every sweep as ETIMEDOUT / CLOSE.

Bad entries (negative fd, closed fd, not a socket, not TCP, listening,
still connecting, the same fd twice) get an ``INVALID`` verdict when the
batch is built (errno EBADF, ENOTSOCK, EOPNOTSUPP, EOPNOTSUPP, ENOTCONN,
EEXIST) and are skipped by every sweep.  An fd closed after the build is
``INVALID``/EBADF in the next sweep, with ``Flag.BEHIND_BACK`` (in
:meth:`Batch.dead` and :meth:`Batch.verdict`; the uint8 :attr:`Batch.flags`
array cannot hold it) - what every engine reports for a socket closed
behind its back.  Build a new set with
:meth:`Batch.rebuild` when connections come and go.
"""
from __future__ import annotations

import errno
import os
from array import array
from typing import (Any, Iterable, Iterator, List, Literal, NamedTuple,
                    Optional, Sequence, Tuple, Union, overload)

from ._lib import (FORKED_RC, SocketLike, check_rc, fd_of, ffi, forked_error, interruptible,
                   lib, timeout_ms)
from .tcpinfo import TCP_INFO_SIZE, TcpInfo
from .tcpstate import TcpState
from .verdict import Flag, Method, Status, Verdict

__all__ = ["Batch", "Dead", "TcpInfoRecords"]

_STATUS = {int(s): s for s in Status}   # members by value: cheaper than Status(v)
_METHOD = {int(m): m for m in Method}
_FLAGS = {i: Flag(i) for i in range(256)}
_EBADF = errno.EBADF


def _view(owner: Any, ptr: Any, nbytes: int,
          fmt: Literal["B", "i", "I"]) -> memoryview:
    """A memoryview of ``nbytes`` at ``ptr`` (C memory owned by the batch
    cdata ``owner``) that keeps ``owner`` alive as long as the view lives,
    so a view never outlives the arrays it shows."""
    held = ffi.gc(ffi.cast("char *", ptr), lambda _p, _o=owner: None)
    mv = memoryview(ffi.buffer(held, nbytes))
    return mv if fmt == "B" else mv.cast(fmt)


class Dead(NamedTuple):
    """One entry that is not alive after a sweep.  Like every death in
    fastlive (:class:`~fastlive.Death`, :class:`~fastlive.HeartbeatDeath`)
    it carries :attr:`verdict`."""

    idx: int         #: position in the batch
    fd: int
    status: Status
    errno: int
    method: Method = Method.POLL   #: the sweep that saw it
    tcp_state: int = 0             #: TCP state when the sweep read it, else 0
    flags: Flag = Flag.NONE

    @property
    def verdict(self) -> Verdict:
        """This entry's result as a :class:`Verdict`."""
        st = self.tcp_state
        return Verdict(self.status, self.method, self.errno,
                       TcpState.of(st) if st else None, self.flags)


class TcpInfoRecords(Sequence[Optional[TcpInfo]]):
    """The ``struct tcp_info`` records of the last :meth:`Batch.sweep_tcp_info`.

    A view onto the batch's C array: ``records[i]`` copies record ``i`` into
    a :class:`TcpInfo` (None when the sweep got no record for it, e.g. a bad
    entry); :attr:`lengths` is the byte count the kernel returned per entry.
    The next tcp_info sweep overwrites the array; TcpInfo objects already
    handed out are copies and stay as they were.
    """

    __slots__ = ("_batch", "ndead")

    def __init__(self, batch: Batch, ndead: int) -> None:
        self._batch = batch
        #: entries not alive after the sweep
        self.ndead = ndead

    def __len__(self) -> int:
        return int(self._batch._b.n)

    @overload
    def __getitem__(self, i: int) -> Optional[TcpInfo]: ...
    @overload
    def __getitem__(self, i: slice) -> List[Optional[TcpInfo]]: ...

    def __getitem__(self, i: Union[int, slice]) -> Any:
        b = self._batch._b
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(b.n))]
        k: int = i + b.n if i < 0 else i
        if not 0 <= k < b.n:
            raise IndexError("batch index out of range")
        n = b.info_len[k] if b.info != ffi.NULL else 0
        if n == 0:
            return None
        raw = ffi.new("struct fl_tcp_info *")
        ffi.memmove(raw, b.info + k, min(n, TCP_INFO_SIZE))
        return TcpInfo(raw, n)

    @property
    def lengths(self) -> memoryview:
        """Bytes the kernel returned per entry (uint32), 0 for none."""
        b = self._batch._b
        return _view(b, b.info_len, 4 * b.n, "I").toreadonly()

    def raw(self) -> memoryview:
        """All records as one read-only buffer (``n * TCP_INFO_SIZE`` bytes,
        record i at ``i * TCP_INFO_SIZE``)."""
        b = self._batch._b
        if b.info == ffi.NULL:
            return memoryview(b"")
        return _view(b, b.info, TCP_INFO_SIZE * b.n, "B").toreadonly()


class Batch:
    """A fixed set of connections checked together.

    ``Batch(socks)`` takes sockets or fds (anything :func:`fastlive.check`
    takes); it keeps a reference to each object so a socket is not closed
    by the garbage collector while the batch holds its fd.  Results of the
    last sweep, per entry in build order:

    * :attr:`statuses` - :class:`Status` values (uint8 array)
    * :attr:`errnos` - errno behind each status (int32 array)
    * :attr:`states` - TCP state when the sweep read it, else 0 (uint8)
    * :attr:`flags` - :class:`Flag` bits (uint8)
    * :meth:`dead`, :meth:`dead_indices` - the entries that are not alive.

    Not thread-safe: sweep one batch from one thread at a time.
    """

    def __init__(self, socks: Iterable[SocketLike] = ()) -> None:
        self._b: Any = None
        self._objs: List[SocketLike] = []
        self._arr: array[int] = array("i")
        self._records: Optional[TcpInfoRecords] = None
        self._pid = os.getpid()
        self._gen = lib.fl_fork_generation()
        ptr = ffi.new("struct fl_batch **")
        objs, arr = self._prepare(socks)
        check_rc(lib.fl_batch_new(ffi.from_buffer("int[]", arr), len(arr), ptr))
        self._b = ffi.gc(ptr[0], lib.fl_batch_free)
        self._objs, self._arr = objs, arr
        self._views()

    @staticmethod
    def _prepare(socks: Iterable[SocketLike]) -> Tuple[List[SocketLike], array[int]]:
        objs = list(socks)
        arr = array("i", [fd_of(s) if not isinstance(s, int) or s >= -0x80000000
                          else -1 for s in objs])
        return objs, arr

    def _views(self) -> None:
        b = self._b
        n = b.n
        self._status = _view(b, b.status, n, "B")
        self._state = _view(b, b.tcp_state, n, "B")
        self._flags = _view(b, b.flags, n, "B")
        self._err = _view(b, b.err, 4 * n, "i")
        self._fds = _view(b, b.fds, 4 * n, "i")
        self._dead = _view(b, b.dead, 4 * n, "i")
        # entries bad when built: an INVALID/EBADF elsewhere is an fd closed
        # behind the batch's back (Flag.BEHIND_BACK, as the engines say it)
        self._built_bad = frozenset(self._dead[:b.nbad])

    def _live(self) -> Any:
        if self._b is None:
            raise ValueError("the batch is closed")
        return self._b

    def _rc(self, rc: int) -> int:
        if rc == FORKED_RC:
            raise forked_error("Batch", self._pid)
        return check_rc(rc)

    def rebuild(self, socks: Iterable[SocketLike]) -> None:
        """Replace the set of connections and validate it again.  The new
        set gets new C arrays: views of the old results stay valid (and
        keep the old arrays alive) until dropped."""
        self._live()
        if lib.fl_fork_generation() != self._gen:
            raise forked_error("Batch", self._pid)
        ptr = ffi.new("struct fl_batch **")
        objs, arr = self._prepare(socks)
        check_rc(lib.fl_batch_new(ffi.from_buffer("int[]", arr), len(arr), ptr))
        self._b = ffi.gc(ptr[0], lib.fl_batch_free)
        self._objs, self._arr = objs, arr
        self._records = None
        self._views()

    # -- sweeps --------------------------------------------------------------

    def sweep_poll(self, timeout: float = 0.0) -> int:
        """One ``poll()`` of every fd for POLLIN|POLLRDHUP, waiting up to
        ``timeout`` seconds (0: just look) for the first event.  Returns how
        many entries are not alive (bad entries included).  A signal during
        the wait runs its handler at once (PEP 475): the sweep goes on for
        the time left if the handler returns, and its exception propagates
        if it raises (the arrays then keep the previous sweep's results)."""
        b, ms = self._live(), timeout_ms(timeout)
        if ms == 0:
            rc = lib.fl_batch_sweep_poll(b, 0)
            if rc >= 0:
                return int(rc)
        rc = interruptible(lambda t: lib.fl_batch_sweep_poll(b, t), ms)
        return rc if rc >= 0 else self._rc(rc)

    def sweep_states(self) -> int:
        """``getsockopt(TCP_INFO)`` state of every fd; returns how many
        entries are not alive."""
        rc = lib.fl_batch_sweep_states(self._live())
        return rc if rc >= 0 else self._rc(rc)

    def sweep_tcp_info(self) -> TcpInfoRecords:
        """The full TCP_INFO record of every fd, kept compact in C; returns
        the records view (``.ndead`` entries are not alive).  The first
        call allocates the record array once."""
        b = self._live()
        rc = lib.fl_batch_sweep_tcp_info(b)
        if rc < 0:
            self._rc(rc)
        rec = self._records
        if rec is None:
            rec = self._records = TcpInfoRecords(self, rc)
        else:
            rec.ndead = rc
        return rec

    def sweep_peek(self) -> int:
        """``recv(MSG_PEEK|MSG_DONTWAIT)`` of one byte per fd; returns how
        many entries are not alive."""
        rc = lib.fl_batch_sweep_peek(self._live())
        return rc if rc >= 0 else self._rc(rc)

    # -- results ---------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._live().n)

    @property
    def fds(self) -> memoryview:
        """The fds as given (int32, read-only)."""
        self._live()
        return self._fds.toreadonly()

    @property
    def objects(self) -> Sequence[SocketLike]:
        """The sockets/fds the batch was built from, in order."""
        return tuple(self._objs)

    @property
    def statuses(self) -> memoryview:
        """:class:`Status` value per entry after the last sweep (uint8)."""
        self._live()
        return self._status.toreadonly()

    @property
    def errnos(self) -> memoryview:
        """errno behind each entry's status, 0 if none (int32)."""
        self._live()
        return self._err.toreadonly()

    @property
    def states(self) -> memoryview:
        """TCP state per entry when the last sweep read it, else 0 (uint8)."""
        self._live()
        return self._state.toreadonly()

    @property
    def flags(self) -> memoryview:
        """:class:`Flag` bits per entry (uint8)."""
        self._live()
        return self._flags.toreadonly()

    @property
    def method(self) -> Optional[Method]:
        """Method of the last sweep, None before the first."""
        m = self._live().method
        return Method(m) if m >= 0 else None

    @property
    def ndead(self) -> int:
        """Entries not alive after the last sweep (or bad at build)."""
        return int(self._live().ndead)

    def dead_indices(self) -> memoryview:
        """Indices (ascending, int32) of the entries not alive."""
        b = self._live()
        return self._dead[:b.ndead].toreadonly()

    def dead(self) -> List[Dead]:
        """A :class:`Dead` ``(idx, fd, status, errno, method, tcp_state,
        flags)`` for every entry not alive - one Python object per dead
        entry, none for live ones."""
        b = self._live()
        st, err, fds, new = self._status, self._err, self._fds, tuple.__new__
        tcp = self._state
        m = _METHOD.get(b.method, Method.POLL)
        return [new(Dead, (i, fds[i], _STATUS[st[i]], err[i], m, tcp[i], self._flag(i)))
                for i in self._dead[:b.ndead]]

    def _flag(self, i: int) -> Flag:
        f = _FLAGS[self._flags[i]]
        if self._err[i] == _EBADF and self._status[i] == Status.INVALID and i not in self._built_bad:
            f = f | Flag.BEHIND_BACK
        return f

    def verdict(self, i: int) -> Verdict:
        """Entry ``i``'s result as a :class:`Verdict` (made on request)."""
        b = self._live()
        if i < 0:
            i += b.n
        if not 0 <= i < b.n:
            raise IndexError("batch index out of range")
        m = b.method
        st = self._state[i]
        # TcpState.of gives the bare int for a state the enum lacks, as in
        # Verdict._from_c.
        state = TcpState.of(st) if st else None
        return Verdict(Status(self._status[i]),
                       Method(m) if m >= 0 else Method.TCP_INFO,
                       self._err[i], state, self._flag(i))

    def __iter__(self) -> Iterator[Verdict]:
        for i in range(len(self)):
            yield self.verdict(i)

    # -- lifetime --------------------------------------------------------------

    def close(self) -> None:
        """Let go of the C arrays (the sockets are not closed).  They are
        freed as soon as no view of them (:attr:`statuses`, ...) remains.
        Later calls raise ValueError; closing twice is fine.  Safe in a
        forked child (C memory only)."""
        self._b = None
        for v in ("_status", "_state", "_flags", "_err", "_fds", "_dead"):
            self.__dict__.pop(v, None)
        self._records = None
        self._objs = []

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._b is None

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._b is None:
            return "<Batch closed>"
        b = self._b
        m = _METHOD.get(b.method)
        last = m.name.lower() if m is not None else "none"
        return f"<Batch n={b.n} bad={b.nbad} not-alive={b.ndead} last-sweep={last}>"
