"""TCP_INFO: the kernel's per-connection record, decoded whole.

``getsockopt(fd, IPPROTO_TCP, TCP_INFO)`` copies ``min(asked, known)``
bytes of ``struct tcp_info`` (``tcp_get_info()`` in net/ipv4/tcp.c fills
it under the socket lock).  fastlive asks for the newest layout it knows
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
from typing import Any, Dict, Iterator, Optional, Tuple, Union, overload

from ._lib import SocketLike, check_rc, fd_of, ffi, lib
from .tcpstate import TcpState
from .verdict import Verdict, new_c_verdict

__all__ = ["TCP_INFO_SIZE", "FIELDS", "FIELD_NAMES", "TcpInfo", "tcp_info", "check_tcp_info"]

_STRUCT = "struct fl_tcp_info"
_PTR = ffi.typeof(_STRUCT + " *")
_new_raw = ffi.new_allocator(should_clear_after_alloc=False)
_socket_type = socket.socket
#: Size in bytes of the newest ``struct tcp_info`` fastlive knows (280: Linux 6.19).
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


#: ``(name, C field, bytes needed)`` of every field of the C struct, in
#: order: read from the compiled core, so it is the layout the C side uses.
FIELDS: Tuple[Tuple[str, str, int], ...] = _layout()
#: Field names as TcpInfo attributes (the UAPI names without ``tcpi_``).
FIELD_NAMES: Tuple[str, ...] = tuple(f[0] for f in FIELDS)
_END = {name: end for name, _c, end in FIELDS}


class _Field:
    """One ``tcpi_*`` field as a read-only attribute: the value the kernel
    returned, or None when the record is too short to hold it.  The name
    is the attribute's; a name the C struct lacks fails at import."""

    def __init__(self, doc: str) -> None:
        self.__doc__ = doc
        self.name = self.cname = ""
        self.end = 0

    def __set_name__(self, owner: type, name: str) -> None:
        if name not in _END:
            raise TypeError(f"TcpInfo.{name} is not a field of struct fl_tcp_info")
        self.name, self.cname, self.end = name, "tcpi_" + name, _END[name]

    @overload
    def __get__(self, obj: None, owner: Any) -> _Field: ...
    @overload
    def __get__(self, obj: TcpInfo, owner: Any) -> Optional[int]: ...

    def __get__(self, obj: Optional[TcpInfo], owner: Any) -> Union[_Field, Optional[int]]:
        if obj is None:
            return self
        if obj.length < self.end:
            return None
        return getattr(obj._raw, self.cname)  # type: ignore[no-any-return]

    def __set__(self, obj: TcpInfo, value: object) -> None:
        raise AttributeError(f"TcpInfo.{self.name} is read-only")

    def __repr__(self) -> str:
        return f"<TcpInfo field {self.name}: {self.__doc__}>"


def _f(doc: str) -> Any:
    # Typed Any so that ``rtt: Optional[int] = _f(...)`` declares an
    # Optional[int] attribute for type checkers.
    return _Field(doc)


class TcpInfo:
    """One ``struct tcp_info`` snapshot, as the kernel filled it.

    Attributes are the UAPI field names without the ``tcpi_`` prefix, in the
    struct's order, each an ``int`` or ``None`` (the kernel returned fewer
    bytes than the field needs).  Units are the kernel's: times in
    microseconds unless the doc says milliseconds (the ``last_*`` fields,
    ``total_rto_time``), windows and thresholds in segments or bytes as
    documented.  The record stays a compact C struct; a field is read from it
    on access.  ``TcpInfo.from_bytes(data)`` decodes bytes obtained elsewhere
    (``socket.getsockopt``, netlink ``INET_DIAG_INFO``).
    """

    __slots__ = ("_raw", "length")

    # The fields, in struct order (tests/test_tcpinfo.py checks the names
    # and their order against FIELDS, which comes from the C struct).
    # ``state`` is a property below: it decodes to TcpState.
    ca_state: Optional[int] = _f(
        "congestion-control state (icsk_ca_state): 0 Open, 1 Disorder, 2 CWR, 3 Recovery, 4 Loss")
    retransmits: Optional[int] = _f(
        "retransmission timeouts in a row for the oldest unacknowledged data (icsk_retransmits); "
        "0 once it is acknowledged")
    probes: Optional[int] = _f(
        "unanswered zero-window or keepalive probes sent in a row (icsk_probes_out)")
    backoff: Optional[int] = _f(
        "RTO exponential-backoff exponent (icsk_backoff): the timer is rto << backoff")
    options: Optional[int] = _f(
        "TCPI_OPT_* bits negotiated: 1 timestamps, 2 SACK, 4 window scaling, 8 ECN, "
        "16 ECN seen, 32 SYN data, 64 usec timestamps, 128 TFO child")
    snd_wscale: Optional[int] = _f("window-scale shift the peer announced (applies to its window)")
    rcv_wscale: Optional[int] = _f("window-scale shift this side announced")
    delivery_rate_app_limited: Optional[int] = _f(
        "1 when delivery_rate was measured while the application, not the network, limited sending")
    fastopen_client_fail: Optional[int] = _f(
        "TCP Fast Open client failure: 0 none, 1 no cookie sent, 2 data not acked, 3 SYN-ACK "
        "without data")
    rto: Optional[int] = _f("retransmission timeout, microseconds (icsk_rto; 200000 minimum by default)")
    ato: Optional[int] = _f("delayed-ACK timeout, microseconds")
    snd_mss: Optional[int] = _f("sending maximum segment size, bytes (mss_cache)")
    rcv_mss: Optional[int] = _f("the peer's segment size as estimated from what arrives, bytes")
    unacked: Optional[int] = _f(
        "segments sent and not yet acknowledged (packets_out); on a listener, the accept queue")
    sacked: Optional[int] = _f(
        "segments selectively acknowledged (sacked_out); on a listener, the backlog limit")
    lost: Optional[int] = _f("segments the kernel presumes lost (lost_out)")
    retrans: Optional[int] = _f("segments retransmitted and not yet acknowledged (retrans_out)")
    fackets: Optional[int] = _f("always 0 since Linux 4.15 (forward acknowledgement was removed)")
    last_data_sent: Optional[int] = _f("milliseconds since the last data segment was sent")
    last_ack_sent: Optional[int] = _f("always 0: the kernel never fills it")
    last_data_recv: Optional[int] = _f("milliseconds since the last data segment was received")
    last_ack_recv: Optional[int] = _f("milliseconds since the last ACK was received")
    pmtu: Optional[int] = _f("path MTU, bytes")
    rcv_ssthresh: Optional[int] = _f("receive-window growth threshold, bytes")
    rtt: Optional[int] = _f("smoothed round-trip time, microseconds (srtt)")
    rttvar: Optional[int] = _f("round-trip time mean deviation, microseconds")
    snd_ssthresh: Optional[int] = _f("slow-start threshold, segments (2147483647 = not set yet)")
    snd_cwnd: Optional[int] = _f("congestion window, segments")
    advmss: Optional[int] = _f("maximum segment size this side advertised, bytes")
    reordering: Optional[int] = _f("reordering the kernel tolerates before calling a segment lost, segments")
    rcv_rtt: Optional[int] = _f("round-trip time as the receiver estimates it, microseconds")
    rcv_space: Optional[int] = _f("receive-buffer autotuning's estimate of the space needed, bytes")
    total_retrans: Optional[int] = _f("segments retransmitted over the connection's life")
    pacing_rate: Optional[int] = _f("current pacing rate, bytes per second")
    max_pacing_rate: Optional[int] = _f(
        "SO_MAX_PACING_RATE, bytes per second (2**64 - 1 = unlimited)")
    bytes_acked: Optional[int] = _f(
        "bytes the peer acknowledged (RFC 4898 tcpEStatsAppHCThruOctetsAcked)")
    bytes_received: Optional[int] = _f(
        "bytes received in sequence (RFC 4898 tcpEStatsAppHCThruOctetsReceived)")
    segs_out: Optional[int] = _f("segments sent, retransmissions included")
    segs_in: Optional[int] = _f("segments received")
    notsent_bytes: Optional[int] = _f("bytes in the send queue not sent yet")
    min_rtt: Optional[int] = _f("minimum round-trip time seen (windowed), microseconds")
    data_segs_in: Optional[int] = _f("segments received that carried data")
    data_segs_out: Optional[int] = _f("segments sent that carried data")
    delivery_rate: Optional[int] = _f("most recent delivery-rate sample, bytes per second")
    busy_time: Optional[int] = _f("time with data in flight, microseconds")
    rwnd_limited: Optional[int] = _f("time limited by the peer's receive window, microseconds")
    sndbuf_limited: Optional[int] = _f("time limited by the send buffer, microseconds")
    delivered: Optional[int] = _f("segments delivered to the peer, retransmissions included")
    delivered_ce: Optional[int] = _f("segments delivered with an ECN congestion mark")
    bytes_sent: Optional[int] = _f(
        "bytes sent, retransmissions included (RFC 4898 tcpEStatsPerfHCDataOctetsOut)")
    bytes_retrans: Optional[int] = _f("bytes retransmitted (RFC 4898 tcpEStatsPerfOctetsRetrans)")
    dsack_dups: Optional[int] = _f("duplicate segments the peer reported with D-SACK")
    reord_seen: Optional[int] = _f("reordering events seen")
    rcv_ooopack: Optional[int] = _f("out-of-order packets received")
    snd_wnd: Optional[int] = _f("the peer's advertised receive window, bytes")
    rcv_wnd: Optional[int] = _f("this side's advertised receive window, bytes (Linux 6.2)")
    rehash: Optional[int] = _f("path rehashes (PLB or after timeouts)")
    total_rto: Optional[int] = _f("retransmission timeouts over the connection's life (Linux 6.7)")
    total_rto_recoveries: Optional[int] = _f("recoveries entered through a retransmission timeout")
    total_rto_time: Optional[int] = _f("time spent in RTO recoveries, milliseconds")
    received_ce: Optional[int] = _f("packets received with an ECN CE mark (AccECN, Linux 6.18)")
    delivered_e1_bytes: Optional[int] = _f("bytes delivered with ECT(1), per the peer's AccECN feedback")
    delivered_e0_bytes: Optional[int] = _f("bytes delivered with ECT(0), per the peer's AccECN feedback")
    delivered_ce_bytes: Optional[int] = _f("bytes delivered with CE, per the peer's AccECN feedback")
    received_e1_bytes: Optional[int] = _f("bytes received with ECT(1)")
    received_e0_bytes: Optional[int] = _f("bytes received with ECT(0)")
    received_ce_bytes: Optional[int] = _f("bytes received with CE")
    ecn_mode: Optional[int] = _f("ECN mode in use: 0 off, 1 RFC 3168 ECN, 2 AccECN, 3 pending")
    accecn_opt_seen: Optional[int] = _f("whether the AccECN option was seen from the peer (0..3)")
    accecn_fail_mode: Optional[int] = _f("AccECN negotiation failure bits")
    options2: Optional[int] = _f("more TCPI_OPT2_* bits (none defined yet)")

    def __init__(self, raw: Any, length: int) -> None:
        self._raw = raw
        #: How many bytes the kernel returned (0..TCP_INFO_SIZE).
        self.length = length

    @classmethod
    def from_bytes(cls, data: Union[bytes, bytearray, memoryview]) -> TcpInfo:
        """Decode a ``struct tcp_info`` held as bytes (from
        ``socket.getsockopt(..., TCP_INFO, n)`` or netlink's
        ``INET_DIAG_INFO``), in the host's byte order.  Bytes past
        ``len(data)`` are absent (their fields are None); bytes past
        :data:`TCP_INFO_SIZE` (a newer kernel's fields) are ignored."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes, got {type(data).__name__}")
        raw = ffi.new(_STRUCT + " *")
        n = min(len(data), TCP_INFO_SIZE)
        ffi.memmove(raw, bytes(data[:n]), n)
        return cls(raw, n)

    @property
    def state(self) -> Optional[Union[TcpState, int]]:
        """The connection's TCP state (tcpi_state) as a :class:`TcpState`
        (a bare int for a state the enum lacks); None in an empty record."""
        return TcpState.of(self._raw.tcpi_state) if self.length >= 1 else None

    def has(self, name: str) -> bool:
        """Whether the kernel returned field ``name`` (KeyError for a name
        that is not a field)."""
        return self.length >= _END[name]

    def items(self) -> Iterator[Tuple[str, Optional[int]]]:
        """``(name, value)`` for every field in the struct's order, None for
        a field the kernel did not return (``state`` as a TcpState)."""
        for name in FIELD_NAMES:
            yield name, getattr(self, name)

    def as_dict(self) -> Dict[str, Optional[int]]:
        """Every field as a dict (struct order), None for a field the
        kernel did not return."""
        return dict(self.items())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TcpInfo):
            return NotImplemented
        return self.as_dict() == other.as_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.items() if v is not None)
        return f"TcpInfo(length={self.length}, {shown})"


def tcp_info(sock: SocketLike) -> TcpInfo:
    """``getsockopt(TCP_INFO)`` of a TCP socket, decoded: the kernel fills
    the record under the socket lock, so the fields are one consistent
    snapshot.  Reads nothing from the stream and takes no pending error.

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
    retransmitting, probing or backing off, or has had data unacknowledged
    for over 2 RTOs.  Not a TCP socket, or listening: INVALID with the errno.
    """
    v = new_c_verdict()
    lib.fl_check_tcp_info(fd_of(sock), v)
    return Verdict._from_c(v)
