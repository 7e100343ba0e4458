"""Shared helpers of tests/test_metrics*.py and tests/test_exporter*.py."""
from __future__ import annotations

import os
import socket
import time
from typing import Any, List, Tuple

import fastlive


def counted_monitor() -> fastlive.Monitor:
    """A real Monitor (it registers itself for the exporters and counts its deaths)."""
    m = fastlive.Monitor()
    assert hasattr(m, "counters"), "Monitor lacks the registry hooks"
    return m


def wait_deaths(mon: fastlive.Monitor, n: int, timeout: float = 10.0) -> List[Any]:
    """Collect n deaths from mon (bounded in time)."""
    out: List[Any] = []
    end = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < end:
        out += mon.wait(0.2)
    assert len(out) == n, f"expected {n} deaths, got {len(out)}: {out}"
    # Monitor counts the deaths it returned when the caller's next wait()
    # (or close()) acknowledges them, as an application's loop does.
    assert mon.wait(0) == []
    return out


def close_wait_on(port_count: int, lst: socket.socket) -> Tuple[List[socket.socket], int]:
    """port_count connections to the listener lst whose clients close: the
    accepted ends stay in CLOSE_WAIT on lst's port.  Returns (accepted, port)."""
    port = lst.getsockname()[1]
    accepted = []
    for _ in range(port_count):
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
        a, _ = lst.accept()
        c.close()
        accepted.append(a)
    # the FIN is processed synchronously on loopback, but wait for the states
    end = time.monotonic() + 5
    while time.monotonic() < end:
        if all(fastlive.tcp_info(a).state == fastlive.TcpState.CLOSE_WAIT for a in accepted):
            break
        time.sleep(0.01)
    return accepted, port


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))
