"""Many sockets armed at once: detect_within / Monitor.add(within=) /
fastlive.aio spread the keepalive idle times over whole seconds (every one
within the bound), read back per socket, and say so when a burst is more
than the kernel's input backlog can carry.  The scale test (a burst of
idle loopback connections that gave false ETIMEDOUTs before the spread)
is marked slow."""
from __future__ import annotations

import asyncio
import collections
import errno
import math
import os
import select
import socket
import subprocess
import sys
import time
import warnings
from typing import Iterator, List, Tuple

import pytest
from hypothesis import given, strategies as st

import fastlive
from _scale import scaled
from fastlive import KeepaliveSettings, detection_time
from fastlive.keepalive import (SPREAD_BLOCK, KeepaliveBurstWarning, arming_stats, plan_next,
                                plan_within, spread_count)


def worst(s: KeepaliveSettings) -> float:
    return max(detection_time(s), detection_time(s, busy=True))


@given(st.floats(min_value=2, max_value=100000, allow_nan=False), st.integers(0, 10**6))
def test_every_slot_keeps_the_bound(seconds, slot):
    p = plan_within(seconds, slot)
    assert p.enabled and 1 <= p.idle <= 32767 and 1 <= p.interval and 1 <= p.count <= 127
    assert worst(p) <= seconds
    assert p.idle + p.interval * p.count <= int(min(seconds, 32767))
    assert p == plan_within(seconds, slot % spread_count(seconds))


@pytest.mark.parametrize("seconds", [2, 3, 4, 5, 6, 10, 12, 20, 30, 60, 600, 32767])
def test_slots_are_distinct_whole_seconds_of_idle(seconds):
    k = spread_count(seconds)
    plans = [plan_within(seconds, s) for s in range(k)]
    assert plans[0] == plan_within(seconds)               # slot 0 is the documented plan
    idles = [p.idle for p in plans]
    assert idles == list(range(idles[0], idles[0] - k, -1))    # one second apart, no repeats
    assert min(idles) >= max(1, math.ceil(idles[0] * fastlive.keepalive.SPREAD_FLOOR))
    assert all(p.user_timeout == plans[0].user_timeout for p in plans)
    if seconds >= 5:
        assert k >= 2


def test_slot_must_be_a_count():
    with pytest.raises(TypeError, match="slot"):
        plan_within(10, 1.5)                                # type: ignore[arg-type]
    with pytest.raises(ValueError, match="slot"):
        plan_within(10, -1)


@pytest.fixture
def pairs() -> Iterator[List[Tuple[socket.socket, socket.socket]]]:
    """4 x SPREAD_BLOCK + 8 loopback pairs (one window's worth of slots)."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1024)
    out = []
    try:
        for _ in range(4 * SPREAD_BLOCK + 8):
            c = socket.create_connection(lst.getsockname())
            a, _ = lst.accept()
            out.append((a, c))
        yield out
    finally:
        for a, c in out:
            a.close()
            c.close()
        lst.close()


def _spread_ok(socks: List[socket.socket], seconds: int) -> None:
    got = [fastlive.get_keepalive(s) for s in socks]       # TCP_KEEPIDLE etc. read back per socket
    idles = collections.Counter(g.idle for g in got)
    k = spread_count(seconds)
    # a block of SPREAD_BLOCK sockets per slot, wrapping around after k blocks
    assert len(idles) == min(k, math.ceil(len(socks) / SPREAD_BLOCK)), idles
    assert max(idles.values()) <= max(SPREAD_BLOCK, math.ceil(len(socks) / k) + SPREAD_BLOCK), idles
    assert all(g.enabled and worst(g) <= seconds for g in got)


def _new_window() -> None:
    time.sleep(1.05)      # a burst ends after a gap of max(1 s, idle / 8): start a fresh one


def test_detect_within_spreads_a_burst(pairs):
    _new_window()
    before = arming_stats().armed
    bounds = [fastlive.detect_within(a, 10) for a, _c in pairs]
    assert all(b.seconds == 10.0 for b in bounds)           # the promise is the same for all
    assert arming_stats().armed - before == len(pairs)
    _spread_ok([a for a, _c in pairs], 10)


def test_a_burst_armed_slowly_keeps_rotating(pairs):
    """The timers run from each connection's last received segment, not
    from the arming: a burst armed over more than the 1 s gap (a loaded or
    emulated CPU) must keep rotating its slots, not start over at slot 0."""
    _new_window()
    socks = [a for a, _c in pairs]
    pause = 1.6 / len(socks)                     # the whole burst takes ~1.6 s, each gap ~3 ms
    for a in socks:
        fastlive.detect_within(a, 10)
        time.sleep(pause)
    _spread_ok(socks, 10)


def test_a_few_sockets_get_the_documented_plan(pairs):
    _new_window()
    for a, _c in pairs[:SPREAD_BLOCK]:
        fastlive.detect_within(a, 10)
    assert {fastlive.get_keepalive(a).idle for a, _c in pairs[:SPREAD_BLOCK]} == {7}


def test_monitor_add_within_spreads_a_burst(pairs):
    _new_window()
    with fastlive.Monitor() as m:
        for a, _c in pairs:
            m.add(a, within=30)
        _spread_ok([a for a, _c in pairs], 30)


def test_aio_watch_within_and_socket_factory_spread_a_burst(pairs):
    from fastlive import aio

    async def main() -> None:
        futs = [aio.watch(a, within=20) for a, _c in pairs]
        _spread_ok([a for a, _c in pairs], 20)
        for f in futs:
            f.cancel()
        await asyncio.sleep(0)

    _new_window()
    asyncio.run(main())
    _new_window()
    make = aio.socket_factory(within=12)
    made = [make((socket.AF_INET, socket.SOCK_STREAM, 0, "", ("127.0.0.1", 0)))
            for _ in range(4 * SPREAD_BLOCK + 8)]
    try:
        _spread_ok(made, 12)
    finally:
        for s in made:
            s.close()


def _safe_load_at_5s() -> int:
    """How many sockets one window can arm at a 5 s bound before the
    warning (the spread's slots x the backlog share); skips when that needs
    more fds than a test here may hold."""
    backlog = arming_stats().backlog
    safe = spread_count(5) * int(backlog * fastlive.keepalive.BACKLOG_SHARE)
    if safe > 15000:
        pytest.skip(f"netdev_max_backlog {backlog}: the safe load ({safe}) needs too many fds here")
    return safe


@pytest.mark.timed("the load is counted per 1 s window: an emulated CPU takes longer than that "
                   "to arm a thousand sockets")
def test_an_oversized_burst_warns_and_counts_once_per_window():
    # unconnected TCP sockets take the options (no timer runs): only the planning is under test
    safe = _safe_load_at_5s()
    socks = [socket.socket() for _ in range(safe + 10)]
    try:
        _new_window()
        before = arming_stats().overloaded
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for s in socks:
                fastlive.detect_within(s, 5)
        burst = [w for w in caught if issubclass(w.category, KeepaliveBurstWarning)]
        assert len(burst) == 1, [str(w.message) for w in caught]
        assert "netdev_max_backlog" in str(burst[0].message)
        assert burst[0].filename == __file__                # points at the caller's line
        assert arming_stats().overloaded - before == 10
        _new_window()
        with warnings.catch_warnings():
            warnings.simplefilter("error")                  # a small burst is silent
            for s in socks[:SPREAD_BLOCK]:
                fastlive.detect_within(s, 5)
    finally:
        for s in socks:
            s.close()


def test_a_steady_trickle_past_the_safe_load_never_warns():
    """The load is counted per window: more sockets than the safe load,
    armed evenly over a little more than two windows, keep one burst (the
    slots rotate) but never warn."""
    safe = _safe_load_at_5s()
    socks = [socket.socket() for _ in range(safe + 100)]
    try:
        _new_window()
        before = arming_stats().overloaded
        pause = 2.2 / len(socks)
        with warnings.catch_warnings():
            warnings.simplefilter("error", KeepaliveBurstWarning)
            for s in socks:
                fastlive.detect_within(s, 5)
                time.sleep(pause)
        assert arming_stats().overloaded == before
    finally:
        for s in socks:
            s.close()


def test_plan_next_validates_like_plan_within():
    with pytest.raises(ValueError, match="seconds"):
        plan_next(1.5)
    with pytest.raises(TypeError, match="seconds"):
        plan_next("10")                                     # type: ignore[arg-type]


# --- scale: a burst that gave false deaths before the spread -----------------------

_HOLD = r"""
import socket, sys, time, os, ctypes, threading
ctypes.CDLL(None).prctl(1, 9, 0, 0, 0)                   # PR_SET_PDEATHSIG, SIGKILL
threading.Timer(120, os._exit, (2,)).start()
port, n = int(sys.argv[1]), int(sys.argv[2])
held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(n)]
print(len(held), flush=True)
sys.stdin.read()
"""


def _softnet_drops() -> int:
    with open("/proc/net/softnet_stat") as f:
        return sum(int(line.split()[1], 16) for line in f if line.strip())


@pytest.mark.slow
def test_burst_of_idle_connections_has_no_false_deaths():
    """N idle loopback connections whose peer (a helper process) stays
    alive, armed back to back with detect_within(s, BOUND): none may time
    out.  Before the spread (every socket the same plan) this size gave
    false ETIMEDOUTs here (bench/bench_keepalive_burst.py --plan old)."""
    n, bound = scaled(5000, 1200), 10     # 1,200 on an emulated CPU: still past the backlog
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(4096)
    lst.settimeout(30)
    helper = subprocess.Popen([sys.executable, "-c", _HOLD, str(lst.getsockname()[1]), str(n)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    socks: List[socket.socket] = []
    try:
        while len(socks) < n:
            socks.append(lst.accept()[0])
        assert helper.stdout is not None and int(helper.stdout.readline()) == n
        time.sleep(0.5)
        _new_window()
        d0 = _softnet_drops()
        t0 = time.monotonic()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", KeepaliveBurstWarning)   # past the conservative mark
            for s in socks:
                fastlive.detect_within(s, bound)
        po = select.poll()
        for s in socks:
            po.register(s.fileno(), 0)                     # POLLERR / POLLHUP only
        dead = set()
        while time.monotonic() < t0 + bound + 3:          # every plan has probed >= once by then
            for fd, _ev in po.poll(200):
                dead.add(fd)
                po.unregister(fd)
        assert helper.poll() is None                       # the peers were alive all along
        errs = collections.Counter(os.strerror(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
                                   for s in socks if s.fileno() in dead)
        assert not dead, (f"{len(dead)} false deaths {dict(errs)}, "
                          f"softnet drops {_softnet_drops() - d0}, ETIMEDOUT={errno.ETIMEDOUT}")
    finally:
        for s in socks:
            s.close()
        lst.close()
        helper.kill()
        helper.wait(30)


def test_every_slot_reports_the_same_whole_bound():
    # the bound reported is whole seconds for every slot (no float drift)
    for slot in range(spread_count(10)):
        assert math.isclose(worst(plan_within(10, slot)), 10.0)
