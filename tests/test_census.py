"""fastlive.census and census_follow against the real kernel, and the netlink
parser (fl_census_parse) against arbitrary bytes.

Loopback only.  The census sees every TCP socket of the namespace (other
tests' too), so every assertion is about sockets this test made, found by
their ports.
"""
from __future__ import annotations

import errno
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Dict, List, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastlive
from fastlive import TcpInfo, TcpState
from fastlive._lib import ffi, lib
from fastlive.census import Census, parse_states

from _scale import scaled

Pair = Tuple[socket.socket, socket.socket]


def _server(family: int = socket.AF_INET) -> socket.socket:
    lst = socket.socket(family, socket.SOCK_STREAM)
    lst.bind(("127.0.0.1" if family == socket.AF_INET else "::1", 0))
    lst.listen(512)
    return lst


def _pairs(lst: socket.socket, n: int) -> List[Pair]:
    out = []
    addr = lst.getsockname()[:2]
    for _ in range(n):
        c = socket.socket(lst.family, socket.SOCK_STREAM)
        c.settimeout(5)
        c.connect(addr)
        s, _ = lst.accept()
        out.append((c, s))
    return out


@pytest.fixture
def server() -> object:
    made: List[socket.socket] = []

    class Maker:
        def listen(self, family: int = socket.AF_INET) -> socket.socket:
            lst = _server(family)
            made.append(lst)
            return lst

        def pairs(self, lst: socket.socket, n: int) -> List[Pair]:
            ps = _pairs(lst, n)
            for a, b in ps:
                made.extend((a, b))
            return ps

    yield Maker()
    for s in made:
        s.close()


def _inode(fd: int) -> int:
    m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"/proc/self/fd/{fd}"))
    assert m
    return int(m.group(1))


def _key(e: fastlive.CensusEntry) -> Tuple[Tuple[str, int], Tuple[str, int]]:
    return e.local, e.remote


# --- the dump -------------------------------------------------------------------


def test_sees_this_process_sockets_with_fds_and_tcp_info(server) -> None:  # type: ignore[no-untyped-def]
    lst = server.listen()
    pairs = server.pairs(lst, 5)
    pairs[0][0].sendall(b"x" * 1000)
    assert pairs[0][1].recv(2000)
    c = fastlive.census(own=True)
    assert isinstance(c, Census)
    by = {_key(e): e for e in c}
    for a, b in pairs:
        e = by[(a.getsockname(), a.getpeername())]
        assert e.state is TcpState.ESTABLISHED
        assert e.fd == a.fileno()
        assert e.inode == _inode(a.fileno())
        assert e.uid == os.getuid()
        assert e.family == socket.AF_INET
        info = e.info
        assert isinstance(info, TcpInfo)
        assert info.state is TcpState.ESTABLISHED
        assert info.length > 100
        assert by[(b.getsockname(), b.getpeername())].fd == b.fileno()
    e0 = by[(pairs[0][0].getsockname(), pairs[0][0].getpeername())]
    assert e0.info is not None and e0.info.bytes_acked == 1001   # SYN counts one
    # the listener, too, and it has its own fd
    lrec = by[(lst.getsockname(), ("0.0.0.0", 0))]
    assert lrec.state is TcpState.LISTEN and lrec.fd == lst.fileno()
    # own=True keeps only sockets with an fd here
    assert all(e.fd is not None for e in c)


def test_ipv6_and_family_filter(server) -> None:  # type: ignore[no-untyped-def]
    try:
        lst6 = server.listen(socket.AF_INET6)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    lst4 = server.listen()
    (a6, _b6), = server.pairs(lst6, 1)
    (a4, _b4), = server.pairs(lst4, 1)
    p6, p4 = lst6.getsockname()[1], lst4.getsockname()[1]
    both = {_key(e) for e in fastlive.census(port=p6)} | {_key(e) for e in fastlive.census(port=p4)}
    assert (a6.getsockname()[:2], a6.getpeername()[:2]) in both
    assert (a4.getsockname(), a4.getpeername()) in both
    only6 = fastlive.census(family=socket.AF_INET6, port=p6)
    assert {e.family for e in only6} == {socket.AF_INET6} and len(only6) == 3
    assert len(fastlive.census(family=socket.AF_INET, port=p6)) == 0
    assert len(fastlive.census(family=socket.AF_INET6, port=p4)) == 0


def test_states_and_port_filters(server) -> None:  # type: ignore[no-untyped-def]
    lst = server.listen()
    pairs = server.pairs(lst, 6)
    port = lst.getsockname()[1]
    for a, _b in pairs[:2]:
        a.close()                       # a: FIN_WAIT2, b: CLOSE_WAIT
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        cw = fastlive.census(port=port, states=[TcpState.CLOSE_WAIT])
        # and the closing ends past FIN_WAIT1 (the peer's ACK processed)
        if len(cw) == 2 and len(fastlive.census(port=port, states="fin-wait2")) == 2:
            break
        time.sleep(0.01)
    assert {e.state for e in cw} == {TcpState.CLOSE_WAIT}
    assert {e.local for e in cw} == {(b.getsockname()) for _a, b in pairs[:2]}
    est = fastlive.census(port=port, states="established")
    assert len(est) == 8 and all(e.state is TcpState.ESTABLISHED for e in est)
    assert len(fastlive.census(port=port, states=["listen"])) == 1
    fw = fastlive.census(port=port, states=("fin-wait2", "FIN_WAIT1"))
    assert len(fw) == 2 and {e.state for e in fw} == {TcpState.FIN_WAIT2}
    everything = fastlive.census(port=port)
    assert len(everything) == 1 + 8 + 2 + 2
    # the port matches either end: the client side of each pair has it as remote
    assert sum(e.remote[1] == port for e in everything) == 6


def test_port_filter_runs_in_the_kernel(server) -> None:  # type: ignore[no-untyped-def]
    """The kernel sends only what matches: the bytes and messages of a
    filtered dump follow the matches, not the sockets of the machine."""
    big = server.listen()
    small = server.listen()
    server.pairs(big, 150)
    server.pairs(small, 2)
    cb = fastlive.census(port=big.getsockname()[1])
    cs = fastlive.census(port=small.getsockname()[1])
    assert len(cb) == 301 and len(cs) == 5
    # one netlink message per matching socket plus the DONE (one walk)
    assert cs.messages == len(cs) + 1
    assert cb.messages == len(cb) + 1
    assert cs.bytes_read * 30 < cb.bytes_read
    assert cb.bytes_read // len(cb) == pytest.approx(cs.bytes_read // len(cs), rel=0.2)
    # and the two results are disjoint and complete
    ports = {e.local[1] for e in cb} | {e.remote[1] for e in cb}
    assert big.getsockname()[1] in ports and small.getsockname()[1] not in ports


def test_info_false_skips_tcp_info(server) -> None:  # type: ignore[no-untyped-def]
    lst = server.listen()
    server.pairs(lst, 3)
    port = lst.getsockname()[1]
    with_info = fastlive.census(port=port)
    without = fastlive.census(port=port, info=False)
    assert len(without) == len(with_info) == 7
    assert all(e.info is None for e in without)
    assert all(e.info is not None for e in with_info)
    assert without.bytes_read < with_info.bytes_read


def _ss(port: int) -> Dict[Tuple[str, str], Dict[str, str]]:
    out = subprocess.run(
        ["ss", "-tineHO", "state", "all", f"( sport = :{port} or dport = :{port} )"],
        capture_output=True, text=True, timeout=30, check=True).stdout
    rows = {}
    for line in out.splitlines():
        f = line.split()
        if len(f) < 5:
            continue
        row = {"state": f[0], "local": f[3], "remote": f[4]}
        for tok in f[5:]:
            if ":" in tok:
                k, v = tok.split(":", 1)
                row.setdefault(k, v)
        rows[(f[3], f[4])] = row
    return rows


_SS_STATE = {"ESTAB": "ESTABLISHED", "CLOSE-WAIT": "CLOSE_WAIT", "FIN-WAIT-2": "FIN_WAIT2",
             "FIN-WAIT-1": "FIN_WAIT1", "LISTEN": "LISTEN", "TIME-WAIT": "TIME_WAIT",
             "SYN-SENT": "SYN_SENT", "SYN-RECV": "SYN_RECV", "LAST-ACK": "LAST_ACK",
             "CLOSING": "CLOSING", "UNCONN": "CLOSE"}


@pytest.mark.skipif(shutil.which("ss") is None, reason="ss (iproute2) is not installed")
def test_agrees_with_ss(server) -> None:  # type: ignore[no-untyped-def]
    lst = server.listen()
    pairs = server.pairs(lst, 40)
    port = lst.getsockname()[1]
    for a, b in pairs[:20]:
        a.sendall(b"ping" * 100)
        b.recv(1000)
    for a, _b in pairs[30:35]:
        a.close()
    time.sleep(0.05)
    mine = fastlive.census(port=port)
    theirs = _ss(port)

    def addr(hp: Tuple[str, int]) -> str:
        return f"{hp[0]}:{hp[1] if hp[1] else '*'}"

    got = {(addr(e.local), addr(e.remote)): e for e in mine}
    assert set(got) == set(theirs)
    for k, e in got.items():
        row = theirs[k]
        assert _SS_STATE[row["state"]] == e.state.name   # type: ignore[union-attr]
        assert int(row["ino"]) == e.inode
        if "rtt" in row:
            assert e.info is not None
            rtt_ms = float(row["rtt"].split("/")[0])
            assert abs(rtt_ms - e.info.rtt / 1000) <= 0.0015   # ss prints %g of ms


# --- bad input ------------------------------------------------------------------


@pytest.mark.parametrize("kw, exc", [
    ({"states": "bogus"}, ValueError), ({"states": 0}, ValueError), ({"states": 12}, ValueError),
    ({"states": []}, ValueError), ({"states": 3.5}, TypeError), ({"states": [None]}, TypeError),
    ({"states": True}, TypeError),
    ({"port": -1}, ValueError), ({"port": 65536}, ValueError), ({"port": 2**70}, ValueError),
    ({"port": "80"}, TypeError), ({"port": True}, TypeError), ({"port": 80.0}, TypeError),
    ({"family": 99}, ValueError), ({"family": "inet"}, TypeError),
    ({"own": "yes"}, TypeError),
])
def test_bad_arguments_name_the_parameter(kw: Dict[str, object], exc: type) -> None:
    with pytest.raises(exc) as ei:
        fastlive.census(**kw)   # type: ignore[arg-type]
    assert next(iter(kw)) in str(ei.value)


def test_parse_states() -> None:
    assert parse_states(None) == 0
    assert parse_states(TcpState.LISTEN) == 1 << 10
    assert parse_states(["close-wait", 1]) == (1 << 8) | 2
    with pytest.raises(TypeError, match="timeout"):
        fastlive.census_follow(timeout="1")   # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        fastlive.census_follow(timeout=-1)
    with pytest.raises(ValueError, match="rcvbuf"):
        fastlive.census_follow(rcvbuf=-1)


# --- the parser on synthetic and arbitrary bytes ----------------------------------

NLMSG_ERROR, NLMSG_DONE, SOCK_DIAG_BY_FAMILY = 2, 3, 20
NLM_F_MULTI, NLM_F_DUMP_INTR = 2, 16
INET_DIAG_INFO = 2


def _rta(typ: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, typ) + payload + b"\0" * (-n % 4)


def _diag(family: int = 2, state: int = 1, sport: int = 1234, dport: int = 80,
          src: bytes = b"\x7f\0\0\1", dst: bytes = b"\x7f\0\0\2", inode: int = 777,
          uid: int = 1000, attrs: bytes = b"", timer: int = 1, wq: int = 7) -> bytes:
    body = struct.pack("=BBBB", family, state, timer, 2)
    body += struct.pack(">HH", sport, dport) + src.ljust(16, b"\0") + dst.ljust(16, b"\0")
    body += struct.pack("=III", 3, 0xAABBCCDD, 0x11223344)      # if, cookie[0], cookie[1]
    body += struct.pack("=IIIII", 5, 6, wq, uid, inode)        # expires rq wq uid inode
    return body + attrs


def _msg(typ: int, payload: bytes, flags: int = NLM_F_MULTI, seq: int = 0) -> bytes:
    n = 16 + len(payload)
    return struct.pack("=IHHII", n, typ, flags, seq, 0) + payload + b"\0" * (-n % 4)


def _info_bytes(n: int) -> bytes:
    raw = ffi.new("struct fl_tcp_info *")
    raw.tcpi_state = 1
    raw.tcpi_rtt = 4321
    raw.tcpi_bytes_acked = 99
    return bytes(ffi.buffer(raw))[:n]


class Parser:
    def __init__(self) -> None:
        p = ffi.new("struct fl_census **")
        assert lib.fl_census_new(p) == 0
        self.c = ffi.gc(p[0], lib.fl_census_free)

    def feed(self, data: bytes, seq: int = 0) -> int:
        buf = ffi.new("char[]", max(len(data), 1))   # malloc'd: aligned
        ffi.memmove(buf, data, len(data))
        return int(lib.fl_census_parse(self.c, buf, len(data), seq))

    def census(self) -> Census:
        return Census(self.c)


def test_parser_decodes_a_message() -> None:
    p = Parser()
    info = _info_bytes(ffi.sizeof("struct fl_tcp_info"))
    data = _msg(SOCK_DIAG_BY_FAMILY, _diag(attrs=_rta(99, b"abc") + _rta(INET_DIAG_INFO, info)))
    data += _msg(SOCK_DIAG_BY_FAMILY, _diag(family=10, src=socket.inet_pton(socket.AF_INET6, "::1"),
                                            dst=socket.inet_pton(socket.AF_INET6, "fe80::1"), state=8))
    assert p.feed(data) == lib.FL_PARSE_MORE
    assert p.feed(_msg(NLMSG_DONE, b"\0\0\0\0")) == lib.FL_PARSE_DONE
    c = p.census()
    assert len(c) == 2 and c.skipped == 0
    e = c[0]
    assert e.local == ("127.0.0.1", 1234) and e.remote == ("127.0.0.2", 80)
    assert e.state is TcpState.ESTABLISHED and e.inode == 777 and e.uid == 1000
    assert (e.rqueue, e.wqueue, e.expires_ms, e.retrans) == (6, 7, 5, 2)
    assert e.cookie == 0x11223344AABBCCDD
    assert e.info is not None and e.info.rtt == 4321 and e.info.bytes_acked == 99
    assert c[1].local == ("::1", 1234) and c[1].remote == ("fe80::1", 80)
    assert c[1].state is TcpState.CLOSE_WAIT and c[1].info is None


def test_parser_short_tcp_info_is_decoded_by_its_length() -> None:
    p = Parser()
    p.feed(_msg(SOCK_DIAG_BY_FAMILY, _diag(attrs=_rta(INET_DIAG_INFO, _info_bytes(104)))))
    info = p.census()[0].info
    assert info is not None and info.length == 104
    assert info.rtt == 4321 and info.bytes_acked is None       # beyond 104 bytes


def test_parser_errors_flags_and_truncation() -> None:
    p = Parser()
    assert p.feed(_msg(NLMSG_ERROR, struct.pack("=i", -errno.EPERM) + b"\0" * 16)) == -errno.EPERM
    assert p.feed(_msg(NLMSG_ERROR, struct.pack("=i", 0))) == 0              # an ACK
    assert p.feed(_msg(NLMSG_ERROR, struct.pack("=i", 5))) == -errno.EPROTO
    assert p.feed(_msg(NLMSG_ERROR, b"")) == -errno.EBADMSG
    # NLM_F_DUMP_INTR is remembered
    p.feed(_msg(SOCK_DIAG_BY_FAMILY, _diag(), flags=NLM_F_MULTI | NLM_F_DUMP_INTR))
    assert p.census().interrupted
    # a message longer than the buffer
    whole = _msg(SOCK_DIAG_BY_FAMILY, _diag())
    q = Parser()
    assert q.feed(whole[:-8]) == -errno.EBADMSG and len(q.census()) == 0
    assert q.census().skipped == 1
    # a truncated attribute: the record is kept, the damage counted
    bad_attr = _diag() + struct.pack("=HH", 200, INET_DIAG_INFO) + b"x" * 8
    assert q.feed(_msg(SOCK_DIAG_BY_FAMILY, bad_attr)) == 0
    assert len(q.census()) == 1 and q.census().skipped == 2 and q.census()[0].info is None
    # a short diag payload, an unknown family: skipped and counted
    assert q.feed(_msg(SOCK_DIAG_BY_FAMILY, b"\x02" * 40) + _msg(SOCK_DIAG_BY_FAMILY, _diag(family=1))) == 0
    assert len(q.census()) == 1 and q.census().skipped == 4
    # a stale sequence number is skipped
    r = Parser()
    assert r.feed(_msg(SOCK_DIAG_BY_FAMILY, _diag(), seq=5), seq=6) == 0 and len(r.census()) == 0
    # an unaligned buffer is refused, not misread
    buf = ffi.new("char[]", len(whole) + 1)
    ffi.memmove(buf + 1, whole, len(whole))
    assert lib.fl_census_parse(r.c, buf + 1, len(whole), 0) == -errno.EINVAL


def _corpus() -> List[bytes]:
    info = _info_bytes(ffi.sizeof("struct fl_tcp_info"))
    one = _msg(SOCK_DIAG_BY_FAMILY, _diag(attrs=_rta(1, b"m" * 16) + _rta(INET_DIAG_INFO, info)))
    return [one, one * 3 + _msg(NLMSG_DONE, b"\0" * 4),
            _msg(SOCK_DIAG_BY_FAMILY, _diag(family=10)) + _msg(NLMSG_ERROR, struct.pack("=i", -1))]


def _check_parse(data: bytes) -> None:
    p = Parser()
    rc = p.feed(data)
    assert rc in (0, 1) or -4095 <= rc < 0
    c = p.census()
    assert 0 <= len(c) <= len(data) // 88 + 1
    for e in c:                         # every record reads back
        e.as_dict()


@settings(max_examples=scaled(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_fuzz_parser_arbitrary_bytes(data: bytes) -> None:
    _check_parse(data)


@settings(max_examples=scaled(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_corpus()), st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)),
                                            max_size=12), st.integers(0, 4096))
def test_fuzz_parser_mutated_messages(base: bytes, flips: List[Tuple[int, int]], cut: int) -> None:
    data = bytearray(base)
    for at, val in flips:
        data[at % len(data)] = val
    _check_parse(bytes(data[:cut] if cut < len(data) else data))


def test_fuzz_parser_length_fields() -> None:
    """A libFuzzer-style loop aimed at every length field: nlmsg_len and
    rta_len set to every boundary value (3,000 rounds; 450 emulated)."""
    rng = random.Random(13)
    base = _corpus()[1]
    for _ in range(scaled(3000)):
        data = bytearray(base)
        at = rng.randrange(0, len(data) - 4)
        val = rng.choice([0, 1, 3, 4, 15, 16, 17, 88, 91, 92, 0xFFFF, 0xFFFFFFFF,
                          len(data), len(data) + 4, rng.randrange(0, 1 << 32)])
        if rng.random() < 0.5:
            struct.pack_into("=I", data, at & ~3, val & 0xFFFFFFFF)
        else:
            struct.pack_into("=H", data, at & ~1, val & 0xFFFF)
        if rng.random() < 0.5:
            struct.pack_into("=I", data, 0, val & 0xFFFFFFFF)
        _check_parse(bytes(data[:rng.randrange(0, len(data) + 1)]))


def _info_with(**fields: int) -> bytes:
    raw = ffi.new("struct fl_tcp_info *")
    raw.tcpi_state = 1
    raw.tcpi_rto = 200000
    raw.tcpi_snd_wnd = 65535
    for k, v in fields.items():
        setattr(raw, "tcpi_" + k, v)
    return bytes(ffi.buffer(raw))


@pytest.mark.parametrize("state, timer, wq, info, why", [
    (1, 0, 0, _info_with(), []),
    (8, 0, 0, _info_with(state=8), ["close-wait"]),
    (1, 1, 10, _info_with(retransmits=2, unacked=1), ["retransmitting"]),
    (1, 1, 10, _info_with(backoff=1, unacked=1, last_ack_recv=500), ["retransmitting", "no-ack"]),
    (1, 4, 10, _info_with(probes=1), ["zero-window"]),
    (1, 0, 10, _info_with(snd_wnd=0), ["zero-window"]),
    (1, 0, 0, _info_with(snd_wnd=0), []),                      # nothing queued: not stuck
    (1, 1, 10, _info_with(unacked=3, last_ack_recv=401), ["no-ack"]),
    (1, 1, 10, _info_with(unacked=3, last_ack_recv=400), []),  # exactly 2 RTOs
    (1, 2, 0, _info_with(probes=2), ["keepalive"]),
    (10, 0, 0, _info_with(state=10, retransmits=1), []),        # LISTEN: never suspect
    (1, 2, 0, _info_with(probes=2)[:3], []),                   # probes beyond the length
])
def test_suspect_rules(state: int, timer: int, wq: int, info: bytes, why: List[str]) -> None:
    p = Parser()
    p.feed(_msg(SOCK_DIAG_BY_FAMILY, _diag(state=state, timer=timer, wq=wq,
                                           attrs=_rta(INET_DIAG_INFO, info))))
    c = p.census()
    assert c[0].why == why
    assert (c.why()[0] != 0) == bool(why)


def test_port_bytecode_layout() -> None:
    out = ffi.new("uint8_t[64]")
    assert lib.fl_census_port_bytecode(-1, out, 64) == -errno.EINVAL
    assert lib.fl_census_port_bytecode(65536, out, 64) == -errno.EINVAL
    assert lib.fl_census_port_bytecode(80, out, 8) == -errno.ENOSPC
    n = lib.fl_census_port_bytecode(80, out, 64)
    assert n == 36
    ops = [struct.unpack_from("=BBH", bytes(out[0:n]), k) for k in range(0, n, 4)]
    assert [o[2] for o in ops if o[0] == 0] == [80, 80, 80, 80]


# --- the death log ------------------------------------------------------------------


def _mine(deaths: List[fastlive.CensusEntry], port: int) -> List[fastlive.CensusEntry]:
    return [d for d in deaths if port in (d.local[1], d.remote[1])]


def test_follow_reports_deaths_with_final_tcp_info(server) -> None:  # type: ignore[no-untyped-def]
    lst = server.listen()
    port = lst.getsockname()[1]
    (a, b), = server.pairs(lst, 1)
    with fastlive.census_follow(timeout=10) as f:
        a.sendall(b"y" * 5000)
        got = 0
        while got < 5000:
            got += len(b.recv(65536))
        a_name = a.getsockname()
        a.close()
        b.close()
        seen: List[fastlive.CensusEntry] = []
        for d in f:
            if port in (d.local[1], d.remote[1]):
                seen.append(d)
            if len(seen) == 2:
                break
    assert f.closed
    assert len(seen) == 2
    by = {d.local: d for d in seen}
    da = by[a_name]
    assert da.state is TcpState.CLOSE and da.inode == 0
    assert da.info is not None and da.info.bytes_acked is not None and da.info.bytes_acked >= 5001
    assert da.info.rtt is not None and da.info.rtt > 0
    db = by[(a_name[0], port)]
    assert db.info is not None and db.info.bytes_received is not None and db.info.bytes_received >= 5001


def test_follow_timeout_and_stop_from_another_thread() -> None:
    f = fastlive.census_follow(timeout=0.3)
    t0 = time.monotonic()
    for _ in f:                        # other tests' sockets may die meanwhile
        pass
    assert 0.25 <= time.monotonic() - t0 < 3 and f.closed
    g = fastlive.census_follow()
    threading.Timer(0.2, g.stop).start()
    t0 = time.monotonic()
    for _ in g:
        assert time.monotonic() - t0 < 5
    assert time.monotonic() - t0 < 3 and g.closed
    assert g.poll(0.1) == []            # closed: nothing, no error


def test_follow_counts_lost_events_on_enobufs(server) -> None:  # type: ignore[no-untyped-def]
    lst = server.listen()
    port = lst.getsockname()[1]
    pairs = _pairs(lst, 150)
    with fastlive.census_follow(rcvbuf=4096) as f:   # the kernel's minimum
        for a, b in pairs:
            a.close()
            b.close()
        time.sleep(0.3)
        deaths: List[fastlive.CensusEntry] = []
        for _ in range(50):
            more = f.poll(0.05)
            deaths += more
            if not more:
                break
        mine = len(_mine(deaths, port))
        assert f.lost > 0
        assert mine + f.lost >= 300 - 4      # each lost one counted (others' too)
        assert mine < 300


NOBODY_SCRIPT = r"""
import os, socket, sys, json
sys.path.insert(0, sys.argv[1])
port = int(sys.argv[2])
import fastlive   # imported as root: nobody may not read the interpreter's site-packages
os.setgroups([]); os.setgid(65534); os.setuid(65534)
assert os.geteuid() == 65534
c = fastlive.census(port=port)
f = fastlive.census_follow(timeout=0.1)
list(f)
print(json.dumps([[e.uid, e.info is not None, e.state.name] for e in c]))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to nobody")
def test_non_root_sees_other_users_sockets_with_tcp_info(server) -> None:  # type: ignore[no-untyped-def]
    lst = server.listen()
    server.pairs(lst, 2)
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastlive.__file__)))
    out = subprocess.run([sys.executable, "-c", NOBODY_SCRIPT, root, str(lst.getsockname()[1])],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    import json
    rows = json.loads(out.stdout)
    assert len(rows) == 5
    assert all(uid == 0 and has_info for uid, has_info, _st in rows)


def test_signals_during_dumps_are_retried_not_errors(server) -> None:  # type: ignore[no-untyped-def]
    """A signal handler installed without SA_RESTART (Python's default)
    makes recvmsg/poll fail with EINTR mid-dump: the C loop retries."""
    import signal
    lst = server.listen()
    server.pairs(lst, 50)
    port = lst.getsockname()[1]
    hits = [0]

    def on_alarm(_sig: int, _frame: object) -> None:
        hits[0] += 1

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
    try:
        # ours only: a TIME_WAIT left by an earlier test on the same port
        # number, or a socket on another address, may match the port too
        host = lst.getsockname()[0]
        sizes = {sum(1 for e in fastlive.census(port=port)
                     if e.local[0] == host and e.state != fastlive.TcpState.TIME_WAIT)
                 for _ in range(scaled(200, minimum=30))}   # emulated: slower dumps, as many signals
        with fastlive.census_follow() as f:
            for _ in range(5):
                f.poll(0.02)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)
    assert sizes == {101}
    assert hits[0] > 10


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("gcc"), reason="the plain-C baseline needs gcc")
def test_bench_census_quick() -> None:
    """The benchmark runs (speed is not asserted: it prints ratios)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastlive.__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "bench", "bench_census.py"), "--quick"],
                         capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "N = 500 connections" in out.stdout
    assert "| 500 |" in out.stdout and "plain C" in out.stdout


def test_datagram_longer_than_the_buffer_grows_it_and_dumps_again(server) -> None:  # type: ignore[no-untyped-def]
    """MSG_TRUNC: a kernel datagram that did not fit is never half-read; the
    dump starts again with a buffer twice as large."""
    lst = server.listen()
    pairs = server.pairs(lst, 20)
    port = lst.getsockname()[1]
    ours = {_inode(s.fileno()) for s in [lst] + [s for pair in pairs for s in pair]}

    def mine(entries) -> set:  # type: ignore[no-untyped-def]
        # another process's socket may share the port number (a TIME_WAIT
        # left by an earlier connection whose ephemeral port it was)
        return {(e.local, e.remote, e.inode) for e in entries if e.inode in ours}
    p = Parser()
    assert lib.fl_census_set_buffer(p.c, 100) == -errno.EINVAL
    assert lib.fl_census_set_buffer(p.c, 512) == 0 and p.c.bufsize == 512
    n = lib.fl_census_dump(p.c, 3, 0, port, 1)
    assert n >= 41 and len(mine(p.census())) == 41
    assert p.c.bufsize > 512                       # grown on MSG_TRUNC
    assert mine(p.census()) == mine(fastlive.census(port=port))
    assert all(e.info is not None for e in p.census())


def test_own_with_a_dup_gives_the_lowest_fd(server) -> None:  # type: ignore[no-untyped-def]
    lst = server.listen()
    (a, _b), = server.pairs(lst, 1)
    hi = os.dup2(a.fileno(), 1000 + a.fileno())
    try:
        mine = [e for e in fastlive.census(own=True, port=lst.getsockname()[1])
                if e.local == a.getsockname()]
        assert len(mine) == 1 and mine[0].fd == a.fileno() < hi
    finally:
        os.close(hi)


def test_own_with_many_dups_gives_the_lowest_fd(server) -> None:  # type: ignore[no-untyped-def]
    lst = server.listen()
    (a, _b), = server.pairs(lst, 1)
    dups = [os.dup2(a.fileno(), 900 + k * 7) for k in (3, 1, 2, 0, 4)]
    try:
        mine = [e for e in fastlive.census(own=True, port=lst.getsockname()[1])
                if e.local == a.getsockname()]
        assert [e.fd for e in mine] == [a.fileno()]
        a_fd = a.fileno()
        a.detach()
        os.close(a_fd)                        # now the lowest is a dup
        mine = [e for e in fastlive.census(own=True, port=lst.getsockname()[1])
                if e.remote[1] == lst.getsockname()[1]]
        assert [e.fd for e in mine] == [min(dups)]
    finally:
        for fd in dups:
            os.close(fd)


def test_dumps_racing_sockets_opened_and_closed(server) -> None:  # type: ignore[no-untyped-def]
    """Dumps while another thread opens and closes connections: never an
    error or a half-read record, and the sockets that stay are always seen
    (whether the churned ones are seen depends on when they come and go)."""
    stable_lst = server.listen()
    stable = server.pairs(stable_lst, 10)
    churn_lst = server.listen()
    stop = threading.Event()
    churned = [0]

    def churn() -> None:
        addr = churn_lst.getsockname()
        while not stop.is_set():
            ps = []
            for _ in range(20):
                c = socket.create_connection(addr, timeout=5)
                s, _ = churn_lst.accept()
                ps.append((c, s))
            for c, s in ps:
                c.close()
                s.close()
            churned[0] += 20

    t = threading.Thread(target=churn, daemon=True)
    t.start()
    want = {(a.getsockname(), a.getpeername()) for a, _b in stable}
    try:
        deadline = time.monotonic() + 1.0
        dumps = 0
        valid = set(TcpState)
        while time.monotonic() < deadline or dumps < 3:
            c = fastlive.census()                   # the whole machine
            assert c.skipped == 0 and set(c.states()) <= valid
            # the same walk, the kernel keeping only the stable port
            s = fastlive.census(port=stable_lst.getsockname()[1])
            assert want <= {(e.local, e.remote) for e in s}
            assert s.skipped == 0
            dumps += 1
    finally:
        stop.set()
        t.join(10)
    assert dumps >= 3 and churned[0] >= 40
