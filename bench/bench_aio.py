#!/usr/bin/env python3
"""fastlive.aio on 10,000 connections, asyncio and uvloop side by side.

1. peer_gone: N idle connections (streams; the peer ends held by
   fastlive.testing.ManyPeers helper processes), one handler task each:
   ``plain`` handlers wait in ``reader.read()`` (the same server without
   fastlive), ``fastlive`` handlers in ``await peer_gone(writer)`` (``--within``
   arms a bound too).
   Loop CPU over an idle window (getrusage of the server process), then a
   SIGKILL of the holder of 1% of the peers: how long after the first
   handler woke the last one woke (every await within 5 ms of the first FIN
   is the target), and after the kill.  A woken handler only notes the time;
   the streams stay referenced until the measurement is over (a handler
   that dropped its unclosed StreamWriter would make every wake-up pay
   StreamWriter.__del__: a transport close and a ResourceWarning, ~40 us on
   asyncio, in front of the next handler's wake-up).
2. heartbeat: N connections to a C peer that answers PINGs, interval 1 s:
   the C floor (bench_heartbeat.py's plain C loop, also with the engine's
   spread schedule), the engine alone (no event loop), LoopHeartbeat on the
   loop (the engine's fd on the loop), asyncio one task per connection
   (sleep, write, read the PONG) and a websockets-style keepalive (a ping
   task per connection waiting on a pong future resolved by the protocol),
   each also with the loop blocked in stretches of one interval
   (``+blocked``: a task that sleeps 1 s and then blocks the loop for 1 s,
   over and over, at the default interval).  CPU
   as a ratio to the floor, PING lateness, and deaths (there should be none:
   every peer answers).  The floors, the engine and LoopHeartbeat run in
   ``--rounds`` interleaved rounds (default 3) and are reported as medians,
   with each ratio taken within its round.

``--quick``: 200 connections, interval 0.5 s, 0.6 s windows after 0.5 s
warmups: proves every column runs end to end in seconds (the test suite
runs it); its numbers mean little.
Loopback only; every helper process dies with the run.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import bench_heartbeat as bhb  # noqa: E402

LOOPS = ("asyncio", "uvloop")


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def have_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


async def blocker(stretch: float) -> None:
    """Block the loop for ``stretch`` seconds, every other ``stretch`` (out
    of phase with the heartbeat schedules)."""
    await asyncio.sleep(0.37 * stretch)
    while True:
        await asyncio.sleep(stretch)
        time.sleep(stretch)


# --------------------------------------------------------------------------
# 1. peer_gone: idle CPU and a SIGKILL of 1% of the peers

def role_gone(a: argparse.Namespace) -> Dict[str, Any]:
    import fastlive.aio as aio
    from fastlive.testing import ManyPeers, close_all

    small_n = max(1, a.n // 100)
    big, small = ManyPeers(timeout=120), ManyPeers(timeout=120)
    socks_big = big.connect(a.n - small_n)
    socks_small = small.connect(small_n)
    small_fds = {s.fileno() for s in socks_small}
    woke: Dict[int, float] = {}
    res: Dict[str, Any] = {}

    async def handler(fd: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if a.mode == "fastlive":
            await aio.peer_gone(writer, within=a.within)
        else:
            await reader.read(1)
        woke[fd] = time.monotonic()

    async def main() -> None:
        tasks = []
        streams = []        # referenced until the end (see the docstring)
        for s in socks_big + socks_small:
            fd = s.fileno()
            r, w = await asyncio.open_connection(sock=s)
            streams.append(w)
            tasks.append(asyncio.create_task(handler(fd, r, w)))
        await asyncio.sleep(a.warmup)
        if a.mode == "fastlive":
            res["watched"] = len(aio.watcher_for())
        c0, w0 = bhb.cpu_now(), time.monotonic()
        await asyncio.sleep(a.seconds)
        c1, w1 = bhb.cpu_now(), time.monotonic()
        res.update(cpu=c1 - c0, window=w1 - w0)
        t_kill = time.monotonic()
        assert small.proc is not None
        os.kill(small.proc.pid, signal.SIGKILL)
        end = t_kill + 30
        while len(woke) < small_n and time.monotonic() < end:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.2)
        times = sorted(woke[fd] for fd in small_fds if fd in woke)
        res.update(killed=small_n, woke=len(times), wrong=len(set(woke) - small_fds),
                   spread_ms=1000 * (times[-1] - times[0]) if times else None,
                   first_ms=1000 * (times[0] - t_kill) if times else None,
                   last_ms=1000 * (times[-1] - t_kill) if times else None)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in streams:
            w.close()

    loop = new_loop(a.loop)
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
        close_all(socks_big + socks_small)
        big.close()
        small.close()
    return res


# --------------------------------------------------------------------------
# 2. heartbeat through the loop, and the asyncio ways

def role_hb_aio(a: argparse.Namespace) -> Dict[str, Any]:
    import fastlive.aio as aio
    socks = bhb.connect_all(a.host, a.port, a.n)
    res: Dict[str, Any] = {}

    async def main() -> None:
        hb = aio.LoopHeartbeat(tick=0.01)
        deaths: List[Any] = []
        for k, s in enumerate(socks):        # spread the deadlines over one interval
            hb.add(s, a.interval, 3).add_done_callback(deaths.append)
            if k % 100 == 99:
                await asyncio.sleep(a.interval * 100 / a.n)
        block = asyncio.create_task(blocker(a.block)) if a.block else None
        await asyncio.sleep(a.warmup)
        hb.engine.reset_stats()
        d0 = len(deaths)
        c0, w0 = bhb.cpu_now(), time.monotonic()
        await asyncio.sleep(a.seconds)
        c1, w1 = bhb.cpu_now(), time.monotonic()
        st = hb.engine.stats()
        why: Dict[str, int] = {}
        for f in deaths:
            if not f.cancelled():
                k = str(f.result().verdict)
                why[k] = why.get(k, 0) + 1
        res.update(cpu=c1 - c0, window=w1 - w0, pings=st.pings_sent, pongs=st.pongs_received,
                   late_max=st.late_max, late_mean=st.late_mean, deaths=len(deaths),
                   deaths_in_window=len(deaths) - d0, why=why, misses=st.misses,
                   graced=st.graced, skipped=st.pings_skipped)
        if block is not None:
            block.cancel()
            await asyncio.gather(block, return_exceptions=True)
        hb.close()

    loop = new_loop(a.loop)
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
        for s in socks:
            s.close()
    return res


def role_hb_tasks(a: argparse.Namespace) -> Dict[str, Any]:
    """asyncio the common way: streams and one pinging task per connection."""
    stats: Dict[str, Any] = {"pings": 0, "pongs": 0, "late_sum": 0.0, "late_n": 0,
                             "late_max": 0.0, "deaths": 0}
    res: Dict[str, Any] = {}

    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, phase: float) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + a.interval + phase
        try:
            while True:
                await asyncio.sleep(max(0.0, due - loop.time()))
                late = loop.time() - due
                writer.write(bhb.PING_SEQ1)
                await writer.drain()
                stats["pings"] += 1
                stats["late_sum"] += late
                stats["late_n"] += 1
                stats["late_max"] = max(stats["late_max"], late)
                data = await asyncio.wait_for(reader.read(64), timeout=3 * a.interval)
                if not data:
                    stats["deaths"] += 1
                    return
                stats["pongs"] += 1
                due += a.interval
        except asyncio.TimeoutError:
            stats["deaths"] += 1

    async def main() -> None:
        streams = [await asyncio.open_connection(a.host, a.port) for _ in range(a.n)]
        tasks = [asyncio.create_task(conn(r, w, k * a.interval / a.n))
                 for k, (r, w) in enumerate(streams)]
        assert len(tasks) == a.n
        block = asyncio.create_task(blocker(a.block)) if a.block else None
        await asyncio.sleep(a.warmup)
        for k in stats:
            stats[k] = 0 if isinstance(stats[k], int) else 0.0
        c0, w0 = bhb.cpu_now(), time.monotonic()
        await asyncio.sleep(a.seconds)
        c1, w1 = bhb.cpu_now(), time.monotonic()
        res.update(cpu=c1 - c0, window=w1 - w0, pings=stats["pings"], pongs=stats["pongs"],
                   late_max=stats["late_max"], deaths_in_window=stats["deaths"],
                   late_mean=stats["late_sum"] / stats["late_n"] if stats["late_n"] else 0.0)
        del block

    # No orderly shutdown (as bench_heartbeat: on 3.11 wait_for() can swallow
    # a cancel, gh-86296); report and leave.
    new_loop(a.loop).run_until_complete(main())
    print(json.dumps(res), flush=True)
    os._exit(0)


def role_hb_ws(a: argparse.Namespace) -> Dict[str, Any]:
    """websockets-style keepalive: the protocol resolves a pong future; a
    keepalive task per connection sleeps, pings and waits for the pong."""
    stats: Dict[str, Any] = {"pings": 0, "pongs": 0, "late_sum": 0.0, "late_n": 0,
                             "late_max": 0.0, "deaths": 0}
    res: Dict[str, Any] = {}

    class Proto(asyncio.Protocol):
        def __init__(self) -> None:
            self.waiter: Optional[asyncio.Future[None]] = None
            self.transport: Optional[asyncio.Transport] = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]

        def data_received(self, data: bytes) -> None:
            if data[:2] == bhb.PONG_HEAD and self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(None)

    async def keepalive(p: Proto, phase: float) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + a.interval + phase
        try:
            while True:
                await asyncio.sleep(max(0.0, due - loop.time()))
                late = loop.time() - due
                p.waiter = loop.create_future()
                assert p.transport is not None
                p.transport.write(bhb.PING_SEQ1)
                stats["pings"] += 1
                stats["late_sum"] += late
                stats["late_n"] += 1
                stats["late_max"] = max(stats["late_max"], late)
                await asyncio.wait_for(p.waiter, timeout=3 * a.interval)
                stats["pongs"] += 1
                due += a.interval
        except asyncio.TimeoutError:
            stats["deaths"] += 1

    async def main() -> None:
        loop = asyncio.get_running_loop()
        protos = [(await loop.create_connection(Proto, a.host, a.port))[1] for _ in range(a.n)]
        tasks = [asyncio.create_task(keepalive(p, k * a.interval / a.n))
                 for k, p in enumerate(protos)]
        assert len(tasks) == a.n
        block = asyncio.create_task(blocker(a.block)) if a.block else None
        await asyncio.sleep(a.warmup)
        for k in stats:
            stats[k] = 0 if isinstance(stats[k], int) else 0.0
        c0, w0 = bhb.cpu_now(), time.monotonic()
        await asyncio.sleep(a.seconds)
        c1, w1 = bhb.cpu_now(), time.monotonic()
        res.update(cpu=c1 - c0, window=w1 - w0, pings=stats["pings"], pongs=stats["pongs"],
                   late_max=stats["late_max"], deaths_in_window=stats["deaths"],
                   late_mean=stats["late_sum"] / stats["late_n"] if stats["late_n"] else 0.0)
        del block

    new_loop(a.loop).run_until_complete(main())
    print(json.dumps(res), flush=True)
    os._exit(0)


ROLES: Dict[str, Callable[[argparse.Namespace], Dict[str, Any]]] = {
    "gone": role_gone, "hb-aio": role_hb_aio, "hb-tasks": role_hb_tasks, "hb-ws": role_hb_ws}


# --------------------------------------------------------------------------
# Orchestration

def run_role(role: str, a: argparse.Namespace, extra: List[str], budget: float) -> Dict[str, Any]:
    if a.within is not None:
        extra = [*extra, "--within", str(a.within)]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--role", role, "--n", str(a.n),
           "--interval", str(a.interval), "--warmup", str(a.warmup), "--seconds", str(a.seconds),
           *extra]
    out = subprocess.run(cmd, capture_output=True, timeout=budget, check=False,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if out.returncode != 0:
        raise RuntimeError(f"{role} {extra} failed: {out.stderr.decode()[-3000:]}")
    return json.loads(out.stdout.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]


def hb_case(name: str, exe: Path, ip: str, a: argparse.Namespace) -> Dict[str, Any]:
    budget = a.warmup + a.seconds + 180
    if name.startswith("floor") or name == "engine":
        res = bhb.run_case(name, exe, ip, a)     # bench_heartbeat.py's: no event loop
    else:
        kind, loop = name.split("+")[0].rsplit("/", 1)
        role = {"LoopHeartbeat": "hb-aio", "task-per-conn": "hb-tasks", "ws-style": "hb-ws"}[kind]
        peer = bhb.Peer(exe, ip, 0, int(budget))
        try:
            extra = ["--loop", loop, "--host", ip, "--port", str(peer.port)]
            if name.endswith("+blocked"):
                extra += ["--block", str(a.interval)]
            res = run_role(role, a, extra, budget)
        finally:
            peer.close()
        res["cpu_pct"] = 100.0 * res["cpu"] / res["window"]
    res["name"] = name
    return res


def heartbeat_part(a: argparse.Namespace, loops: List[str]) -> List[Dict[str, Any]]:
    """Part 2.  The cases whose ratio is the point (the floors, the engine
    alone, LoopHeartbeat) run in ``--rounds`` interleaved rounds, the order
    rotating, and are reported as medians: the floor itself moves by about
    10% from one run to the next on a shared 2-core machine, and a ratio is
    taken within a round.  The asyncio alternatives run once."""
    repeated = ["floor", "floor-spread", "engine"] + [f"LoopHeartbeat/{lp}" for lp in loops]
    once = [f"LoopHeartbeat/{lp}+blocked" for lp in loops]
    for kind in ("task-per-conn", "ws-style"):
        for lp in loops:
            once += [f"{kind}/{lp}", f"{kind}/{lp}+blocked"]
    runs: Dict[str, List[Dict[str, Any]]] = {name: [] for name in repeated + once}
    k = 0
    with tempfile.TemporaryDirectory(prefix="fl-aio-bench-") as tmp:
        exe = bhb.build_c(Path(tmp))

        def one(name: str) -> Dict[str, Any]:
            nonlocal k
            k += 1              # a fresh loopback address per case: no TIME_WAIT clash
            ip = f"127.{os.getpid() % 200 + 1}.{k % 250 + 1}.{k // 250 + 2}"
            return hb_case(name, exe, ip, a)
        for r in range(a.rounds):
            for name in repeated[r % len(repeated):] + repeated[:r % len(repeated)]:
                runs[name].append(one(name))
        for name in once:
            runs[name].append(one(name))

    def floor_of(i: int, which: str) -> float:   # the floor of round i (one-off cases: the median)
        rs = runs[which]
        return float(rs[i]["cpu_pct"]) if i < len(rs) else statistics.median(
            float(r["cpu_pct"]) for r in rs)

    print(f"\n## heartbeat, interval {a.interval:g} s (schedules spread over the interval): "
          "CPU (% of a core), x the C floor (one burst per interval) and x the C floor with "
          f"the spread schedule, PING lateness, deaths; medians of {a.rounds} interleaved "
          "round(s) where a case has several (ratios taken within each round, min..max after)")
    table: List[Dict[str, Any]] = []
    for name, rs in runs.items():
        cpu = statistics.median(float(r["cpu_pct"]) for r in rs)
        x_floor = [float(r["cpu_pct"]) / floor_of(i, "floor") for i, r in enumerate(rs)]
        x_spread = [float(r["cpu_pct"]) / floor_of(i, "floor-spread") for i, r in enumerate(rs)]
        late_max = max(float(r["late_max"]) for r in rs)
        late_mean = statistics.median(float(r["late_mean"]) for r in rs)
        pings = statistics.median(float(r["pings"]) / float(r["window"]) for r in rs)
        deaths = sum(int(r.get("deaths_in_window", r.get("deaths", 0))) for r in rs)
        spread_txt = (f" ({min(x_floor):.2f}..{max(x_floor):.2f})" if len(rs) > 1 else "")
        print(f"  {name:30s} cpu {cpu:7.2f}%  {statistics.median(x_floor):6.2f}x{spread_txt:14s} "
              f"{statistics.median(x_spread):6.2f}x  "
              f"late max {1000 * late_max:7.1f} ms mean {1000 * late_mean:6.2f} ms  "
              f"pings/s {pings:7.0f}  deaths {deaths}")
        table.append({"name": name, "rounds": rs, "cpu_pct": cpu,
                      "x_floor": statistics.median(x_floor),
                      "x_floor_spread": statistics.median(x_spread),
                      "late_max": late_max, "deaths": deaths})
    return table


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--quick", action="store_true",
                    help="200 connections, interval 0.5 s, 0.6 s windows (a smoke run)")
    ap.add_argument("--n", type=int, default=None, help="connections (default 10000)")
    ap.add_argument("--interval", type=float, default=None,
                    help="heartbeat interval, seconds (default 1; --quick 0.5)")
    ap.add_argument("--seconds", type=float, default=None, help="measured window")
    ap.add_argument("--warmup", type=float, default=None)
    ap.add_argument("--parts", default="gone,hb", help="gone, hb or both (default)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved rounds of the heartbeat ratio cases (default 3; --quick 1)")
    ap.add_argument("--json", action="store_true", help="also print the results as JSON")
    ap.add_argument("--within", type=float, default=None,
                    help="peer_gone's bound in part 1 (default: none, FIN/RST/errors only). "
                         "Beware: thousands of connections armed within ~0.25 s probe in the "
                         "same timer-wheel slot; over loopback/veth more than "
                         "net.core.netdev_max_backlog (1000) probes at once are dropped")
    ap.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    ap.add_argument("--loop", choices=LOOPS, default="asyncio", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=("plain", "fastlive"), default="fastlive",
                    help=argparse.SUPPRESS)
    ap.add_argument("--block", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    bhb.raise_nofile()
    bhb.fill_defaults(a)
    if a.rounds is None:
        a.rounds = 1 if a.quick else 3
    if not 1 <= a.rounds <= 50:
        ap.error(f"--rounds must be 1..50, got {a.rounds}")
    if a.role:
        print(json.dumps(ROLES[a.role](a)), flush=True)
        return 0

    loops = [lp for lp in LOOPS if lp == "asyncio" or have_uvloop()]
    parts = {p.strip() for p in a.parts.split(",")}
    print(f"# {a.n} connections, window {a.seconds:g} s (warmup {a.warmup:g} s), "
          f"{os.cpu_count()} CPUs, loops: {', '.join(loops)}"
          + ("" if "uvloop" in loops else " (uvloop not installed)")
          + f", load {bhb.loadavg()}", flush=True)
    out: Dict[str, Any] = {"n": a.n}
    if "gone" in parts:
        gone: Dict[str, Dict[str, Any]] = {}
        for loop in loops:
            for mode in ("plain", "fastlive"):
                gone[f"{mode}/{loop}"] = run_role("gone", a, ["--loop", loop, "--mode", mode],
                                                  a.warmup + a.seconds + 300)
        out["gone"] = gone
        print("\n## peer_gone: idle loop CPU (% of a core) and a SIGKILL of 1% of the peers")
        print(f"  {'':22s}" + "".join(f"{lp:>14s}" for lp in loops))

        def row(label: str, f: Callable[[str], str]) -> None:
            print(f"  {label:22s}" + "".join(f"{f(lp):>14s}" for lp in loops))

        def pct(k: str) -> float:
            r = gone[k]
            return 100.0 * float(r["cpu"]) / float(r["window"])

        row("cpu plain", lambda lp: f"{pct('plain/' + lp):.3f}%")
        row("cpu fastlive", lambda lp: f"{pct('fastlive/' + lp):.3f}%")
        row("delta (target <1%)", lambda lp: f"{pct('fastlive/' + lp) - pct('plain/' + lp):+.3f}%")
        row("watched", lambda lp: str(gone["fastlive/" + lp].get("watched")))
        for mode, who in (("fastlive", "peer_gone"), ("plain", "reader.read")):
            rs = {lp: gone[f"{mode}/{lp}"] for lp in loops}
            print(f"  {who + ' woke':22s}"
                  + "".join(f"{str(rs[lp]['woke']) + '/' + str(rs[lp]['killed']):>14s}"
                            for lp in loops))
            for key, label in (("spread_ms", "spread ms"), ("last_ms", "last-kill ms")):
                print(f"  {who + ' ' + label:22s}"
                      + "".join(f"{rs[lp][key]:>14.2f}" for lp in loops))
    if "hb" in parts:
        out["hb"] = heartbeat_part(a, loops)
    print(f"# load after: {bhb.loadavg()}")
    if a.json:
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
