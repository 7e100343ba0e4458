"""The Monitor under threads: close() wakes every waiter at once, add()
never waits behind a waiter, and the bookkeeping stays consistent when
add/remove/wait race under a tiny switch interval."""
from __future__ import annotations

import random
import socket
import sys
import threading
import time
from typing import Callable, Dict, List, Tuple

import pytest

from fastlive import Death, Monitor, Status

Pair = Tuple[socket.socket, socket.socket]


@pytest.mark.parametrize("trial", range(10))
def test_close_wakes_a_looping_waiter(trial):
    """A thread looping ``while True: mon.wait(3)`` must not re-enter and
    block close(): close returns at once, the loop ends with ValueError."""
    m = Monitor()
    errors: List[BaseException] = []
    entered = threading.Event()

    def loop() -> None:
        try:
            while True:
                entered.set()
                m.wait(3)
        except ValueError as e:
            errors.append(e)

    t = threading.Thread(target=loop)
    t.start()
    assert entered.wait(5)
    time.sleep(0.02 * (trial % 3))
    start = time.monotonic()
    m.close()
    took = time.monotonic() - start
    t.join(5)
    assert not t.is_alive()
    assert took < 0.5, took
    assert len(errors) == 1 and "the monitor is closed" in str(errors[0])


def test_add_never_waits_behind_a_waiter(loopback_pairs):
    ps: List[Pair] = loopback_pairs(60)
    m = Monitor()
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            m.wait(0.2)

    t = threading.Thread(target=loop)
    t.start()
    try:
        time.sleep(0.05)
        worst = 0.0
        for c, _ in ps:
            s = time.monotonic()
            m.add(c)
            worst = max(worst, time.monotonic() - s)
        assert len(m) == 60
        assert worst < 0.05, worst
    finally:
        stop.set()
        t.join(5)
        m.close()


def test_second_waiter_is_refused(loopback_pair):
    cli, _ = loopback_pair
    with Monitor() as m:
        m.add(cli)
        t = threading.Thread(target=m.wait, args=(0.5,))
        t.start()
        time.sleep(0.1)
        with pytest.raises(RuntimeError, match="another thread"):
            m.wait(0)
        t.join(5)
        assert m.wait(0) == []          # its turn ended with its call


def test_racing_add_remove_wait_stay_consistent(loopback_pairs):
    """Threads add, remove and wait while peers close, under
    sys.setswitchinterval(1e-6).  No exception anywhere; every death names
    a registered socket; each registration ends once (removed or
    reported); the tables agree at the end."""
    ps: List[Pair] = loopback_pairs(60)
    socks = [c for c, _ in ps]
    peers = {c: p for c, p in ps}
    m = Monitor(max_events=4)
    errors: List[BaseException] = []
    deaths: List[Death] = []
    stop = threading.Event()
    ended: Dict[socket.socket, int] = {}
    lock = threading.Lock()

    def guard(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as e:      # noqa: BLE001 - reported below
                errors.append(e)
        return run

    def adder() -> None:
        rnd = random.Random(1)
        while not stop.is_set():
            s = rnd.choice(socks[:40])
            m.add(s, key=s)

    def remover() -> None:
        rnd = random.Random(2)
        while not stop.is_set():
            s = rnd.choice(socks[:40])
            if m.remove(s) if rnd.random() < 0.5 else m.remove(key=s):
                with lock:
                    ended[s] = ended.get(s, 0) + 1

    def waiter() -> None:
        while not stop.is_set():
            got = m.wait(0.005)
            deaths.extend(got)

    for s in socks[40:]:
        m.add(s, key=s)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    threads = [threading.Thread(target=guard(f)) for f in (adder, remover, waiter)]
    try:
        for t in threads:
            t.start()
        for s in socks[40:50]:              # deaths while the others race
            peers[s].close()
            time.sleep(0.02)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        sys.setswitchinterval(old)
    assert not errors, errors
    deaths += m.wait(0.2)
    m.wait(0)
    assert all(d.key is d.sock and d.sock in socks for d in deaths)
    dead = {d.key for d in deaths}
    assert set(socks[40:50]) <= dead
    assert all(d.status is Status.PEER_CLOSED for d in deaths if d.key in socks[40:50])
    # each of the 40 racing sockets is watched now or not, consistently
    watched = [s for s in socks if s in m]
    assert len(m) == len(watched) == len(m._reg)
    assert {e[2] for e in m._reg.values()} == set(watched)
    m.close()
