"""The single-socket checks (methods 1, 2, 5) on real loopback sockets."""
from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import sys
import time

import pytest

import fastlive
from fastlive import Flag, Method, Status


@pytest.fixture
def conn(loopback_pair):
    """(client, server) on 127.0.0.1, closed after the test."""
    return loopback_pair


def settle(sock: socket.socket, timeout: float = 2.0) -> None:
    """Wait until the kernel has an event for sock, without taking it."""
    p = select.poll()
    p.register(sock, select.POLLIN | select.POLLRDHUP)
    assert p.poll(int(timeout * 1000)), "no event arrived"


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


NONBLOCKING = [fastlive.check_peek, fastlive.check_poll, fastlive.check_select,
               fastlive.check_tcp_info, fastlive.check_so_error]


@pytest.mark.parametrize("check", NONBLOCKING, ids=lambda f: f.__name__)
def test_healthy_peer_is_alive(conn, check):
    cli, _ = conn
    v = check(cli)
    assert v.status is Status.ALIVE and v.alive and not v.dead
    assert v.errno == 0
    assert v.tcp_state is fastlive.TcpState.ESTABLISHED


@pytest.mark.parametrize("check,method", [
    (fastlive.check_peek, Method.PEEK), (fastlive.check_poll, Method.POLL),
    (fastlive.check_select, Method.SELECT), (fastlive.check_tcp_info, Method.TCP_INFO)])
def test_fin_is_peer_closed(conn, check, method):
    cli, srv = conn
    srv.close()
    settle(cli)
    v = check(cli)
    assert v.status is Status.PEER_CLOSED and v.dead
    assert v.method is method
    assert v.tcp_state is fastlive.TcpState.CLOSE_WAIT


@pytest.mark.parametrize("check", [fastlive.check_peek, fastlive.check_poll,
                                   fastlive.check_select, fastlive.check_so_error])
def test_rst_is_reset(conn, check):
    cli, srv = conn
    reset(srv)
    settle(cli)
    v = check(cli)
    assert v.status is Status.RESET
    assert v.errno == 104  # ECONNRESET


def test_rst_error_is_reported_once(conn):
    """The kernel hands a socket error out once: after a check took it,
    the state is CLOSE and later checks say CLOSED (documented)."""
    cli, srv = conn
    reset(srv)
    settle(cli)
    assert fastlive.check_so_error(cli).status is Status.RESET
    again = fastlive.check_peek(cli)
    assert again.status is Status.CLOSED and again.dead
    assert fastlive.check_tcp_info(cli).status is Status.CLOSED


def test_close_with_unread_data_sends_rst(conn):
    cli, srv = conn
    cli.sendall(b"unread")
    time.sleep(0.05)
    srv.close()             # unread bytes in srv's queue: the kernel sends RST
    settle(cli)
    assert fastlive.check_peek(cli).status is Status.RESET


def test_send_after_fin_then_rst(conn):
    cli, srv = conn
    srv.close()
    settle(cli)
    first = fastlive.send(cli, b"x")       # queued locally: proves nothing
    assert first.sent == 1 and first.verdict.alive
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:     # the peer's kernel answers with RST
        r = fastlive.send(cli, b"x")
        if r.verdict.dead:
            break
        time.sleep(0.01)
    assert r.sent == 0
    assert r.verdict.status is Status.RESET and r.verdict.method is Method.SEND
    assert r.verdict.errno in (32, 104)   # EPIPE, ECONNRESET


def test_half_close_is_not_dead_for_the_writer(conn):
    cli, srv = conn
    srv.shutdown(socket.SHUT_WR)        # peer stops sending but keeps reading
    settle(cli)
    v = fastlive.check_poll(cli)
    assert v.status is Status.PEER_CLOSED
    assert v.flags & Flag.WRITE_OPEN
    for _ in range(3):
        r = fastlive.send(cli, b"still here")
        assert r.verdict.alive and r.sent == 10
    # the state (CLOSE_WAIT) says the peer's FIN came: every check says so,
    # and WRITE_OPEN that our direction still works
    v = fastlive.check_so_error(cli)
    assert v.status is Status.PEER_CLOSED and v.flags & Flag.WRITE_OPEN
    srv.settimeout(2)
    got = b""
    while len(got) < 30:
        got += srv.recv(100)
    assert got == b"still here" * 3


def test_send_never_raises_sigpipe(tmp_path):
    """With SIGPIPE at its default action, writing to a reset connection
    would kill the process; fastlive.send uses MSG_NOSIGNAL."""
    code = r"""
import signal, socket, struct, time, fastlive
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
lst = socket.create_server(("127.0.0.1", 0))
cli = socket.create_connection(lst.getsockname()); srv, _ = lst.accept()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)); srv.close()
time.sleep(0.1)
r = None
for _ in range(5):
    r = fastlive.send(cli, b"x")
print(r.verdict.status.name, r.verdict.errno)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "RESET"


def test_checks_never_consume_bytes(conn):
    cli, srv = conn
    payload = bytes(range(256)) * 8
    srv.sendall(payload)
    settle(cli)
    for _ in range(50):
        for check in NONBLOCKING:
            v = check(cli)
            assert v.alive
        assert fastlive.check_peek(cli).flags & Flag.DATA_PENDING
        assert fastlive.check_rcvtimeo(cli, timeout=0).alive
    cli.settimeout(2)
    got = b""
    while len(got) < len(payload):
        got += cli.recv(65536)
    assert got == payload


def test_fin_behind_data_seen_by_every_check(conn):
    """A FIN queued behind unread data: the peek sees bytes, the state
    (CLOSE_WAIT) sees the FIN; the one rule reports PEER_CLOSED with
    DATA_PENDING, and nothing is consumed."""
    cli, srv = conn
    srv.sendall(b"last words")
    srv.close()
    settle(cli)
    time.sleep(0.05)
    assert fastlive.check_poll(cli).status is Status.PEER_CLOSED
    peek = fastlive.check_peek(cli)
    assert peek.status is Status.PEER_CLOSED and peek.flags & Flag.DATA_PENDING
    assert cli.recv(100) == b"last words"
    assert fastlive.check_peek(cli).status is Status.PEER_CLOSED


@pytest.fixture
def nofile_above_1500():
    """A soft RLIMIT_NOFILE above 1500 (a stock shell gives 1024) while the
    test runs, raised up to the hard limit; skips when the hard limit is
    lower."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 1501
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"RLIMIT_NOFILE hard limit is {hard}: cannot open fd 1500")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_select_beyond_fd_setsize_falls_back_to_poll(conn, nofile_above_1500):
    cli, srv = conn
    high = os.dup2(cli.fileno(), 1500)
    try:
        assert high >= fastlive.FD_SETSIZE
        v = fastlive.check_select(high)
        assert v.alive and v.flags & Flag.SELECT_FALLBACK
        srv.close()
        v = fastlive.check_select(high, timeout=2)
        assert v.status is Status.PEER_CLOSED
        assert v.flags & Flag.SELECT_FALLBACK
    finally:
        os.close(high)
    assert not fastlive.check_select(cli).flags & Flag.SELECT_FALLBACK


def test_poll_and_select_wait_for_the_event(conn):
    cli, srv = conn
    t0 = time.monotonic()
    assert fastlive.check_poll(cli, timeout=0.2).alive
    assert fastlive.check_select(cli, timeout=0.2).alive
    assert time.monotonic() - t0 >= 0.35


# --- method 5: SO_RCVTIMEO ------------------------------------------------

def test_timeouts_roundtrip(conn):
    cli, _ = conn
    assert fastlive.get_timeouts(cli) == (0.0, 0.0)
    fastlive.set_timeouts(cli, recv=0.25, send=1.5)
    # the kernel keeps them in jiffies: 0.25 s may read back as 0.252 s
    assert fastlive.get_timeouts(cli) == pytest.approx((0.25, 1.5), abs=0.011)
    fastlive.set_timeouts(cli, send=0)
    assert fastlive.get_timeouts(cli) == pytest.approx((0.25, 0.0), abs=0.011)
    with pytest.raises(ValueError):
        fastlive.set_timeouts(cli, recv=-1)


def test_rcvtimeo_quiet_live_peer_looks_dead(conn):
    """The method's weakness, shown: nothing arrived, so TIMED_OUT, though
    the peer is alive and well."""
    cli, srv = conn
    fastlive.set_timeouts(cli, recv=0.2)
    t0 = time.monotonic()
    v = fastlive.check_rcvtimeo(cli)
    assert time.monotonic() - t0 >= 0.19
    assert v.status is Status.TIMED_OUT and v.errno == 11  # EAGAIN
    srv.sendall(b"hi")
    v = fastlive.check_rcvtimeo(cli)
    assert v.alive and v.flags & Flag.DATA_PENDING
    assert cli.recv(10) == b"hi"
    srv.close()
    assert fastlive.check_rcvtimeo(cli).status is Status.PEER_CLOSED


def test_rcvtimeo_without_timeout_is_refused(conn):
    cli, _ = conn
    v = fastlive.check_rcvtimeo(cli)
    assert v.status is Status.INVALID and v.errno == 22  # EINVAL, never blocks


def test_rcvtimeo_on_nonblocking_socket_still_waits(conn):
    cli, _ = conn
    cli.setblocking(False)
    t0 = time.monotonic()
    assert fastlive.check_rcvtimeo(cli, timeout=0.15).status is Status.TIMED_OUT
    assert time.monotonic() - t0 >= 0.14


def test_check_dispatch(conn):
    cli, _ = conn
    for m in (Method.PEEK, Method.POLL, Method.SELECT, Method.TCP_INFO, Method.SO_ERROR):
        assert fastlive.check(cli, m).method is m
    with pytest.raises(ValueError):
        fastlive.check(cli, Method.HEARTBEAT)


def test_verdict_str(conn):
    cli, srv = conn
    reset(srv)
    settle(cli)
    s = str(fastlive.check_peek(cli))
    assert "reset" in s and "ECONNRESET" in s
