"""fastlive.aio on real sockets, on asyncio's default loop and on uvloop:
peer_gone / watch (FIN, RST, silent death within a bound, cancel, local
close, many connections), the server helpers and bad input."""
from __future__ import annotations

import asyncio
import errno
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from typing import Any, Coroutine, List, Tuple

import pytest
from _aio_util import loop_factory, run_on

import fastlive.aio as aio
from fastlive import Method, Status
from fastlive.testing import ManyPeers, NetnsPair, PeerProcess, close_all, netns_unavailable

NETNS = netns_unavailable()
BOUND = 60.0       # generous: the 2-core CI machine is shared


class Runner:
    """Runs a coroutine on a fresh loop of one kind and checks afterwards
    that nothing was reported to the loop's exception handler (no "Task
    was destroyed but it is pending", no failed callback)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.factory = loop_factory(kind)
        self.errors: List[dict] = []

    def __call__(self, coro: Coroutine[Any, Any, Any], timeout: float = BOUND) -> Any:
        return run_on(self.kind, coro, timeout, self.errors)

@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
    return Runner(request.param)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def accept_one() -> Tuple[asyncio.Server, PeerProcess, asyncio.StreamReader,
                                asyncio.StreamWriter]:
    """A loopback server in this loop and a helper process connected to it."""
    q: asyncio.Queue[Tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    srv = await asyncio.start_server(lambda r, w: q.put_nowait((r, w)), "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    peer = await asyncio.to_thread(PeerProcess, connect=("127.0.0.1", port))
    r, w = await asyncio.wait_for(q.get(), BOUND)
    return srv, peer, r, w


def watching() -> int:
    return len(aio.watcher_for())


# -- deaths ------------------------------------------------------------------
@pytest.mark.parametrize("how", ["fin", "rst"])
def test_peer_gone_fin_rst(run: Runner, how: str) -> None:
    async def main() -> None:
        srv, peer, _r, w = await accept_one()
        try:
            fut = asyncio.ensure_future(aio.peer_gone(w))
            await asyncio.sleep(0.05)
            assert not fut.done()
            assert watching() == 1
            await asyncio.to_thread(peer.close_socket if how == "fin" else peer.reset, 0)
            v = await asyncio.wait_for(fut, BOUND)
            assert v.method is Method.EPOLL
            assert v.status is (Status.PEER_CLOSED if how == "fin" else Status.RESET), v
            assert v.dead and not aio.closed_locally(v)
            assert watching() == 0 and aio.watcher_for().monitor_fd == -1
        finally:
            w.close()
            peer.close()
            srv.close()
    run(main())


def test_one_registration_for_writer_transport_socket_fd(run: Runner) -> None:
    async def main() -> None:
        srv, peer, _r, w = await accept_one()
        try:
            sock = w.transport.get_extra_info("socket")
            conns = [w, w.transport, sock, sock.fileno(), w]
            futs = [aio.watch(c) for c in conns]
            assert watching() == 1          # one Monitor registration for one socket
            await asyncio.to_thread(peer.close_socket, 0)
            done, _ = await asyncio.wait(futs, timeout=BOUND)
            assert len(done) == len(futs)
            assert {f.result().status for f in futs} == {Status.PEER_CLOSED}
        finally:
            w.close()
            peer.close()
            srv.close()
    run(main())


def test_cancel_unregisters_and_releases(run: Runner) -> None:
    async def main() -> None:
        srv, peer, _r, w = await accept_one()
        base = open_fds()
        try:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(aio.peer_gone(w), 0.2)
            assert watching() == 0
            assert aio.watcher_for().monitor_fd == -1
            assert open_fds() == base       # the Monitor's epoll fd and eventfd are gone
            # two waiters; cancelling one keeps the other
            a, b = aio.watch(w), aio.watch(w)
            a.cancel()
            await asyncio.sleep(0)
            assert watching() == 1
            await asyncio.to_thread(peer.reset, 0)
            assert (await asyncio.wait_for(b, BOUND)).status is Status.RESET
            assert a.cancelled()
        finally:
            w.close()
            peer.close()
            srv.close()
    run(main())


def test_local_close_of_writer_and_transport(run: Runner) -> None:
    async def main() -> None:
        srv, peer, _r, w = await accept_one()
        try:
            base = open_fds()
            fut = asyncio.ensure_future(aio.peer_gone(w))
            fut2 = aio.watch(w.transport)
            proto = w.transport.get_protocol()
            await asyncio.sleep(0.05)
            assert "connection_lost" in vars(proto)     # the close hook
            w.close()
            v = await asyncio.wait_for(fut, BOUND)
            assert aio.closed_locally(v) and v is aio.LOCAL_CLOSE
            assert (await fut2) is aio.LOCAL_CLOSE
            await w.wait_closed()
            assert watching() == 0
            assert "connection_lost" not in vars(proto)     # hook removed
            assert open_fds() == base - 1   # the connection's socket; nothing of ours left
            # a closed writer: the verdict at once, nothing registered
            assert (await asyncio.wait_for(aio.peer_gone(w), 5)) is aio.LOCAL_CLOSE
            assert watching() == 0
        finally:
            w.close()
            peer.close()
            srv.close()
    run(main())


def test_local_close_of_bare_socket(run: Runner) -> None:
    """No protocol to hook: the identity sweep reports the close."""
    async def main() -> None:
        a, b = _tcp_pair()
        try:
            fut = aio.watch(a)
            await asyncio.sleep(0.05)
            a.close()
            t = time.monotonic()
            v = await asyncio.wait_for(fut, BOUND)
            assert v is aio.LOCAL_CLOSE
            assert time.monotonic() - t < BOUND
            assert watching() == 0
        finally:
            a.close()
            b.close()
    run(main())


def _tcp_pair() -> Tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as lst:
        c = socket.create_connection(lst.getsockname())
        s, _ = lst.accept()
    return c, s


def test_many_connections_only_the_dead_ones(run: Runner) -> None:
    async def main() -> None:
        with ManyPeers() as mp:
            socks = await asyncio.to_thread(mp.connect, 300)
            try:
                futs = {s.fileno(): aio.watch(s) for s in socks}
                assert watching() == 300
                dead = socks[::7]
                await asyncio.to_thread(mp.fin, dead)
                want = {s.fileno() for s in dead}
                done, _ = await asyncio.wait([futs[fd] for fd in want], timeout=BOUND)
                assert len(done) == len(want)
                await asyncio.sleep(0.2)
                got = {fd for fd, f in futs.items() if f.done()}
                assert got == want
                assert all(futs[fd].result().status is Status.PEER_CLOSED for fd in want)
                assert watching() == 300 - len(want)
                for f in futs.values():
                    f.cancel()
                await asyncio.sleep(0)
                assert watching() == 0
            finally:
                close_all(socks)
    run(main())


@pytest.mark.slow
@pytest.mark.no_qemu("network namespaces")
@pytest.mark.skipif(NETNS is not None, reason=f"netns: {NETNS}")
def test_silent_death_within_bound(run: Runner) -> None:
    """Link down: no FIN, no RST.  peer_gone(within=4) reports TIMED_OUT by
    a kernel timer; a second stream without fastlive still sees nothing."""
    with NetnsPair() as pair:
        assert pair.local is not None
        plain_sock = pair.connect()

        async def main() -> None:
            _r, w = await asyncio.open_connection(sock=pair.local)
            _r2, w2 = await asyncio.open_connection(sock=plain_sock)
            try:
                fut = asyncio.ensure_future(aio.peer_gone(w, within=4))
                await asyncio.sleep(0.1)
                await asyncio.to_thread(pair.link_down)
                t = time.monotonic()
                v = await asyncio.wait_for(fut, BOUND)
                took = time.monotonic() - t
                assert v.status is Status.TIMED_OUT, v
                assert v.errno == errno.ETIMEDOUT
                assert v.method in (Method.KEEPALIVE, Method.USER_TIMEOUT, Method.EPOLL)
                assert took < 4 + 10, took          # the bound, plus slack for a loaded box
                assert not w2.transport.is_closing()   # without fastlive: nothing yet
            finally:
                w.close()
                w2.close()
        run(main())


# -- server helpers ---------------------------------------------------------------
@pytest.mark.parametrize("how", ["fin", "rst"])
def test_start_server_guards_each_connection(run: Runner, how: str) -> None:
    async def main() -> None:
        gone: asyncio.Queue[Tuple[Any, Any]] = asyncio.Queue()
        handler_state: List[str] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await asyncio.Event().wait()        # never touches the socket
            except asyncio.CancelledError:
                handler_state.append("cancelled")
                raise

        srv = await aio.start_server(handle, "127.0.0.1", 0, within=10,
                                     on_gone=lambda c, v: gone.put_nowait((c, v)),
                                     cancel_handler=True)
        port = srv.sockets[0].getsockname()[1]
        peers = [await asyncio.to_thread(PeerProcess, connect=("127.0.0.1", port))
                 for _ in range(3)]
        try:
            for _ in range(100):
                if watching() == 3:
                    break
                await asyncio.sleep(0.05)
            assert watching() == 3
            await asyncio.to_thread(peers[1].close_socket if how == "fin" else peers[1].reset, 0)
            conn, v = await asyncio.wait_for(gone.get(), BOUND)
            assert isinstance(conn, asyncio.StreamWriter)
            assert v.status is (Status.PEER_CLOSED if how == "fin" else Status.RESET)
            assert conn.transport.is_closing()
            await asyncio.sleep(0.1)
            assert handler_state == ["cancelled"]
            assert watching() == 2 and gone.empty()
        finally:
            for p in peers:
                p.close()
            srv.close()
            await srv.wait_closed()
    run(main())


def test_guard_protocol_for_create_server(run: Runner) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        events: List[str] = []
        gone: asyncio.Future[Any] = loop.create_future()

        class Echo(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport
                events.append("made")

            def data_received(self, data: bytes) -> None:
                self.transport.write(data)  # type: ignore[attr-defined]

            def connection_lost(self, exc: Any) -> None:
                events.append("lost")

        srv = await loop.create_server(
            aio.guard_protocol(Echo, within=10,
                               on_gone=lambda c, v: gone.done() or gone.set_result(v)),
            "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        peer = await asyncio.to_thread(PeerProcess, connect=("127.0.0.1", port))
        try:
            await asyncio.to_thread(peer.send, b"hello")
            await asyncio.sleep(0.2)
            assert events == ["made"]
            assert peer.stats().get("received", 5) >= 0
            await asyncio.to_thread(peer.reset, 0)
            v = await asyncio.wait_for(gone, BOUND)
            assert v.status is Status.RESET
            for _ in range(100):
                if "lost" in events:
                    break
                await asyncio.sleep(0.05)
            assert events == ["made", "lost"]
            assert watching() == 0
        finally:
            peer.close()
            srv.close()
            await srv.wait_closed()
    run(main())


# -- bad input ---------------------------------------------------------------
def test_bad_input(run: Runner, tmp_path: Any) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        udp, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol,
                                                     local_addr=("127.0.0.1", 0))
        try:
            with pytest.raises(ValueError, match="conn: .*UDP"):
                await aio.peer_gone(udp)
        finally:
            udp.close()
        path = str(tmp_path / "s")
        usrv = await asyncio.start_unix_server(lambda r, w: None, path)
        _ur, uw = await asyncio.open_unix_connection(path)
        try:
            with pytest.raises(ValueError, match="conn: .*unix"):
                await aio.peer_gone(uw)
        finally:
            uw.close()
            usrv.close()
        with socket.create_server(("127.0.0.1", 0)) as lst:
            with pytest.raises(ValueError, match="conn: not a connected TCP socket"):
                await aio.peer_gone(lst)
        with pytest.raises(TypeError, match="conn must be"):
            await aio.peer_gone("x")
        with pytest.raises(TypeError, match="conn must be"):
            await aio.peer_gone(True)
        with pytest.raises(ValueError, match="conn: fd"):
            await aio.peer_gone(-3)
        r, w = os.pipe()
        try:
            with pytest.raises(ValueError, match="not a socket"):
                await aio.peer_gone(r)
        finally:
            os.close(r)
            os.close(w)
        with pytest.raises(ValueError, match="not open"):
            await aio.peer_gone(r)
        a, b = _tcp_pair()
        try:
            for bad in (0, 1, -5, float("nan"), 1e9):
                with pytest.raises(ValueError, match="within"):
                    await aio.peer_gone(a, within=bad)
            with pytest.raises(TypeError, match="within"):
                await aio.peer_gone(a, within="5")
            with pytest.raises(TypeError, match="guard"):
                aio.guard(a)
            s2 = socket.socket()
            s2.close()
            assert (await aio.peer_gone(s2)) is aio.LOCAL_CLOSE     # a closed socket
        finally:
            a.close()
            b.close()
        assert watching() == 0
    run(main())


def test_outside_a_running_loop() -> None:
    a, b = _tcp_pair()
    try:
        with pytest.raises(RuntimeError, match="running event loop"):
            aio.watch(a)
        with pytest.raises(RuntimeError, match="running event loop"):
            aio.guard(a)
        coro = aio.peer_gone(a)
        with pytest.raises(RuntimeError, match="running event loop"):
            coro.send(None)
        coro.close()
    finally:
        a.close()
        b.close()


def test_writer_of_another_loop(run: Runner) -> None:
    """A StreamWriter (or asyncio transport) of another loop: ValueError."""
    ready = threading.Event()
    stop = threading.Event()
    box: dict = {}

    def other() -> None:
        async def hold() -> None:
            lst = socket.create_server(("127.0.0.1", 0))
            c = socket.create_connection(lst.getsockname())
            s, _ = lst.accept()
            lst.close()
            _r, w = await asyncio.open_connection(sock=c)
            box.update(w=w, s=s)
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.02)
            w.close()
            s.close()
        loop = run.factory()
        loop.run_until_complete(hold())
        loop.close()

    t = threading.Thread(target=other)
    t.start()
    try:
        assert ready.wait(BOUND)

        async def main() -> None:
            with pytest.raises(ValueError, match="another event loop"):
                await aio.peer_gone(box["w"])
            if run.kind == "asyncio":
                with pytest.raises(ValueError, match="another event loop"):
                    await aio.peer_gone(box["w"].transport)
            assert watching() == 0
        run(main())
    finally:
        stop.set()
        t.join(BOUND)


def _self_signed(tmp: Any) -> Tuple[str, str]:
    cert, key = str(tmp / "c.pem"), str(tmp / "k.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", cert, "-days", "1", "-subj", "/CN=localhost"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_ssl_transport_works(run: Runner, tmp_path: Any) -> None:
    """An SSL transport's socket is still TCP: FIN of the peer is seen."""
    try:
        cert, key = _self_signed(tmp_path)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"openssl cannot make a test certificate: {e}")

    async def main() -> None:
        sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        sctx.load_cert_chain(cert, key)
        cctx = ssl.create_default_context()
        cctx.check_hostname = False
        cctx.verify_mode = ssl.CERT_NONE
        accepted: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()
        srv = await asyncio.start_server(lambda r, w: accepted.put_nowait(w), "127.0.0.1", 0,
                                         ssl=sctx)
        port = srv.sockets[0].getsockname()[1]
        _cr, cw = await asyncio.open_connection("127.0.0.1", port, ssl=cctx)
        sw = await asyncio.wait_for(accepted.get(), BOUND)
        try:
            assert sw.transport.get_extra_info("sslcontext") is not None
            fut = asyncio.ensure_future(aio.peer_gone(sw, within=10))
            fut_c = aio.watch(cw)
            await asyncio.sleep(0.05)
            cw.transport.abort()            # the client side closes: RST/FIN, no TLS close
            v = await asyncio.wait_for(fut, BOUND)
            assert v.status in (Status.PEER_CLOSED, Status.RESET), v
            assert (await fut_c) is aio.LOCAL_CLOSE
        finally:
            sw.close()
            cw.close()
            srv.close()
    run(main())


def test_import_fastlive_does_not_import_asyncio() -> None:
    """fastlive.aio is imported explicitly; plain ``import fastlive`` stays
    free of asyncio."""
    code = ("import sys, fastlive; assert 'asyncio' not in sys.modules, 'asyncio'; "
            "assert 'fastlive.aio' not in sys.modules; import fastlive.aio; "
            "assert 'asyncio' in sys.modules")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=root))
    assert out.returncode == 0, out.stderr
