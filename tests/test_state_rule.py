"""One rule for what a socket's state means (fl_verdict_decide), on every
path: the single-socket checks, the Batch sweeps and the Monitor."""
from __future__ import annotations

import errno
import socket
import time
from typing import Callable, Iterator, List, Tuple

import pytest

import fastlive
from fastlive import Batch, Flag, Method, Monitor, Status, TcpState
from fastlive.verdict import Seen, decide

Pair = Tuple[socket.socket, socket.socket]
CHECKS = [fastlive.check_peek, fastlive.check_poll, fastlive.check_select,
          fastlive.check_tcp_info, fastlive.check_so_error,
          lambda s: fastlive.check_rcvtimeo(s, timeout=0)]
IDS = ["peek", "poll", "select", "tcp_info", "so_error", "rcvtimeo"]
SWEEPS = ("poll", "states", "tcp_info", "peek")


def sweep(b: Batch, kind: str) -> int:
    if kind == "tcp_info":
        return b.sweep_tcp_info().ndead
    return b.sweep_poll(0) if kind == "poll" else getattr(b, "sweep_" + kind)()


def settle(sock: socket.socket, state: TcpState, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while fastlive.tcp_info(sock).state is not state:
        assert time.monotonic() < deadline, f"never reached {state.name}"
        time.sleep(0.002)


@pytest.fixture
def syn_sent() -> Iterator[socket.socket]:
    """A socket stuck in SYN_SENT: the listener's accept queue (backlog 0)
    is full, so the kernel drops its SYNs."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(0)
    first = socket.create_connection(lst.getsockname(), timeout=5)
    stuck = socket.socket()
    stuck.setblocking(False)
    try:
        stuck.connect(lst.getsockname())
    except BlockingIOError:
        pass
    try:
        time.sleep(0.05)
        if fastlive.tcp_info(stuck).state is not TcpState.SYN_SENT:
            pytest.skip("the kernel completed the handshake (accept queue not full)")
        yield stuck
    finally:
        for s in (stuck, first, lst):
            s.close()


# --- the rule itself, from Python --------------------------------------------

@pytest.mark.parametrize("err,state,seen,want", [
    (errno.ETIMEDOUT, -1, 0, (Status.TIMED_OUT, errno.ETIMEDOUT)),
    (errno.ETIMEDOUT, TcpState.CLOSE, Seen.ERR, (Status.TIMED_OUT, errno.ETIMEDOUT)),
    (errno.ECONNRESET, TcpState.CLOSE, Seen.ERR | Seen.HUP, (Status.RESET, errno.ECONNRESET)),
    (errno.EPIPE, TcpState.FIN_WAIT2, 0, (Status.CLOSED, errno.EPIPE)),
    (errno.EPIPE, TcpState.CLOSE, 0, (Status.RESET, errno.EPIPE)),
    (errno.EPIPE, TcpState.LAST_ACK, 0, (Status.PEER_CLOSED, errno.EPIPE)),
    (errno.EHOSTUNREACH, -1, 0, (Status.UNREACHABLE, errno.EHOSTUNREACH)),
    (errno.EBADF, -1, 0, (Status.INVALID, errno.EBADF)),
    (0, -1, Seen.NVAL, (Status.INVALID, errno.EBADF)),
    (0, TcpState.CLOSE, Seen.UNCONNECTED, (Status.INVALID, errno.ENOTCONN)),
    (0, TcpState.SYN_SENT, 0, (Status.INVALID, errno.ENOTCONN)),
    (0, TcpState.LISTEN, 0, (Status.INVALID, errno.EOPNOTSUPP)),
    (errno.ENOTCONN, TcpState.CLOSE, 0, (Status.CLOSED, 0)),
    (0, TcpState.CLOSE_WAIT, Seen.RDHUP, (Status.PEER_CLOSED, 0)),
    (0, TcpState.ESTABLISHED, Seen.RDHUP, (Status.CLOSED, 0)),
    (0, TcpState.FIN_WAIT2, 0, (Status.ALIVE, 0)),
    (0, TcpState.ESTABLISHED, Seen.IN, (Status.ALIVE, 0)),
    (errno.EAGAIN, TcpState.ESTABLISHED, Seen.EXPIRED, (Status.TIMED_OUT, errno.EAGAIN)),
    (errno.EAGAIN, TcpState.ESTABLISHED, 0, (Status.ALIVE, 0)),
])
def test_decide_table(err, state, seen, want):
    v = decide(Method.EPOLL, err, state, seen)
    assert (v.status, v.errno) == want
    assert v.method is Method.EPOLL
    local = (state in (TcpState.FIN_WAIT2, TcpState.LAST_ACK) and err == errno.EPIPE) or \
        (state is TcpState.ESTABLISHED and seen == Seen.RDHUP)
    assert bool(v.flags & Flag.LOCAL_SHUTDOWN) == local


# --- never connected, connecting -------------------------------------------------

@pytest.mark.tcp_info_fields("segs_in", "segs_out")
def test_never_connected_is_invalid_everywhere():
    with socket.socket() as s:
        for check in CHECKS:
            v = check(s)
            assert (v.status, v.errno) == (Status.INVALID, errno.ENOTCONN), v
        b = Batch([s])
        for kind in ("init",) + SWEEPS:
            if kind != "init":
                assert sweep(b, kind) == 1
            [d] = b.dead()
            assert (d.status, d.errno) == (Status.INVALID, errno.ENOTCONN), kind
        with Monitor() as m, pytest.raises(OSError) as ei:
            m.add(s)
        assert ei.value.errno == errno.ENOTCONN and len(m) == 0


def test_connecting_socket_is_invalid_everywhere(syn_sent):
    for check in CHECKS:
        v = check(syn_sent)
        assert (v.status, v.errno) == (Status.INVALID, errno.ENOTCONN), v
    b = Batch([syn_sent])
    for kind in SWEEPS:
        assert sweep(b, kind) == 1 and b.dead()[0][2:4] == (Status.INVALID, errno.ENOTCONN)
    with Monitor() as m, pytest.raises(OSError) as ei:
        m.add(syn_sent)
    assert ei.value.errno == errno.ENOTCONN


# --- our own shutdown is not the peer's doing --------------------------------------

def test_own_shut_rd_is_not_the_peers_fin(loopback_pair):
    cli, srv = loopback_pair
    cli.shutdown(socket.SHUT_RD)
    for check in (fastlive.check_peek, fastlive.check_poll, fastlive.check_select):
        v = check(cli)
        assert v.status is Status.CLOSED and v.flags & Flag.LOCAL_SHUTDOWN, (check, v)
        assert v.tcp_state is TcpState.ESTABLISHED
    assert fastlive.check_tcp_info(cli).alive            # the state alone: nothing
    b = Batch([cli])
    for kind in ("poll", "peek"):
        assert sweep(b, kind) == 1
        d = b.dead()[0]
        assert d.status is Status.CLOSED and d.flags & Flag.LOCAL_SHUTDOWN, kind
        assert d.verdict.status is Status.CLOSED
    # the peer really closing now is the peer's doing again
    srv.close()
    settle(cli, TcpState.CLOSE_WAIT)
    assert fastlive.check_poll(cli).status is Status.PEER_CLOSED
    assert sweep(b, "poll") == 1 and b.dead()[0].status is Status.PEER_CLOSED


def test_own_shut_wr_then_send_is_not_a_reset(loopback_pair):
    cli, srv = loopback_pair
    cli.shutdown(socket.SHUT_WR)
    settle(cli, TcpState.FIN_WAIT2)
    r = fastlive.send(cli, b"x")
    assert r.sent == 0
    assert (r.verdict.status, r.verdict.errno) == (Status.CLOSED, errno.EPIPE)
    assert r.verdict.flags & Flag.LOCAL_SHUTDOWN
    assert r.verdict.tcp_state is TcpState.FIN_WAIT2
    # the peer is alive and can still talk to us
    for check in (fastlive.check_poll, fastlive.check_peek, fastlive.check_tcp_info):
        assert check(cli).alive, check
    b = Batch([cli])
    for kind in SWEEPS:
        assert sweep(b, kind) == 0, kind
    srv.sendall(b"late")
    assert cli.recv(10) == b"late"


def test_own_shut_rd_in_monitor(loopback_pairs: Callable[[int], List[Pair]]):
    (a, _ap), (b, bp) = loopback_pairs(2)
    with Monitor() as m:
        m.add(a, key="a")
        m.add(b, key="b")
        a.shutdown(socket.SHUT_RD)
        bp.close()
        got = {}
        deadline = time.monotonic() + 5
        while len(got) < 2 and time.monotonic() < deadline:
            got.update({d.key: d for d in m.wait(0.5)})
        assert got["a"].status is Status.CLOSED and got["a"].flags & Flag.LOCAL_SHUTDOWN
        assert got["b"].status is Status.PEER_CLOSED
        assert not got["b"].flags & Flag.LOCAL_SHUTDOWN


def test_rst_is_reset_and_closed_after(loopback_pair):
    import struct
    cli, srv = loopback_pair
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    srv.close()
    settle(cli, TcpState.CLOSE)
    b = Batch([cli])
    assert sweep(b, "poll") == 1
    assert b.dead()[0][2:4] == (Status.RESET, errno.ECONNRESET)
    # the error was taken: the next single check sees the closed connection
    v = fastlive.check_poll(cli)
    assert (v.status, v.errno) == (Status.CLOSED, 0)
