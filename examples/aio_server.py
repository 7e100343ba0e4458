#!/usr/bin/env python3
"""An asyncio line-echo server that holds thousands of clients and closes
the dead ones within a bound, with fastlive.aio.

Every accepted connection is guarded (``fastlive.aio.start_server``): a
peer's FIN or RST closes it at once, and keepalive + TCP_USER_TIMEOUT armed
from ``--within`` turn a silent death (cable pulled, host gone) into a close
within that many seconds.  The handlers never poll anything.

    python examples/aio_server.py --port 8888 --within 10     # serve (loopback)
    python examples/aio_server.py --demo 2000                 # self-contained demo

``--demo N`` starts the server, two client processes holding N connections
(90% / 10%), SIGKILLs the small one and reports how fast the server closed
those connections (the kernel sends their FINs) while the others stay open.
Loopback addresses only.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import ipaddress
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Counter, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a source tree

import fastlive.aio as aio  # noqa: E402
from fastlive import Verdict  # noqa: E402


class Server:
    def __init__(self, within: float, quiet: bool) -> None:
        self.within = within
        self.quiet = quiet
        self.clients = 0
        self.closed: Counter[str] = collections.Counter()
        self.gone_at: List[float] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.clients += 1
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                writer.write(line)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.clients -= 1
            writer.close()

    def on_gone(self, writer: asyncio.StreamWriter, verdict: Verdict) -> None:
        self.gone_at.append(time.monotonic())
        self.closed[verdict.status.name] += 1
        if not self.quiet:
            peer = writer.get_extra_info("peername")
            print(f"closing {peer}: {verdict}", flush=True)

    async def start(self, host: str, port: int, backlog: int = 4096) -> asyncio.Server:
        return await aio.start_server(self.handle, host, port, within=self.within,
                                      on_gone=self.on_gone, cancel_handler=True, backlog=backlog)


def loopback(host: str) -> str:
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"{host!r}: this example listens on loopback addresses only")
    return host


def raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))


def client_main(host: str, port: int, n: int) -> None:
    """--client: hold n connections to the server until killed."""
    raise_nofile(n + 64)
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, port), timeout=30)
        socks.append(s)
    print("connected", flush=True)
    sys.stdin.read()          # until the demo kills us or closes stdin


def spawn_clients(host: str, port: int, n: int) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, __file__, "--client", str(n), "--host", host,
                          "--port", str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout is not None
    if p.stdout.readline().strip() != "connected":
        p.kill()
        raise RuntimeError("client process failed")
    return p


async def demo(args: argparse.Namespace) -> Dict[str, Any]:
    raise_nofile(args.demo + 256)
    srv = Server(args.within, quiet=True)
    server = await srv.start(args.host, 0)
    port = server.sockets[0].getsockname()[1]
    small = max(1, args.demo // 10)
    procs: List[subprocess.Popen[str]] = []
    try:
        procs.append(await asyncio.to_thread(spawn_clients, args.host, port, args.demo - small))
        procs.append(await asyncio.to_thread(spawn_clients, args.host, port, small))
        end = time.monotonic() + 60
        while srv.clients < args.demo and time.monotonic() < end:
            await asyncio.sleep(0.05)
        held = srv.clients
        watched = len(aio.watcher_for())
        t0 = time.monotonic()
        os.kill(procs[1].pid, signal.SIGKILL)
        while sum(srv.closed.values()) < small and time.monotonic() < end:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)
        return {"held": held, "watched": watched, "killed": small,
                "closed": dict(srv.closed), "still_open": srv.clients,
                "last_close_ms": round((max(srv.gone_at) - t0) * 1000, 1) if srv.gone_at else None}
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
            for f in (p.stdin, p.stdout):
                if f is not None:
                    f.close()
        server.close()
        await server.wait_closed()


async def serve(args: argparse.Namespace) -> None:
    srv = Server(args.within, quiet=False)
    server = await srv.start(args.host, args.port)
    print(f"serving on {args.host}:{server.sockets[0].getsockname()[1]}, dead clients closed "
          f"within {args.within:g} s", flush=True)
    async with server:
        while True:
            await asyncio.sleep(args.every)
            print(f"clients={srv.clients} closed={dict(srv.closed)}", flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--host", type=loopback, default="127.0.0.1", help="loopback address")
    ap.add_argument("--port", type=int, default=8888)
    ap.add_argument("--within", type=float, default=10.0,
                    help="bound for silent deaths, seconds (>= 2; default 10)")
    ap.add_argument("--every", type=float, default=5.0, help="status line every N seconds")
    ap.add_argument("--uvloop", action="store_true", help="run on uvloop")
    ap.add_argument("--demo", type=int, metavar="N", help="self-contained demo with N clients")
    ap.add_argument("--client", type=int, metavar="N", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    aio.check_within(args.within)
    if args.client:
        client_main(args.host, args.port, args.client)
        return 0
    runner: Any = asyncio.run
    if args.uvloop:
        import uvloop
        runner = uvloop.run
    if args.demo:
        if not 10 <= args.demo <= 15000:
            ap.error("--demo: 10..15000 clients")
        print(json.dumps(runner(demo(args))), flush=True)
        return 0
    try:
        runner(serve(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
