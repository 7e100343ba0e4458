"""fork(): a Monitor or Batch made in the parent refuses to work in the
child (clear RuntimeError), never hangs there (even when a parent thread was
inside wait() at fork time), and leaves the parent's state untouched."""
from __future__ import annotations

import os
import socket
import threading
import time
import warnings
from typing import Callable, List, Tuple

import pytest

from fastlive import Batch, Monitor, Status

Pair = Tuple[socket.socket, socket.socket]


def in_child(body: Callable[[], int], timeout: float = 10.0) -> int:
    """Run body() in a forked child; its return value is the exit status
    (0 = all checks passed).  The child never returns into pytest."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # fork with threads
        pid = os.fork()
    if pid == 0:
        code = 99
        try:
            code = body()
        except BaseException:               # noqa: BLE001 - the exit code says it
            code = 98
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return -1                               # hung


def refuses(call: Callable[[], object], word: str = "forked child") -> bool:
    try:
        call()
    except RuntimeError as e:
        return word in str(e) and str(os.getppid()) in str(e)
    return False


def test_monitor_in_child_refuses_and_parent_keeps_its_deaths(loopback_pairs):
    ps: List[Pair] = loopback_pairs(3)
    m = Monitor()
    for i, (c, _) in enumerate(ps):
        m.add(c, key=i)
    ps[0][1].close()                        # a death waiting in the shared set
    time.sleep(0.05)

    def child() -> int:
        ok = [refuses(lambda: m.wait(0)), refuses(lambda: m.wait(0.5)),
              refuses(lambda: m.add(ps[1][0])), refuses(lambda: m.remove(ps[1][0])),
              refuses(m.verify), refuses(m.fileno), refuses(lambda: len(m)),
              m.closed, "forked" in repr(m)]
        m.close()                           # closes the child's fd copies only
        return 0 if all(ok) else 1 + ok.index(False)

    assert in_child(child) == 0
    # the parent still has its registrations and gets the death the child
    # could have taken
    assert len(m) == 3 and not m.closed
    got = m.wait(2)
    assert [(d.key, d.status) for d in got] == [(0, Status.PEER_CLOSED)]
    ps[1][1].close()
    assert [d.key for d in m.wait(2)] == [1]
    m.close()


def test_child_never_hangs_when_a_parent_thread_was_waiting(loopback_pair):
    cli, peer = loopback_pair
    m = Monitor()
    m.add(cli, key="c")
    inside = threading.Event()
    got: List[object] = []

    def waiter() -> None:
        inside.set()
        got.extend(m.wait(5))

    t = threading.Thread(target=waiter)
    t.start()
    assert inside.wait(5)
    time.sleep(0.05)                        # the thread sleeps in epoll_wait

    def child() -> int:
        ok = [refuses(lambda: m.add(cli)), refuses(lambda: m.wait(0))]
        m.close()                           # must not wait for the parent's thread
        ok.append(m.closed)
        return 0 if all(ok) else 1 + ok.index(False)

    assert in_child(child) == 0
    peer.close()                            # the parent's waiter still works
    t.join(5)
    assert not t.is_alive()
    assert [d.key for d in got] == ["c"]        # type: ignore[attr-defined]
    m.close()


def test_batch_in_child_refuses(loopback_pairs):
    ps: List[Pair] = loopback_pairs(2)
    b = Batch([c for c, _ in ps])
    ps[0][1].close()
    time.sleep(0.05)

    def child() -> int:
        ok = [refuses(lambda: b.sweep_poll(0)), refuses(b.sweep_states),
              refuses(b.sweep_tcp_info), refuses(b.sweep_peek),
              refuses(lambda: b.rebuild([]))]
        b.close()
        return 0 if all(ok) else 1 + ok.index(False)

    assert in_child(child) == 0
    assert b.sweep_poll(2) == 1 and b.dead()[0].idx == 0


@pytest.mark.parametrize("kind", ["monitor", "batch"])
def test_child_can_make_its_own(loopback_pair, kind):
    cli, peer = loopback_pair
    peer.close()
    time.sleep(0.05)

    def child() -> int:
        if kind == "monitor":
            with Monitor() as mine:
                mine.add(cli)
                return 0 if [d.status for d in mine.wait(2)] == [Status.PEER_CLOSED] else 1
        return 0 if Batch([cli]).sweep_poll(1) == 1 else 1

    assert in_child(child) == 0
