"""TCP_INFO decoding: the whole record, checked against ``ss -tin`` and an
independent struct.unpack of the same bytes; short records give None."""
from __future__ import annotations

import os
import re
import shutil
import socket
import struct
import subprocess
import time

import pytest
from hypothesis import given, settings, strategies as st

import fastlive
from fastlive import TcpInfo, TcpState
from fastlive.tcpinfo import FIELD_NAMES, FIELDS, TCP_INFO_SIZE

from _scale import scaled


@pytest.fixture
def busy_pair(loopback_pair):
    """A loopback pair that has moved 20 kB, then gone quiet."""
    cli, srv = loopback_pair
    for _ in range(20):
        cli.sendall(b"x" * 1000)
        srv.recv(65536)
    time.sleep(0.05)
    return cli, srv


def test_eleven_states_named_as_the_kernel_names_them():
    assert [s.name for s in TcpState] == [
        "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2",
        "TIME_WAIT", "CLOSE", "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING"]
    assert [int(s) for s in TcpState] == list(range(1, 12))
    assert TcpState.of(12) == 12           # NEW_SYN_RECV: kept as a bare int


def test_layout_is_the_uapi_one():
    # 6.19 UAPI: 280 bytes; the newest fields are the AccECN counters.
    assert TCP_INFO_SIZE == 280
    ends = dict((n, e) for n, _c, e in FIELDS)
    assert ends["state"] == 1 and ends["rto"] == 12
    assert ends["snd_wnd"] == 232 and ends["total_rto_time"] == 248
    assert ends["received_ce_bytes"] == 276 and ends["options2"] == 280
    assert len(FIELD_NAMES) == len(set(FIELD_NAMES)) == 72


@pytest.mark.tcp_info_fields("bytes_acked", "segs_out", "rtt", "snd_cwnd")
def test_full_record_on_this_kernel(busy_pair):
    cli, _ = busy_pair
    info = fastlive.tcp_info(cli)
    assert info.state is TcpState.ESTABLISHED
    assert 104 <= info.length <= TCP_INFO_SIZE
    assert info.bytes_acked >= 20000 and info.segs_out >= 20
    assert info.rtt > 0 and info.snd_cwnd > 0
    assert info.has("bytes_acked")


# Independent decoder: the UAPI layout written as a struct format.
_FMT = "<8B" + "24I" + "4Q2I4I4Q2I2Q4I" + "2I" + "2HI" + "7I" + "I"
_NAMES_FLAT = (
    ["state", "ca_state", "retransmits", "probes", "backoff", "options", "_wscale", "_b7"]
    + "rto ato snd_mss rcv_mss unacked sacked lost retrans fackets last_data_sent "
      "last_ack_sent last_data_recv last_ack_recv pmtu rcv_ssthresh rtt rttvar "
      "snd_ssthresh snd_cwnd advmss reordering rcv_rtt rcv_space total_retrans".split()
    + "pacing_rate max_pacing_rate bytes_acked bytes_received segs_out segs_in "
      "notsent_bytes min_rtt data_segs_in data_segs_out delivery_rate busy_time "
      "rwnd_limited sndbuf_limited delivered delivered_ce bytes_sent bytes_retrans "
      "dsack_dups reord_seen rcv_ooopack snd_wnd".split()
    + ["rcv_wnd", "rehash", "total_rto", "total_rto_recoveries", "total_rto_time"]
    + "received_ce delivered_e1_bytes delivered_e0_bytes delivered_ce_bytes "
      "received_e1_bytes received_e0_bytes received_ce_bytes".split()
    + ["_ecn_word"])


def _python_decode(raw: bytes) -> dict:
    vals = dict(zip(_NAMES_FLAT, struct.unpack(_FMT, raw.ljust(struct.calcsize(_FMT), b"\0"))))
    w, b7, e = vals.pop("_wscale"), vals.pop("_b7"), vals.pop("_ecn_word")
    vals.update(snd_wscale=w & 15, rcv_wscale=w >> 4,
                delivery_rate_app_limited=b7 & 1, fastopen_client_fail=(b7 >> 1) & 3,
                ecn_mode=e & 3, accecn_opt_seen=(e >> 2) & 3,
                accecn_fail_mode=(e >> 4) & 15, options2=e >> 8)
    return vals


def test_struct_format_matches_layout():
    assert struct.calcsize(_FMT) == TCP_INFO_SIZE


def test_decode_matches_independent_unpack(busy_pair):
    cli, _ = busy_pair
    raw = cli.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
    ours = TcpInfo.from_bytes(raw).as_dict()
    ref = _python_decode(raw)
    assert set(ours) == set(ref)
    for name in FIELD_NAMES:
        if ours[name] is not None:
            assert ours[name] == ref[name], name


@settings(max_examples=scaled(150), deadline=None)
@given(st.binary(min_size=0, max_size=TCP_INFO_SIZE + 16))
def test_short_records_give_none_never_garbage(data):
    info = TcpInfo.from_bytes(data)
    n = min(len(data), TCP_INFO_SIZE)
    assert info.length == n
    ref = _python_decode(data[:n])
    for name, _c, end in FIELDS:
        value = getattr(info, name)
        if end > n:
            assert value is None, name
        else:
            assert value == ref[name], name
    if n == 0:
        assert info.state is None


def test_qemu_like_four_byte_record():
    info = TcpInfo.from_bytes(bytes([1, 0, 0, 0]))
    assert info.state is TcpState.ESTABLISHED
    assert info.rto is None and info.rtt is None and info.snd_wscale is None


def _ss_fields(port: int, dport: int) -> dict:
    # both ends in the filter: a port alone can match another connection
    out = subprocess.run(
        ["ss", "-tinH", "state", "established", "src", f"127.0.0.1:{port}",
         "dst", f"127.0.0.1:{dport}"],
        capture_output=True, text=True, timeout=20).stdout
    found = {}
    for key, pat in (("rtt", r"\brtt:([\d.]+)/"), ("cwnd", r"\bcwnd:(\d+)"),
                     ("bytes_acked", r"\bbytes_acked:(\d+)"),
                     ("segs_out", r"\bsegs_out:(\d+)")):
        m = re.search(pat, out)
        if m:
            found[key] = float(m.group(1))
    found["state_ok"] = f"127.0.0.1:{port}" in out
    return found


@pytest.mark.skipif(shutil.which("ss") is None, reason="iproute2's ss is not installed")
@pytest.mark.tcp_info_fields("bytes_acked", "snd_cwnd", "segs_out", "rtt")
def test_decode_agrees_with_ss(busy_pair):
    cli, _ = busy_pair
    port, dport = cli.getsockname()[1], cli.getpeername()[1]
    before = fastlive.tcp_info(cli)
    ss = _ss_fields(port, dport)
    after = fastlive.tcp_info(cli)
    assert ss["state_ok"], "ss did not list the connection as established"
    if "rtt" not in ss and not os.path.isdir("/sys/module/tcp_diag"):
        # ss asks sock_diag (netlink); without the tcp_diag module it lists
        # /proc/net/tcp instead, which has no TCP_INFO fields
        pytest.skip("ss printed no TCP_INFO: the kernel's tcp_diag module is not loaded "
                    "(modprobe tcp_diag), so ss read /proc/net/tcp")
    assert before.state is TcpState.ESTABLISHED
    # the connection is quiet: these do not move between the two snapshots
    assert before.bytes_acked == after.bytes_acked == ss["bytes_acked"]
    assert before.snd_cwnd == after.snd_cwnd == ss["cwnd"]
    assert before.segs_out == ss["segs_out"]
    # ss prints rtt in ms with 3 decimals; ours is in microseconds
    assert abs(before.rtt / 1000 - ss["rtt"]) <= 0.0015


def test_states_through_a_close(busy_pair):
    cli, srv = busy_pair
    srv.close()
    time.sleep(0.05)
    assert fastlive.tcp_info(cli).state is TcpState.CLOSE_WAIT
    v = fastlive.check_tcp_info(cli)
    assert v.status is fastlive.Status.PEER_CLOSED
    cli.shutdown(socket.SHUT_WR)
    time.sleep(0.05)
    assert fastlive.tcp_info(cli).state in (TcpState.LAST_ACK, TcpState.CLOSE)


def test_listening_and_connecting_states():
    with socket.create_server(("127.0.0.1", 0)) as lst:
        assert fastlive.tcp_info(lst).state is TcpState.LISTEN
        assert fastlive.check_tcp_info(lst).status is fastlive.Status.INVALID


def test_repr_and_equality(busy_pair):
    cli, _ = busy_pair
    a = fastlive.tcp_info(cli)
    assert "state=<TcpState.ESTABLISHED" in repr(a)
    assert TcpInfo.from_bytes(bytes([1])) == TcpInfo.from_bytes(bytes([1]))


def _declared():
    from fastlive.tcpinfo import _Field
    return [n for n, v in vars(TcpInfo).items() if isinstance(v, _Field)]


def test_declared_fields_are_the_c_structs_in_order():
    # FIELDS is read from the compiled struct; the declarations are what
    # type checkers see.  They must not drift apart.
    assert ["state"] + _declared() == list(FIELD_NAMES)
    assert list(TcpInfo.__annotations__) == list(FIELD_NAMES[1:])
    assert set(TcpInfo.__annotations__.values()) == {"Optional[int]"}
    assert isinstance(TcpInfo.state, property)


MICROSECONDS = ("rto", "ato", "rtt", "rttvar", "min_rtt", "rcv_rtt", "busy_time",
                "rwnd_limited", "sndbuf_limited")
MILLISECONDS = ("last_data_sent", "last_data_recv", "last_ack_recv", "total_rto_time")


def test_every_field_says_what_it_is_and_times_their_unit():
    for name in _declared():
        doc = getattr(TcpInfo, name).__doc__
        assert doc and len(doc) > 10, name
    for name in MICROSECONDS:
        assert "microseconds" in getattr(TcpInfo, name).__doc__, name
    for name in MILLISECONDS:
        assert "milliseconds" in getattr(TcpInfo, name).__doc__, name
    assert TcpInfo.state.__doc__


def test_fields_are_read_only_and_from_bytes_wants_bytes():
    info = TcpInfo.from_bytes(bytes(TCP_INFO_SIZE))
    with pytest.raises(AttributeError, match="rtt"):
        info.rtt = 5
    with pytest.raises(AttributeError):
        info.bogus = 5
    with pytest.raises(TypeError, match="data"):
        TcpInfo.from_bytes("abc")
    assert TcpInfo.from_bytes(bytearray(b"\x08")).state is TcpState.CLOSE_WAIT
    assert TcpInfo.from_bytes(memoryview(bytes(TCP_INFO_SIZE + 8))).length == TCP_INFO_SIZE


def test_a_declared_field_the_struct_lacks_fails_at_class_creation():
    from fastlive.tcpinfo import _f
    with pytest.raises((TypeError, RuntimeError), match="not_a_field|__set_name__"):
        class Drifted:      # noqa: F841 - what a stale declaration would do at import
            not_a_field = _f("gone from the C struct")
