"""fastlive.testing itself: each fault leaves the kernel state it claims, and
every helper process and namespace is really gone afterwards."""
import contextlib
import errno
import os
import re
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import fastlive
from fastlive import TcpState, tcp_info
from fastlive.testing import (NetnsPair, PeerError, PeerProcess, in_netns, list_netns,
                             loopback_peer, netns_unavailable, sweep_stale_netns)

NETNS = netns_unavailable()
needs_netns = pytest.mark.skipif(NETNS is not None, reason=f"netns: {NETNS}")


def wait_state(sock, states, timeout=5.0):
    """Poll the local TCP state until it is one of ``states`` (bounded)."""
    end = time.monotonic() + timeout
    while True:
        st = tcp_info(sock).state
        if st in states or time.monotonic() >= end:
            return st
        time.sleep(0.005)


def wait_gone(pid, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # a zombie of ours counts as gone for the kernel's sockets
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.01)
    return False


def so_error(sock):
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


# -- loopback helper ---------------------------------------------------------

def test_loopback_peer_ipv6():
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback")
    local, peer = loopback_peer("::1")
    with local, peer:
        assert local.getpeername()[0] == "::1"
        peer.reset()
        assert wait_state(local, {TcpState.CLOSE}) == TcpState.CLOSE
    with pytest.raises(ValueError, match="loopback"):
        loopback_peer("10.77.0.1")


def test_loopback_peer_talks(loopback_peer):
    local, peer = loopback_peer
    assert local.getpeername()[0] == "127.0.0.1"
    assert peer.send(b"hello") == 5
    local.settimeout(5)
    assert local.recv(5) == b"hello"
    peer.echo()
    local.sendall(b"ping")
    assert local.recv(4) == b"ping"
    st = peer.stats()
    assert st["received"] == 4 and st["sent"] == 9 and st["open"]


def test_close_socket_sends_fin(loopback_peer):
    local, peer = loopback_peer
    peer.close_socket()
    assert wait_state(local, {TcpState.CLOSE_WAIT}) == TcpState.CLOSE_WAIT
    assert local.recv(1, socket.MSG_DONTWAIT) == b""
    assert peer.running     # the process lives on; only its socket closed


def test_reset_sends_rst(loopback_peer):
    local, peer = loopback_peer
    peer.reset()
    assert wait_state(local, {TcpState.CLOSE}) == TcpState.CLOSE
    assert so_error(local) == errno.ECONNRESET


def test_close_with_unread_data_sends_rst(loopback_peer):
    local, peer = loopback_peer
    local.sendall(b"never read")
    assert peer.close_unread(10) == 10
    assert wait_state(local, {TcpState.CLOSE}) == TcpState.CLOSE
    assert so_error(local) == errno.ECONNRESET


def test_shutdown_write_is_a_half_close(loopback_peer):
    local, peer = loopback_peer
    peer.shutdown_write()
    assert wait_state(local, {TcpState.CLOSE_WAIT}) == TcpState.CLOSE_WAIT
    local.sendall(b"still reading?")
    end = time.monotonic() + 5
    while peer.stats()["received"] < 14 and time.monotonic() < end:
        time.sleep(0.01)
    st = peer.stats()
    assert st["received"] == 14 and st["open"] and not st["eof"]
    assert tcp_info(local).state == TcpState.CLOSE_WAIT


def test_sigkill_sends_fin(loopback_peer):
    local, peer = loopback_peer
    assert peer.kill() == -signal.SIGKILL
    assert not peer.running
    assert wait_state(local, {TcpState.CLOSE_WAIT}) == TcpState.CLOSE_WAIT
    assert so_error(local) == 0


def test_sigkill_with_unread_data_sends_rst(loopback_peer):
    local, peer = loopback_peer
    local.sendall(b"unread")
    end = time.monotonic() + 5
    while peer.stats()["inq"] < 6 and time.monotonic() < end:
        time.sleep(0.005)
    peer.kill()
    assert wait_state(local, {TcpState.CLOSE}) == TcpState.CLOSE
    assert so_error(local) == errno.ECONNRESET


@pytest.mark.tcp_info_fields("unacked")
def test_freeze_stops_the_process_not_its_kernel(frozen_peer):
    local, peer = frozen_peer
    with open(f"/proc/{peer.pid}/stat") as f:
        assert f.read().rsplit(")", 1)[1].split()[0] == "T"
    t = time.monotonic()
    with pytest.raises(PeerError, match="frozen"):
        peer.ping()
    assert time.monotonic() - t < 1
    local.sendall(b"x" * 1000)
    # The frozen process's kernel ACKs the bytes into its receive buffer.
    end = time.monotonic() + 5
    while tcp_info(local).unacked and time.monotonic() < end:
        time.sleep(0.005)
    assert tcp_info(local).unacked == 0
    assert fastlive.check_poll(local).alive
    peer.thaw()
    peer.ping()
    assert peer.stats()["inq"] == 1000


def test_frozen_helper_is_killed_by_close():
    local, peer = loopback_peer()
    with local:
        peer.freeze()
        peer.close()
        assert wait_gone(peer.pid)
        assert wait_state(local, {TcpState.CLOSE_WAIT}) == TcpState.CLOSE_WAIT


def test_commands_are_bounded():
    local, peer = loopback_peer()
    with local, peer:
        os.kill(peer.pid, signal.SIGSTOP)      # behind the helper object's back
        t = time.monotonic()
        with pytest.raises(PeerError, match="did not answer"):
            peer.ping(timeout=0.3)
        assert time.monotonic() - t < 2
        os.kill(peer.pid, signal.SIGCONT)


def test_helper_lifetime_is_bounded():
    peer = PeerProcess(listen=("127.0.0.1", 0), lifetime=0.3)
    with peer:
        assert peer._proc.wait(5) == 0


def test_helper_connects_to_a_server(make_peer):
    with socket.create_server(("127.0.0.1", 0)) as srv:
        srv.settimeout(5)
        peer = make_peer(connect=srv.getsockname())
        conn, _ = srv.accept()
        with conn:
            assert peer.connect(srv.getsockname()) == 1
            conn2, _ = srv.accept()
            conn2.close()
            peer.kill()
            conn.settimeout(5)
            assert conn.recv(1) == b""


@pytest.mark.parametrize("freeze,thread", [(False, False), (True, False), (True, True)],
                         ids=["running", "frozen", "frozen-from-thread"])
def test_helper_dies_with_its_owner(freeze, thread):
    """PR_SET_PDEATHSIG: the helper goes when its owner is SIGKILLed, even
    when it is stopped (no cleanup code of the owner runs), and also when
    it was asked for from a worker thread that has ended since."""
    owner = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import threading, time
        from fastlive.testing import loopback_peer
        got = []
        def start():
            got.append(loopback_peer())
        if {thread}:
            t = threading.Thread(target=start)
            t.start()
            t.join()
        else:
            start()
        local, peer = got[0]
        if {freeze}:
            peer.freeze()
        time.sleep(0.2)          # the worker thread is gone; the helper is not
        assert peer.running
        print(peer.pid, flush=True)
        time.sleep(30)
        """)], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(fastlive.__file__))})
    try:
        # two Python starts: seconds on an emulated CPU, so a generous deadline
        r, _, _ = select.select([owner.stdout], [], [], 60)
        assert r, "owner did not start its helper within 60 s"
        pid = int(owner.stdout.readline())
        assert os.path.exists(f"/proc/{pid}")
        owner.kill()
        owner.wait(5)
        assert wait_gone(pid), f"helper {pid} outlived its owner"
    finally:
        owner.kill()
        owner.wait(5)
        owner.stdout.close()


# -- network namespaces ------------------------------------------------------

def netns_inode():
    return os.stat("/proc/thread-self/ns/net").st_ino


@needs_netns
def test_netns_pair_layout(netns_pair):
    p = netns_pair
    assert {p.ns_a, p.ns_b} <= set(list_netns())
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                            timeout=10, check=True).stdout
    assert set(list_netns()) == {line.split()[0] for line in listed.splitlines() if line.strip()}
    # each end: its address, up, and the MAC the pair recorded
    for side, mac in (("a", p.mac_a), ("b", p.mac_b)):
        assert p.link_state(side) in ("UP", "UNKNOWN")
        assert re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", mac) and mac != "00:00:00:00:00:00"
    assert p.mac_a != p.mac_b
    assert p.local.getsockname()[0] == p.addr_a
    assert p.local.getpeername() == (p.addr_b, p.peer.port)
    assert p.addresses("a") == [p.addr_a] and p.addresses("b") == [p.addr_b]
    assert p.addr_a.startswith("10.77.") and p.addr_b.startswith("10.77.")
    # The local socket lives in A, not in this process's namespace.
    out = subprocess.run(["ss", "-N", p.ns_a, "-Htn", "state", "established"],
                         capture_output=True, text=True, timeout=10).stdout
    assert f"{p.addr_a}:{p.local.getsockname()[1]}" in out
    out = subprocess.run(["ss", "-Htn", "state", "established"],
                         capture_output=True, text=True, timeout=10).stdout
    assert p.addr_a not in out
    p.local.sendall(b"abc")
    p.peer.echo()
    p.local.settimeout(5)
    assert p.local.recv(3) == b"abc"
    # an outgoing connection of the helper takes a number too
    with p.inside_a(), socket.create_server((p.addr_a, 0)) as srv:
        srv.settimeout(5)
        assert p.peer.connect(srv.getsockname()) == 1
        srv.accept()[0].close()
    s2 = p.connect()
    assert p.peer.count() == 3 and p.number(s2) == 2
    p.peer.send(b"two", conn=p.number(s2))
    s2.settimeout(5)
    assert s2.recv(3) == b"two"


@needs_netns
def test_in_netns_switches_back():
    before = netns_inode()
    with NetnsPair() as p:
        with in_netns(p.ns_a):
            inside = netns_inode()
            s = socket.socket()
        assert netns_inode() == before != inside
        with pytest.raises(ZeroDivisionError):
            with in_netns(p.ns_b):
                raise ZeroDivisionError
        assert netns_inode() == before
        with s:
            s.settimeout(5)
            s.connect((p.addr_b, p.peer.port))   # a socket of A, from here
            assert s.getsockname()[0] == p.addr_a


@needs_netns
@pytest.mark.tcp_info_fields("unacked")
def test_link_down_state(netns_pair):
    p = netns_pair
    p.link_down()
    assert p.link_state("b") == "DOWN"
    assert p.link_state("a") in ("LOWERLAYERDOWN", "DOWN")
    assert "PERMANENT" in p.neighbour() and p.mac_b in p.neighbour()
    p.local.sendall(b"lost")
    assert tcp_info(p.local).state == TcpState.ESTABLISHED
    assert tcp_info(p.local).unacked >= 1
    p.link_up()         # link_down/link_up return once the kernel shows the state
    assert p.link_state("b") in ("UP", "UNKNOWN")
    assert p.wait_link_state("a", "UP", "UNKNOWN", timeout=0) == p.link_state("a")
    with pytest.raises(TimeoutError, match="not DOWN"):
        p.wait_link_state("b", "DOWN", timeout=0.1)
    with pytest.raises(ValueError, match="states"):
        p.wait_link_state("b")


@needs_netns
@pytest.mark.tcp_info_fields("unacked")
def test_blackhole_state(netns_pair):
    p = netns_pair
    p.blackhole()
    assert p.addresses("b") == []
    assert "PERMANENT" in p.neighbour() and p.mac_b in p.neighbour()
    assert p.link_state("b") == "UP"
    p.local.sendall(b"lost")
    time.sleep(0.5)         # a few retransmissions: nothing comes back
    ti = tcp_info(p.local)
    assert ti.state == TcpState.ESTABLISHED and ti.unacked >= 1 and ti.retransmits >= 1
    assert so_error(p.local) == 0          # no ICMP, no soft error


@needs_netns
@pytest.mark.tcp_info_fields("unacked")
def test_drop_rule_or_clear_error(netns_pair):
    from fastlive.testing import firewall_tool
    if firewall_tool() is None:
        with pytest.raises(OSError, match="nft nor iptables"):
            netns_pair.drop()
        pytest.skip("neither nft nor iptables is installed")
    netns_pair.drop()
    netns_pair.local.sendall(b"lost")
    time.sleep(0.5)
    assert tcp_info(netns_pair.local).unacked >= 1


@needs_netns
@pytest.mark.tcp_info_fields("unacked")
def test_netns_frozen_peer(netns_pair):
    p = netns_pair
    p.peer.freeze()
    p.local.sendall(b"y" * 100)
    end = time.monotonic() + 5
    while tcp_info(p.local).unacked and time.monotonic() < end:
        time.sleep(0.005)
    assert tcp_info(p.local).unacked == 0
    p.peer.thaw()
    assert p.peer.stats()["inq"] == 100


@needs_netns
def test_netns_cleanup_even_on_error():
    with pytest.raises(RuntimeError, match="boom"):
        with NetnsPair() as p:
            pid, names, local = p.peer.pid, (p.ns_a, p.ns_b), p.local
            p.peer.freeze()
            raise RuntimeError("boom")
    assert not set(names) & set(list_netns())
    assert wait_gone(pid)
    assert local.fileno() == -1


@needs_netns
def test_setup_failure_cleans_up(monkeypatch):
    seen = {}
    import fastlive.testing.netns as fl

    def broken(self):
        seen["names"] = (self.ns_a, self.ns_b)
        raise OSError("no peer today")
    real = fl.NetnsPair.connect
    monkeypatch.setattr(fl.NetnsPair, "connect", broken)
    p = NetnsPair()
    with pytest.raises(OSError, match="no peer today"):
        with p:
            pass
    monkeypatch.setattr(fl.NetnsPair, "connect", real)
    assert not set(seen["names"]) & set(list_netns())
    assert p.peer is not None and wait_gone(p.peer.pid)


@needs_netns
def test_sweeper_removes_stale_namespaces(capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(10)
    name = f"fl-{dead.pid}-1-a"
    live = f"fl-{os.getpid()}-999999-a"
    for n in (name, live):
        subprocess.run(["ip", "netns", "add", n], check=True, timeout=10)
    try:
        from fastlive.tools.cli import main
        assert main(["netns-sweep", "--list"]) == 0
        listed = capsys.readouterr().out
        assert f"{name}  owner {dead.pid} stale" in listed
        assert f"{live}  owner {os.getpid()} alive" in listed
        gone = sweep_stale_netns()
        assert name in gone and live not in gone
        assert name not in list_netns() and live in list_netns()
    finally:
        for n in (name, live):
            subprocess.run(["ip", "netns", "del", n], capture_output=True, timeout=10)


def test_unavailable_reason_when_not_root(monkeypatch):
    import fastlive.testing._spawn as spawn
    import fastlive.testing.netns as fl
    monkeypatch.setattr(fl.os, "geteuid", lambda: 1000)
    assert "root" in fl._probe()
    monkeypatch.setattr(spawn.shutil, "which", lambda *a, **k: None)
    monkeypatch.setattr(fl.os, "geteuid", lambda: 0)
    assert "'ip' command" in fl._probe()


def test_no_helpers_left_behind():
    """Every helper this session started was reaped (a last-line check for
    the tests above: no child of ours is still a fault helper)."""
    me = os.getpid()
    left = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == me and b"fastlive.testing._child" in cmd:
            left.append(pid)
    assert not left
    assert not [n for n in list_netns() if n.startswith(f"fl-{me}-")]


def test_docs_example_runs(tmp_path):
    """docs/testing.md's example is a real test file: run it as a user would."""
    doc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "docs", "testing.md")
    if not os.path.exists(doc):
        pytest.skip("docs/testing.md is not shipped with this copy")
    with open(doc) as f:
        blocks = f.read().split("```python\n")[1:]
    code = next(b.split("```")[0] for b in blocks if "def test_" in b)
    (tmp_path / "test_example.py").write_text(code)
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
           "PYTHONPATH": os.path.dirname(os.path.dirname(fastlive.__file__))}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "fastlive.testing.plugin",
                          "-p", "no:cacheprovider", "-rs", "test_example.py"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    expect = "2 passed" if NETNS is None else "1 passed, 1 skipped"
    assert expect in out.stdout, out.stdout


def test_netns_fixture_skips_with_the_reason(tmp_path):
    (tmp_path / "test_skip.py").write_text(textwrap.dedent("""
        import fastlive.testing.netns
        fastlive.testing.netns._probe_result = "pretend: no namespaces here"

        def test_needs_namespaces(netns_pair):
            raise AssertionError("must not run")
        """))
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
           "PYTHONPATH": os.path.dirname(os.path.dirname(fastlive.__file__))}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "fastlive.testing.plugin",
                          "-p", "no:cacheprovider", "test_skip.py"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 skipped" in out.stdout
    assert "netns_pair: pretend: no namespaces here" in out.stdout


@needs_netns
def test_helpers_from_threads_start_in_their_callers_namespace():
    """setns(2) is per thread and a thread inherits its creator's namespace:
    the kit's spawner thread, first used from a thread inside a namespace,
    must not start later helpers there.  Each helper starts where the
    thread that asked for it is."""
    from fastlive.testing._spawn import spawn

    def helper_ns(inside: str = "") -> int:
        out: list = []

        def body() -> None:
            with contextlib.ExitStack() as stack:
                if inside:
                    stack.enter_context(in_netns(inside))
                proc = spawn("hold", stdin=subprocess.PIPE)
                try:
                    out.append(os.stat(f"/proc/{proc.pid}/ns/net").st_ino)
                finally:
                    proc.kill()
                    proc.wait(10)
        t = threading.Thread(target=body)
        t.start()
        t.join(60)
        assert out, "the helper did not start"
        return out[0]

    home = netns_inode()
    with NetnsPair() as p:
        with in_netns(p.ns_a):
            a = netns_inode()
        assert helper_ns(p.ns_a) == a          # first use: the spawner thread is created here
        assert helper_ns() == home             # a thread outside: outside
        assert helper_ns(p.ns_a) == a
