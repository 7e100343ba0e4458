"""The epoll Monitor on real loopback sockets."""
from __future__ import annotations

import asyncio
import json
import os
import selectors
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import time
from typing import Callable, Iterator, List, Tuple

import pytest

from fastlive import Death, Flag, Method, Monitor, Status, get_keepalive
from fastlive.testing import ManyPeers, close_all

Pair = Tuple[socket.socket, socket.socket]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def pairs(loopback_pairs: Callable[[int], List[Pair]]) -> Callable[[int], List[Pair]]:
    """make(n): n connected (local, peer) pairs in this process."""
    return loopback_pairs


@pytest.fixture
def mon() -> Iterator[Monitor]:
    m = Monitor()
    try:
        yield m
    finally:
        m.close()


def collect(m: Monitor, want: int, timeout: float = 5.0) -> List[Death]:
    """wait() until ``want`` deaths arrived or the time is up."""
    got: List[Death] = []
    deadline = time.monotonic() + timeout
    while len(got) < want:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        got += m.wait(left)
    return got


def rst(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_fin_rst_half_close_reported_once(pairs, mon):
    ps = pairs(4)
    for i, (c, _) in enumerate(ps):
        mon.add(c, key=f"conn{i}")
    assert len(mon) == 4 and mon.wait(0) == []
    ps[0][1].close()
    rst(ps[1][1])
    ps[2][1].shutdown(socket.SHUT_WR)
    got = {d.key: d for d in collect(mon, 3)}
    assert set(got) == {"conn0", "conn1", "conn2"}
    assert (got["conn0"].status, got["conn0"].errno) == (Status.PEER_CLOSED, 0)
    assert got["conn0"].flags & Flag.WRITE_OPEN
    assert (got["conn1"].status, got["conn1"].errno) == (Status.RESET, 104)
    assert got["conn2"].status is Status.PEER_CLOSED
    assert all(d.method is Method.EPOLL and not d.behind_back for d in got.values())
    assert got["conn0"].fd == ps[0][0].fileno()
    # each death once; the live one stays watched
    assert mon.wait(0.05) == [] and len(mon) == 1
    assert ps[3][0] in mon and ps[0][0] not in mon


def test_data_does_not_wake(pairs, mon):
    (c, p), = pairs(1)
    mon.add(c)
    p.send(b"payload")
    assert mon.wait(0.05) == []
    assert c.recv(10) == b"payload"


def test_already_dead_when_added(pairs, mon):
    (c, p), = pairs(1)
    p.close()
    time.sleep(0.01)
    mon.add(c)
    [d] = collect(mon, 1)
    assert d.key is c and d.status is Status.PEER_CLOSED


def test_remove(pairs, mon):
    ps = pairs(3)
    for c, _ in ps:
        mon.add(c)
    assert mon.remove(ps[0][0]) and mon.remove(ps[1][0].fileno())
    assert not mon.remove(ps[0][0])
    ps[2][0].close()                        # closed python socket: found by object
    assert mon.remove(ps[2][0])
    (c, p), = pairs(1)
    mon.add(c.fileno(), key="k")
    assert c in mon and mon.remove(c)       # added by fd, removed by socket
    mon.add(c, key="k2")
    assert mon.remove(key="k2")             # or by key, explicitly
    assert not mon.remove(key="k2")
    with pytest.raises(TypeError):
        mon.remove("k2")                    # a positional argument is a socket or fd
    with pytest.raises(TypeError):
        mon.remove()
    p.close()
    for _, p in ps:
        p.close()
    assert mon.wait(0.05) == [] and len(mon) == 0


def test_keys_and_fds_do_not_share_a_namespace(pairs, mon):
    """add(sock, key=5) then remove(5): 5 is an fd number, never the key;
    the socket that has fd 5 (if any) is the one removed."""
    (a, _ap), (b, _bp) = pairs(2)
    mon.add(a, key=b.fileno())              # a's key is b's fd number
    mon.add(b, key="b")
    assert mon.remove(b.fileno())           # removes b, the socket with that fd
    assert a in mon and b not in mon
    assert mon.remove(key=b.fileno())       # the key: removes a
    assert len(mon) == 0


def test_add_twice_and_bad_sockets(pairs, mon):
    (c, _), = pairs(1)
    mon.add(c, key="a")
    mon.add(c)                              # same socket: kept, key stays
    assert len(mon) == 1
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    lst = socket.create_server(("127.0.0.1", 0))
    r, w = os.pipe()
    try:
        for bad, err in ((udp, 95), (lst, 95), (r, 88), (-1, 9), (99999, 9)):
            with pytest.raises(OSError) as ei:
                mon.add(bad)
            assert ei.value.errno == err
    finally:
        udp.close()
        lst.close()
        os.close(r)
        os.close(w)
    assert len(mon) == 1


def test_sigkilled_peer_many_deaths_beyond_event_array(pairs):
    with ManyPeers() as ph, Monitor(max_events=8) as m:
        socks = ph.connect(50)
        try:
            for s in socks:
                m.add(s)
            ph.kill()
            got = collect(m, 50)
            assert sorted(d.fd for d in got) == sorted(s.fileno() for s in socks)
            assert all(d.status is Status.PEER_CLOSED for d in got)
            assert len(m) == 0
        finally:
            close_all(socks)


def test_closed_behind_its_back_found_by_verify(pairs, mon):
    ps = pairs(3)
    for c, _ in ps:
        mon.add(c)
    fd0 = ps[0][0].fileno()
    ps[0][0].close()                        # no remove(): epoll forgets it
    ps[0][1].close()
    assert mon.wait(0) == []                # no event: the kernel says nothing
    assert mon.verify() == 1
    [d] = mon.wait(0)
    assert (d.fd, d.status, d.errno, d.behind_back) == (fd0, Status.INVALID, 9, True)
    assert d.flags & Flag.BEHIND_BACK and d.verdict.status is Status.INVALID
    assert d.key is ps[0][0] and len(mon) == 2
    # closed, but the open file lives on in a dup: the event still comes,
    # and the monitor sees the number no longer names the socket
    keep = os.dup(ps[1][0].fileno())
    try:
        ps[1][0].close()
        ps[1][1].close()
        [d] = collect(mon, 1)
        assert d.behind_back and d.status is Status.INVALID and d.key is ps[1][0]
    finally:
        os.close(keep)
    assert mon.verify() == 0 and len(mon) == 1


def test_closed_behind_its_back_reported_by_wait_itself(pairs, mon):
    """No verify(): the audit wait() runs (a timerfd every 0.5 s) finds a
    socket closed without remove(), and one whose number was reused."""
    ps = pairs(4)
    for i, (c, _) in enumerate(ps):
        mon.add(c, key=i)
    fd0 = ps[0][0].fileno()
    ps[0][0].close()
    (x, _xp), = pairs(1)                    # may get fd0's number: not registered
    t = time.monotonic()
    got = collect(mon, 1, timeout=3)
    assert time.monotonic() - t < 1.5
    assert [(d.key, d.fd, d.status, d.errno, d.behind_back) for d in got] == \
        [(0, fd0, Status.INVALID, 9, True)]
    assert len(mon) == 3 and x not in mon


def test_fd_number_reused(pairs, mon):
    (a, ap), (b, bp) = pairs(2)
    mon.add(a, key="A")
    num = a.fileno()
    os.dup2(b.fileno(), num)                # number now names B's socket
    b.close()
    b2 = socket.socket(fileno=num)
    a.detach()
    try:
        mon.add(b2, key="B")                # same number, another socket
        [d] = mon.wait(0)
        assert (d.key, d.behind_back, d.status) == ("A", True, Status.INVALID)
        ap.close()                          # A's peer: nobody listens now
        assert mon.wait(0.05) == []
        bp.close()
        [d] = collect(mon, 1)
        assert (d.key, d.status, d.behind_back) == ("B", Status.PEER_CLOSED, False)
    finally:
        b2.close()


def test_fd_reused_without_add_found_by_verify(pairs, mon):
    (a, _), (b, _) = pairs(2)
    mon.add(a, key="A")
    num = a.fileno()
    os.dup2(b.fileno(), num)
    a.detach()
    try:
        assert mon.verify() == 1
        [d] = mon.wait(0)
        assert d.key == "A" and d.behind_back
    finally:
        os.close(num)


def test_within_arms_timers(pairs, mon):
    (c, _), = pairs(1)
    bound = mon.add(c, within=10)
    assert bound is not None and bound.seconds <= 10
    ka = get_keepalive(c)
    assert ka.enabled and ka.user_timeout > 0 and ka.idle + ka.interval * ka.count <= 10


def test_asyncio_add_reader(pairs, mon):
    ps = pairs(3)
    for c, _ in ps:
        mon.add(c)

    async def main() -> List[Death]:
        loop = asyncio.get_running_loop()
        got: List[Death] = []
        done = asyncio.Event()

        def on_ready() -> None:
            got.extend(mon.wait(0))
            if len(got) >= 2:
                done.set()

        loop.add_reader(mon.fileno(), on_ready)
        try:
            loop.call_later(0.02, ps[0][1].close)
            loop.call_later(0.04, rst, ps[2][1])
            await asyncio.wait_for(done.wait(), 5)
        finally:
            loop.remove_reader(mon.fileno())
        return got

    got = asyncio.run(main())
    assert {d.key for d in got} == {ps[0][0], ps[2][0]}
    assert len(mon) == 1


def test_asyncio_wakes_for_verify_deaths(pairs, mon):
    """Deaths queued by verify() make the epoll fd readable too."""
    (c, _), = pairs(1)
    mon.add(c)
    c.close()

    async def main() -> List[Death]:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        loop.add_reader(mon.fileno(),
                        lambda: fut.done() or fut.set_result(mon.wait(0)))
        try:
            assert mon.verify() == 1
            return await asyncio.wait_for(fut, 5)
        finally:
            loop.remove_reader(mon.fileno())

    [d] = asyncio.run(main())
    assert d.behind_back


def test_selectors_nesting(pairs, mon):
    (c, p), = pairs(1)
    mon.add(c)
    with selectors.DefaultSelector() as sel:
        sel.register(mon, selectors.EVENT_READ)
        assert sel.select(0.02) == []
        p.close()
        ready = sel.select(5)
        assert ready and ready[0][0].fileobj is mon
        [d] = mon.wait(0)
        assert d.key is c


def test_close_and_context(pairs):
    (c, _), = pairs(1)
    with Monitor() as m:
        assert m.fileno() >= 0
        m.add(c, key="c")
        assert "watching=1" in repr(m)
    assert m.closed and len(m) == 0 and repr(m) == "<Monitor closed>"
    for call in (m.fileno, lambda: m.wait(0), lambda: m.wait(1), lambda: m.add(c),
                 lambda: m.remove(c), m.verify):
        with pytest.raises(ValueError, match="the monitor is closed"):
            call()
    m.close()                               # twice is fine


@pytest.mark.parametrize("bad,exc", [
    (float("inf"), ValueError), (1e300, ValueError), (-1, ValueError), (float("nan"), ValueError),
    (True, TypeError), ("1", TypeError), (None, ValueError)])
def test_wait_timeout_validation(mon, bad, exc):
    with pytest.raises(exc, match="timeout"):
        mon.wait(bad)


@pytest.mark.parametrize("bad,exc", [(2**63, ValueError), (0, ValueError), (True, TypeError),
                                     (1.5, TypeError)])
def test_max_events_validation(bad, exc):
    with pytest.raises(exc, match="max_events"):
        Monitor(max_events=bad)


def test_add_bad_fd_numbers(mon):
    for fd in (-2**31 - 1, -2**63, 2**40):
        with pytest.raises(OSError) as ei:
            mon.add(fd)
        assert ei.value.errno == 9


def test_registry_counts_deaths(pairs):
    from fastlive import _registry
    ps = pairs(2)
    with Monitor() as m:
        assert m in _registry.engines()
        for c, _ in ps:
            m.add(c)
        ps[0][1].close()
        rst(ps[1][1])
        assert len(collect(m, 2)) == 2
        # counted once the caller has them: at the next wait() (or close())
        assert m.wait(0) == []
        deaths, _b, _s, timed = m.counters.snapshot()
        assert deaths == {(int(Status.PEER_CLOSED), int(Method.EPOLL)): 1,
                          (int(Status.RESET), int(Method.EPOLL)): 1}
        assert timed == 0
    assert m not in _registry.engines()


SILENT = textwrap.dedent("""
    import json, socket, subprocess, sys, time
    sys.path.insert(0, sys.argv[1])
    from fastlive import Monitor
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    lst = socket.create_server(("127.0.0.1", 0))
    idle = socket.create_connection(lst.getsockname()); p1, _ = lst.accept()
    busy = socket.create_connection(lst.getsockname()); p2, _ = lst.accept()
    m = Monitor()
    m.add(idle, within=2, key="idle")
    m.add(busy, within=2, key="busy")
    t = time.monotonic()
    # the peers vanish without a word: loopback stops carrying packets
    subprocess.run(["ip", "link", "set", "lo", "down"], check=True)
    busy.send(b"x" * 1000)
    got = []
    while len(got) < 2 and time.monotonic() - t < 10:
        got += [dict(key=d.key, status=d.status.name, errno=d.errno,
                     method=d.method.name, t=time.monotonic() - t)
                for d in m.wait(1)]
    print(json.dumps(got))
""")


@pytest.mark.slow
@pytest.mark.no_qemu("network namespaces")
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"),
                    reason="silent death needs root and iproute2 (a netns of its own)")
def test_silent_death_reported_within_bound():
    ns = f"fl-mon-{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", ns], capture_output=True).returncode:
        pytest.skip("cannot create a network namespace here")
    try:
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", SILENT, ROOT],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        got = {d["key"]: d for d in json.loads(out.stdout)}
        assert set(got) == {"idle", "busy"}
        for d in got.values():
            assert d["status"] in ("TIMED_OUT", "UNREACHABLE"), d
            assert d["t"] < 2 + 1.5, d      # the bound, plus timer slack
        assert got["idle"]["method"] == "KEEPALIVE"
        assert got["busy"]["method"] == "USER_TIMEOUT"
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_add_while_another_thread_waits(pairs):
    """epoll lets one thread sleep in wait() while another adds; the death
    of a socket added meanwhile reaches the waiter with its key."""
    import threading
    (c, p), = pairs(1)
    got: List[Death] = []
    with Monitor() as m:
        t = threading.Thread(target=lambda: got.extend(collect(m, 1, 5)))
        t.start()
        try:
            time.sleep(0.05)
            with pytest.raises(RuntimeError):
                m.wait(0)                   # one waiter at a time
            m.add(c, key="late")
            p.close()
        finally:
            t.join(10)
    assert not t.is_alive()
    assert [(d.key, d.status) for d in got] == [("late", Status.PEER_CLOSED)]


def test_inode_identity_fallback(pairs):
    """The identity used where the kernel lacks SO_COOKIE."""
    import errno as _errno
    import os

    from fastlive._lib import ffi, lib
    (c, _p), = pairs(1)
    ino = ffi.new("uint64_t *")
    assert lib.fl_socket_inode(c.fileno(), ino) == 0
    assert ino[0] == os.fstat(c.fileno()).st_ino
    r, w = os.pipe()
    try:
        assert lib.fl_socket_inode(r, ino) == -_errno.ENOTSOCK
    finally:
        os.close(r)
        os.close(w)
    assert lib.fl_socket_inode(-1, ino) == -_errno.EBADF


def test_readd_after_death_reports_again(pairs, mon):
    """The kernel keeps a reported (disarmed) registration until the socket
    closes; adding the same socket again re-arms it."""
    (c, p), = pairs(1)
    mon.add(c, key=1)
    p.shutdown(socket.SHUT_WR)
    [d] = collect(mon, 1)
    assert (d.key, d.status) == (1, Status.PEER_CLOSED)
    mon.add(c, key=2)
    [d] = collect(mon, 1)
    assert (d.key, d.status) == (2, Status.PEER_CLOSED)
    assert mon.wait(0.05) == [] and len(mon) == 0
