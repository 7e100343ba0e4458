"""fastlive.aio with software nobody here wrote, on asyncio and uvloop:

* redis-server (Debian package) inside a netns pair and the ``redis`` PyPI
  client's asyncio API: the server is blackholed while connected; without
  fastlive ``await r.get(k)`` is still blocked after 10 s, with the
  documented recipe (docs/aio.md) it fails within the bound and the next
  call reconnects.
* aiohttp's server: a client that vanishes (link down) is closed within the
  bound; the same client on an unguarded listener is still there.
* aiohttp's client with ``fastlive.aio.socket_factory``: a GET on a server
  blackholed mid-request fails within the bound (+ SCHED_SLACK), aiohttp's
  retry on a fresh connection included.
* PostgreSQL (Debian package, a throwaway cluster started in B as the
  ``postgres`` account) and asyncpg: a query on a blackholed server fails
  within the bound with the documented recipe (the pool's ``init`` guards
  each connection) and the pool reconnects; an unguarded query still waits.
  psycopg 3's AsyncConnection the same way (``detect_within`` on
  ``conn.pgconn.socket``).
"""
from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any, Coroutine, Dict, Iterator, List, Optional, Tuple

import pytest
from _aio_util import run_on

import fastlive.aio as aio
from fastlive import Status
from fastlive.testing import NetnsPair, PeerProcess, in_netns, netns_unavailable

NETNS = netns_unavailable()
BOUND = 5           # the detection bound the tests ask for (seconds)
SLACK = 10.0        # a loaded 2-core machine

pytestmark = [pytest.mark.slow, pytest.mark.no_qemu("network namespaces and real servers"),
              pytest.mark.skipif(NETNS is not None, reason=f"netns: {NETNS}")]


def run(kind: str, coro: Coroutine[Any, Any, Any], timeout: float = 120.0) -> Any:
    return run_on(kind, coro, timeout)


def _restore_address(pair: NetnsPair) -> None:
    """Undo NetnsPair.blackhole(): the server's address comes back in B."""
    subprocess.run(["ip", "-n", pair.ns_b, "addr", "add", f"{pair.addr_b}/24", "dev", pair.dev_b],
                   check=True, capture_output=True, timeout=10)


async def _guarded_fails_in_bound(g: "asyncio.Future[Any]", p: "asyncio.Future[Any]",
                                  errors: Any, t0: float, what: str) -> float:
    """The guarded call ``g`` raises one of ``errors`` within the bound (plus
    the loop's share) of ``t0``, the blackhole, while the unguarded ``p``
    still waits; returns the seconds it took."""
    with pytest.raises(errors):
        await asyncio.wait_for(g, BOUND + SLACK)
    took = time.monotonic() - t0
    assert took < BOUND + SCHED_SLACK, took
    assert not p.done(), f"without fastlive the {what} should still be waiting"
    return took


def _wait_port(pair: NetnsPair, port: int, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while True:
        with pair.inside_a():
            s = socket.socket()
        try:
            s.settimeout(1.0)
            s.connect((pair.addr_b, port))
            return
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.1)
        finally:
            s.close()


@contextlib.contextmanager
def redis_server(pair: NetnsPair, port: int = 6390) -> Any:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", pair.ns_b, exe, "--port", str(port), "--bind", "0.0.0.0",
         "--protected-mode", "no", "--save", "", "--appendonly", "no", "--daemonize", "no",
         "--loglevel", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(pair, port)
        yield port
    finally:
        proc.kill()
        proc.wait(10)


def test_redis_blackholed_server(kind: str) -> None:
    """The guarded client fails within the bound and then reconnects, on
    each loop.  That the same call without fastlive is still blocked 10 s
    after the blackhole is shown once, on asyncio's loop (it runs in the
    same window as the guarded call); uvloop's run skips those 10 s."""
    redis_asyncio = pytest.importorskip("redis.asyncio", reason="pip install redis")
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    # The recipe (docs/aio.md): guard the driver's connection once it is made.
    async def guarded_connect(conn: Any) -> None:
        aio.guard(conn._writer, within=BOUND)
        await conn.on_connect()

    with NetnsPair() as pair, redis_server(pair) as port:
        async def main() -> None:
            # socket_timeout=None: no read timeout (redis-py < 8's default; 8.x
            # defaults to 5 s, which also fails a slow command or a BLPOP on a
            # healthy server).  No retries, so the failure is seen.
            kw = dict(host=pair.addr_b, port=port, retry=Retry(NoBackoff(), 0),
                      socket_timeout=None, single_connection_client=True)
            watch_plain = kind == "asyncio"     # the unguarded 10 s: once
            plain = redis_asyncio.Redis(**kw)
            guarded = redis_asyncio.Redis(redis_connect_func=guarded_connect, **kw)
            try:
                await plain.set("k", "v1")
                assert await guarded.get("k") == b"v1"
                assert len(aio.watcher_for()) == 1
                await asyncio.to_thread(pair.blackhole)
                t0 = time.monotonic()
                p = asyncio.ensure_future(plain.get("k")) if watch_plain else None
                g = asyncio.ensure_future(guarded.get("k"))
                with pytest.raises((RedisConnectionError, RedisTimeoutError)):
                    await asyncio.wait_for(g, BOUND + SLACK)
                took = time.monotonic() - t0
                assert took < BOUND + SLACK, took
                if p is not None:
                    await asyncio.sleep(max(0.0, 10.0 - (time.monotonic() - t0)))
                    assert not p.done(), "without fastlive the call should still be blocked"
                    p.cancel()
                    await asyncio.gather(p, return_exceptions=True)
                await asyncio.to_thread(_restore_address, pair)
                assert await asyncio.wait_for(guarded.get("k"), 30) == b"v1"    # reconnected
                print(f"\n{kind}: guarded GET failed after {took:.2f} s (bound {BOUND} s)"
                      + ("; unguarded still blocked at 10 s" if p is not None else ""))
            finally:
                for r in (plain, guarded):
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(r.aclose(), 5)
        with pair.inside_a():      # the clients' sockets are made in namespace A
            run(kind, main())


SCHED_SLACK = 0.5   # aiohttp tests: the bound is the kernel's; this is the loop's and the test's share


def test_aiohttp_server_closes_vanished_client(kind: str) -> None:
    web = pytest.importorskip("aiohttp.web", reason="pip install aiohttp")

    with NetnsPair() as pair:
        with pair.inside_a():
            lst_g = socket.create_server((pair.addr_a, 0))
            lst_p = socket.create_server((pair.addr_a, 0))
        # The client is started here, from the main thread outside A: a
        # helper spawned from a worker thread of a loop running inside A
        # would make fastlive.testing's spawner thread (started on first use,
        # for good) inherit A, and later tests' loopback helpers would start
        # in that (deleted) namespace.  Its connections wait in the backlogs.
        client = PeerProcess(connect=(pair.addr_a, lst_g.getsockname()[1]), netns=pair.ns_b)
        other = client.connect((pair.addr_a, lst_p.getsockname()[1]))

        async def main() -> None:
            loop = asyncio.get_running_loop()
            started = asyncio.Event()

            async def long_poll(request: Any) -> Any:
                started.set()
                await asyncio.Event().wait()     # waits for an event that never comes
                return web.Response(text="never")

            app = web.Application()
            app.router.add_get("/wait", long_poll)
            runner = web.AppRunner(app, shutdown_timeout=1.0)
            await runner.setup()
            gone: List[Any] = []
            srv_g = await loop.create_server(
                aio.guard_protocol(runner.server, within=BOUND,
                                   on_gone=lambda tr, v: gone.append((time.monotonic(), v))),
                sock=lst_g)
            srv_p = await loop.create_server(runner.server, sock=lst_p)
            try:
                req = b"GET /wait HTTP/1.1\r\nHost: test\r\n\r\n"
                for conn in (0, other):
                    started.clear()
                    await asyncio.to_thread(client.send, req, conn)
                    await asyncio.wait_for(started.wait(), 30)
                assert len(runner.server.connections) == 2
                await asyncio.to_thread(pair.link_down)
                t0 = time.monotonic()
                end = t0 + BOUND + SLACK
                while not gone and time.monotonic() < end:
                    await asyncio.sleep(0.1)
                assert gone, "the vanished client was not detected"
                took = gone[0][0] - t0
                assert gone[0][1].status is Status.TIMED_OUT, gone[0][1]
                assert took < BOUND + SCHED_SLACK, took
                def open_handlers() -> int:
                    return sum(h.transport is not None for h in runner.server.connections)

                while open_handlers() > 1 and time.monotonic() < end:
                    await asyncio.sleep(0.05)
                # the guarded connection is closed; the unguarded one still hangs on
                assert open_handlers() == 1
                print(f"\n{kind}: aiohttp connection closed {took:.2f} s after link down "
                      f"(bound {BOUND} s); the unguarded one is still open")
            finally:
                srv_g.close()
                srv_p.close()
                await runner.cleanup()
        try:
            with pair.inside_a():
                run(kind, main())
        finally:
            client.close()
            lst_g.close()
            lst_p.close()


def test_aiohttp_client_socket_factory(kind: str) -> None:
    """A GET outstanding on a server that then vanishes (blackhole): with
    fastlive's socket factory the session's call fails within the bound -
    the established connection's ETIMEDOUT *and* aiohttp's retry of the
    idempotent request on a fresh connection (whose SYN is never answered)
    both fit in it; without it the request is still waiting."""
    aiohttp = pytest.importorskip("aiohttp", reason="pip install aiohttp")

    with NetnsPair() as pair:
        assert pair.peer is not None
        url = f"http://{pair.addr_b}:{pair.peer.port}/"   # accepts, never answers

        async def main() -> None:
            connects: List[float] = []

            async def on_connect(*_a: Any) -> None:
                connects.append(time.monotonic())
            trace = aiohttp.TraceConfig()
            trace.on_connection_create_start.append(on_connect)
            timeout = aiohttp.ClientTimeout(total=None)
            guarded = aiohttp.ClientSession(timeout=timeout, trace_configs=[trace],
                                            connector=aiohttp.TCPConnector(
                                                socket_factory=aio.socket_factory(within=BOUND)))
            plain = aiohttp.ClientSession(timeout=timeout)
            try:
                g = asyncio.ensure_future(guarded.get(url))
                p = asyncio.ensure_future(plain.get(url))
                await asyncio.sleep(1.0)
                assert not g.done() and not p.done()
                await asyncio.to_thread(pair.blackhole)
                t0 = time.monotonic()
                took = await _guarded_fails_in_bound(g, p, aiohttp.ClientError, t0, "request")
                p.cancel()
                await asyncio.gather(p, return_exceptions=True)
                retry = (f"aiohttp's retry connected {connects[1] - t0:.2f} s after"
                         if len(connects) > 1 else "no retry")
                print(f"\n{kind}: aiohttp GET failed {took:.2f} s after the blackhole "
                      f"(bound {BOUND} s; {retry}); the plain session's is still waiting")
            finally:
                await guarded.close()
                await plain.close()
        with pair.inside_a():
            run(kind, main())


# -- PostgreSQL + asyncpg ---------------------------------------------------

def _pg_bindir() -> Optional[str]:
    """Where initdb and postgres are: PATH, else Debian's
    /usr/lib/postgresql/<version>/bin (the newest)."""
    exe = shutil.which("postgres")
    if exe is not None and shutil.which("initdb") is not None:
        return os.path.dirname(exe)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                   key=lambda p: [int(x) for x in re.findall(r"\d+", p)])
    for exe in reversed(found):
        if os.access(os.path.join(os.path.dirname(exe), "initdb"), os.X_OK):
            return os.path.dirname(exe)
    return None


def _pg_account() -> Tuple[int, int]:
    """postgres refuses to run as root: the ``postgres`` account, else ``nobody``."""
    for name in ("postgres", "nobody"):
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        return pw.pw_uid, pw.pw_gid
    pytest.skip("no 'postgres' or 'nobody' account to run the PostgreSQL server as")


@pytest.fixture(scope="module")
def pg_template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tuple[str, str, int, int]]:
    """One initdb per module (a throwaway cluster, trust auth, no fsync),
    copied for every test; removed at the end."""
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("the PostgreSQL server is not installed "
                    "(apt-get install -y --no-install-recommends postgresql)")
    uid, gid = _pg_account()
    base = tempfile.mkdtemp(prefix="fl-pg-")
    try:
        os.chown(base, uid, gid)
        data = os.path.join(base, "template")
        subprocess.run([os.path.join(bindir, "initdb"), "-D", data, "-U", "postgres", "-A", "trust",
                        "--no-sync", "-E", "UTF8", "--locale=C", "--no-instructions"],
                       user=uid, group=gid, extra_groups=[], check=True, capture_output=True,
                       timeout=60, cwd=base)
        with open(os.path.join(data, "pg_hba.conf"), "a") as f:   # the netns pair's clients
            f.write("host all all samenet trust\n")
        yield bindir, base, uid, gid
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def postgres_server(pair: NetnsPair, tmpl: Tuple[str, str, int, int], port: int = 5439) -> Any:
    """A PostgreSQL server inside B on ``pair.addr_b:port`` (a copy of the
    template cluster, run as the unprivileged account), stopped (SIGQUIT:
    immediate shutdown, then SIGKILL) and removed at the end."""
    bindir, base, uid, gid = tmpl
    data = tempfile.mkdtemp(prefix="run-", dir=base)
    shutil.rmtree(data)
    shutil.copytree(os.path.join(base, "template"), data, symlinks=True)
    for root, dirs, files in os.walk(data):
        for n in dirs + files:
            os.lchown(os.path.join(root, n), uid, gid)
    os.lchown(data, uid, gid)
    os.chmod(data, 0o700)
    with in_netns(pair.ns_b):       # the server's sockets live in B
        proc = subprocess.Popen(
            [os.path.join(bindir, "postgres"), "-D", data, "-p", str(port), "-k", data,
             "-c", f"listen_addresses={pair.addr_b}", "-c", "fsync=off",
             "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "max_connections=10", "-c", "shared_buffers=8MB", "-c", "logging_collector=off"],
            user=uid, group=gid, extra_groups=[], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, cwd=data)
    try:
        _wait_port(pair, port)
        yield port
    finally:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(data, ignore_errors=True)


def test_asyncpg_blackholed_server(kind: str, pg_template: Tuple[str, str, int, int]) -> None:
    """asyncpg against a real PostgreSQL server blackholed while a query
    waits: with the documented recipe (the pool's ``init`` guards every new
    connection) the query fails within the bound and the pool's next query
    reconnects; without it the query is still waiting."""
    asyncpg = pytest.importorskip("asyncpg", reason="pip install asyncpg")

    async def init(conn: Any) -> None:         # the recipe (docs/aio.md)
        aio.guard(conn._transport, within=BOUND)

    with NetnsPair() as pair, postgres_server(pair, pg_template) as port:
        async def main() -> None:
            kw: Dict[str, Any] = dict(host=pair.addr_b, port=port, user="postgres",
                                      database="postgres")
            plain = await asyncpg.connect(**kw)
            pool = await asyncpg.create_pool(init=init, min_size=1, max_size=1, **kw)
            try:
                assert await pool.fetchval("SELECT 1") == 1
                assert len(aio.watcher_for()) == 1
                await asyncio.to_thread(pair.blackhole)
                t0 = time.monotonic()
                sql = "SELECT 2"
                p = asyncio.ensure_future(plain.fetchval(sql))
                g = asyncio.ensure_future(pool.fetchval(sql))
                took = await _guarded_fails_in_bound(
                    g, p, (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError),
                    t0, "query")
                p.cancel()
                await asyncio.gather(p, return_exceptions=True)
                await asyncio.to_thread(_restore_address, pair)
                assert await asyncio.wait_for(pool.fetchval("SELECT 3"), 30) == 3   # reconnected
                print(f"\n{kind}: asyncpg query failed {took:.2f} s after the blackhole "
                      f"(bound {BOUND} s, {type(g.exception()).__name__}); the unguarded one "
                      "was still waiting; the pool reconnected")
            finally:
                plain.terminate()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pool.close(), 5)
                pool.terminate()
        with pair.inside_a():
            run(kind, main())


def test_psycopg_blackholed_server(kind: str, pg_template: Tuple[str, str, int, int]) -> None:
    """psycopg 3's AsyncConnection against a real PostgreSQL server blackholed
    while a query waits: with the documented recipe (``detect_within`` on
    ``conn.pgconn.socket``) the query fails within the bound; the same query
    on an unguarded connection still waits, and completes once the network
    is back (its bytes were only delayed)."""
    psycopg = pytest.importorskip("psycopg", reason="pip install 'psycopg[binary]'")
    import fastlive

    async def one(conn: Any, sql: str) -> Any:
        cur = await conn.execute(sql)
        return await cur.fetchone()

    with NetnsPair() as pair, postgres_server(pair, pg_template) as port:
        async def main() -> None:
            dsn = f"host={pair.addr_b} port={port} user=postgres dbname=postgres"
            plain = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
            guarded = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
            try:
                fastlive.detect_within(guarded.pgconn.socket, BOUND)    # the recipe
                assert await one(guarded, "SELECT 1") == (1,)
                await asyncio.to_thread(pair.blackhole)
                t0 = time.monotonic()
                p = asyncio.ensure_future(one(plain, "SELECT 2"))
                g = asyncio.ensure_future(one(guarded, "SELECT 2"))
                took = await _guarded_fails_in_bound(g, p, psycopg.OperationalError, t0, "query")
                assert guarded.closed or guarded.broken
                await asyncio.to_thread(_restore_address, pair)
                assert await asyncio.wait_for(p, 60) == (2,)    # only delayed: TCP retransmits
                again = await asyncio.wait_for(psycopg.AsyncConnection.connect(dsn), 30)
                async with again:
                    assert await one(again, "SELECT 3") == (3,)
                print(f"\n{kind}: psycopg query failed {took:.2f} s after the blackhole "
                      f"(bound {BOUND} s, {type(g.exception()).__name__}); the unguarded one "
                      "waited and completed once the network was back")
            finally:
                for c in (plain, guarded):
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(c.close(), 5)
        with pair.inside_a():
            run(kind, main())
