"""TCP_INFO: the kernel's per-connection record, decoded whole.

``getsockopt(fd, IPPROTO_TCP, TCP_INFO)`` copies ``min(asked, known)``
bytes of ``struct tcp_info``.  fastlive asks for the newest layout it knows
(its own copy in ``csrc/fl_core.h``, Linux 6.19 UAPI) and trusts only the
length the kernel returned: a field that an older kernel (or qemu-user,
which returns only 4 bytes) did not fill is ``None``, never a stale zero.

The state is the one thing the article's method 3 looks at, and it is a
weak signal: a peer that lost power or network leaves the state at
ESTABLISHED until a kernel timer gives up (keepalive, TCP_USER_TIMEOUT,
or ~15 retransmissions, ~925 s by default).  :func:`check_tcp_info` adds
the earlier "suspect" signal: retransmissions, keepalive probes or RTO
backoff outstanding, or unacknowledged data with no ACK for over 2 RTOs.
"""
from __future__ import annotations

import socket
from typing import Any, Dict, Iterator, Optional, Tuple, Union

from ._lib import SocketLike, check_rc, fd_of, ffi, lib
from .tcpstate import TcpState
from .verdict import Verdict, new_c_verdict

__all__ = ["TCP_INFO_SIZE", "FIELDS", "FIELD_NAMES", "TcpInfo", "tcp_info", "check_tcp_info"]

_STRUCT = "struct fl_tcp_info"
_PTR = ffi.typeof(_STRUCT + " *")
_new_raw = ffi.new_allocator(should_clear_after_alloc=False)
_socket_type = socket.socket
#: Size of the newest struct tcp_info fastlive knows.
TCP_INFO_SIZE: int = ffi.sizeof(_STRUCT)


def _layout() -> Tuple[Tuple[str, str, int], ...]:
    """(python name, C field, bytes needed) for every field, in order."""
    out = []
    for cname, field in ffi.typeof(_STRUCT).fields:
        # A bit-field lives in a storage unit of its declared type that
        # starts at field.offset; it is present when that unit is.
        end = field.offset + ffi.sizeof(field.type)
        out.append((cname[len("tcpi_"):], cname, end))
    return tuple(out)


FIELDS: Tuple[Tuple[str, str, int], ...] = _layout()
#: Field names as TcpInfo attributes (the UAPI names without ``tcpi_``).
FIELD_NAMES: Tuple[str, ...] = tuple(f[0] for f in FIELDS)


class TcpInfo:
    """One ``struct tcp_info`` snapshot.

    Attributes are the UAPI field names without the ``tcpi_`` prefix
    (``state``, ``rtt``, ``snd_cwnd``, ``bytes_acked`` ...).  Times are as
    the kernel gives them: ``rto``, ``ato``, ``rtt``, ``rttvar``,
    ``min_rtt``, ``rcv_rtt`` in microseconds; ``last_*`` in milliseconds.
    A field the kernel did not return is ``None``.  The record stays a
    compact C struct; fields are read from it on access.
    """

    __slots__ = ("_raw", "length")

    def __init__(self, raw: Any, length: int) -> None:
        self._raw = raw
        #: How many bytes the kernel returned.
        self.length = length

    @classmethod
    def from_bytes(cls, data: bytes) -> TcpInfo:
        """Decode a record held as bytes (e.g. from ``getsockopt`` in
        Python); bytes past ``len(data)`` are absent."""
        raw = ffi.new(_STRUCT + " *")
        n = min(len(data), TCP_INFO_SIZE)
        ffi.memmove(raw, data[:n], n)
        return cls(raw, n)

    @property
    def state(self) -> Optional[Union[TcpState, int]]:
        return TcpState.of(self._raw.tcpi_state) if self.length >= 1 else None

    def has(self, name: str) -> bool:
        """Whether the kernel returned field ``name``."""
        return self.length >= _END[name]

    def items(self) -> Iterator[Tuple[str, Optional[int]]]:
        for name in FIELD_NAMES:
            yield name, getattr(self, name)

    def as_dict(self) -> Dict[str, Optional[int]]:
        return dict(self.items())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TcpInfo):
            return NotImplemented
        return self.as_dict() == other.as_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.items() if v is not None)
        return f"TcpInfo(length={self.length}, {shown})"


_END = {name: end for name, _c, end in FIELDS}


def _make_getter(cname: str, end: int) -> property:
    def get(self: TcpInfo) -> Optional[int]:
        if self.length < end:
            return None
        return getattr(self._raw, cname)  # type: ignore[no-any-return]
    get.__name__ = cname[len("tcpi_"):]
    return property(get)


for _name, _cname, _end in FIELDS:
    if _name != "state":
        setattr(TcpInfo, _name, _make_getter(_cname, _end))
del _name, _cname, _end


def tcp_info(sock: SocketLike) -> TcpInfo:
    """``getsockopt(TCP_INFO)`` of a TCP socket, decoded.

    Raises ``OSError`` for anything that is not a TCP socket (EBADF for a
    closed fd or -1, ENOTSOCK for a pipe, EOPNOTSUPP for UDP or unix).
    """
    # The fast path (issue 4 target: <= 1.5 us per call): the C side
    # zeroes the record, so the allocator need not; a plain socket's fd
    # needs none of fd_of's checks.
    t = type(sock)
    if t is _socket_type:
        fd = sock.fileno()   # type: ignore[union-attr]
    elif t is int and sock <= 0x7FFFFFFF:   # type: ignore[operator]
        fd = sock
    else:
        fd = fd_of(sock)
    raw = _new_raw(_PTR)
    n = lib.fl_tcp_info(fd, raw)
    if n < 0:
        check_rc(n)
    return TcpInfo(raw, n)


def check_tcp_info(sock: SocketLike) -> Verdict:
    """The article's method 3, made honest.

    CLOSE_WAIT / LAST_ACK / CLOSING / TIME_WAIT: the peer's FIN arrived
    (PEER_CLOSED).  CLOSE: the kernel gave up or was reset (CLOSED; the
    reason is in SO_ERROR, which this check does not read).  ESTABLISHED is
    ALIVE, meaning only "no news" - with ``suspect`` set when the sender is
    retransmitting, probing or backing off.
    """
    v = new_c_verdict()
    lib.fl_check_tcp_info(fd_of(sock), v)
    return Verdict._from_c(v)
