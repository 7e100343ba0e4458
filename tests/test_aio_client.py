"""fastlive.aio.socket_factory on real loopback sockets, asyncio and uvloop:
the bound's split between handshakes and the established connection, the
re-arm after the handshake, bad input.  (The blackholed-server case with
aiohttp is in test_aio_real.py.)"""
from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from _aio_util import run_on

import fastlive.aio as aio
from fastlive import get_keepalive
from fastlive.keepalive import plan_within

AI = (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", 0))


@pytest.mark.parametrize("within,reconnects", [(3, 1), (5, 1), (10, 1), (30, 1), (10, 2), (5, 0)])
def test_plan_fits_the_bound(within: float, reconnects: int) -> None:
    p = aio.plan_client(within, reconnects)
    est = p.established
    if reconnects == 0:
        assert est == plan_within(within) and p.handshake == est.user_timeout
        return
    assert p.handshake >= 1.0
    # the established connection's worst case (idle: the first keepalive
    # tick at or past the user timeout; busy: user timeout + BUSY_SLACK)
    # plus every reconnect's handshake is within the bound
    assert est.idle + est.interval * est.count <= p.connected_bound
    assert est.user_timeout + 1.5 <= p.connected_bound
    assert p.connected_bound + reconnects * p.handshake <= within + 1e-9


def test_bad_input() -> None:
    with pytest.raises(TypeError, match="within"):
        aio.socket_factory(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="within"):
        aio.socket_factory(2.5)            # 2 s + 1 s handshake do not fit
    with pytest.raises(TypeError, match="reconnects"):
        aio.socket_factory(5, reconnects=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reconnects"):
        aio.socket_factory(5, reconnects=-1)
    assert callable(aio.socket_factory(2, reconnects=0))


def test_armed_before_connect_outside_a_loop() -> None:
    p = aio.plan_client(10)
    s = aio.socket_factory(10)(AI)
    try:
        ka = get_keepalive(s)
        assert ka.enabled and (ka.idle, ka.interval, ka.count) == (
            p.established.idle, p.established.interval, p.established.count)
        assert ka.user_timeout == p.handshake        # no loop: no re-arm
    finally:
        s.close()
    d = aio.socket_factory(10)((socket.AF_INET, socket.SOCK_DGRAM, 0, "", ("127.0.0.1", 0)))
    try:
        assert d.type == socket.SOCK_DGRAM          # made, left alone
    finally:
        d.close()


def test_rearmed_after_the_handshake(kind: str, listener: socket.socket) -> None:
    """Connected inside a loop: the handshake's short user timeout until
    the end of the handshake budget, then the connection's own."""
    within = 4.0                              # handshake 1 s, connection 3 s
    p = aio.plan_client(within)
    assert p.handshake == 1.0 and p.established.user_timeout == 1.5

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        s = aio.socket_factory(within)(AI[:4] + (listener.getsockname(),))
        s.setblocking(False)
        try:
            await loop.sock_connect(s, listener.getsockname())
            before = get_keepalive(s).user_timeout
            await asyncio.sleep(p.handshake + 0.3)
            return before, get_keepalive(s).user_timeout
        finally:
            s.close()
    before, after = run_on(kind, main(), 30)
    assert before == p.handshake
    assert after == p.established.user_timeout


def test_closed_before_rearm(kind: str, listener: socket.socket) -> None:
    """A socket closed (its fd number reused) before the re-arm is left
    alone: the re-arm checks the inode."""
    async def main() -> Any:
        s = aio.socket_factory(4.0)(AI[:4] + (listener.getsockname(),))
        fd = s.fileno()
        s.close()
        t = socket.create_connection(listener.getsockname())   # likely the same fd number
        try:
            before = get_keepalive(t)
            await asyncio.sleep(1.3)
            return fd == t.fileno(), before, get_keepalive(t)
        finally:
            t.close()
    _same, before, after = run_on(kind, main(), 30)
    assert before == after
