#!/usr/bin/env python3
"""What one metrics scrape costs, side by side (not a test: nothing asserted).

Sets up ``--sockets`` TCP sockets on the machine (default 30,000: half as
loopback connections from this process, their peers in a helper process,
RLIMIT_NOFILE being 20,000 per process), every connection watched by one
Monitor with a few real deaths.  Then, in interleaved rounds, it times:

  process scrape   prometheus_client exposition of the process collector
                   (every engine's counters; nothing per connection)
  machine scrape   exposition of the census collector: kernel dump + C tally
  kernel dump      the sock_diag dump alone (fl_census_dump with tcp_info)
  dump, no tcp_info  the same without INET_DIAG_INFO (``--no-tcp-info``)
  C tally          fl_census_tally over that dump alone
  python tally     the same figures from a Python loop over CensusEntry views
  /proc/net/tcp    state counts by parsing /proc/net/tcp and tcp6 in Python
                   (what node_exporter's tcpstat collector read before netlink)

and prints median / min milliseconds and ratios.  ``--quick`` proves it runs.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from typing import Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import fastlive  # noqa: E402
from fastlive._lib import ffi, lib  # noqa: E402
from fastlive.census import Timer  # noqa: E402
from fastlive.metrics import MachineSampler  # noqa: E402
from fastlive.testing import ManyPeers, close_all  # noqa: E402

try:
    from prometheus_client import CollectorRegistry, generate_latest

    from fastlive.metrics.prometheus import FastliveCollector
except ImportError:  # pragma: no cover
    sys.exit("bench_metrics needs prometheus_client (pip install 'fastlive[prometheus]')")


def python_tally(c: fastlive.Census) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for e in c:
        st = int(e.state)
        out[str(st)] = out.get(str(st), 0) + 1
        if e.suspect:
            out["suspect"] = out.get("suspect", 0) + 1
        if e.timer == Timer.RETRANSMIT and e.retrans:
            out["retrans"] = out.get("retrans", 0) + 1
        if st == 8:
            out[f"cw{e.local[1]}"] = out.get(f"cw{e.local[1]}", 0) + 1
    return out


def proc_net_tcp() -> Dict[str, int]:
    out: Dict[str, int] = {}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path, "rb") as f:
                next(f)
                for line in f:
                    st = line.split(None, 4)[3]
                    out[st] = out.get(st, 0) + 1
        except FileNotFoundError:
            pass
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sockets", type=int, default=30_000,
                    help="TCP sockets to set up on the machine (2 per connection)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="1,000 sockets, 3 rounds")
    args = ap.parse_args()
    if args.quick:
        args.sockets, args.rounds = 1000, 3
    conns = max(args.sockets // 2, 10)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = conns + 200
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    with ManyPeers(timeout=120) as peers:
        socks = []
        while len(socks) < conns:
            socks += peers.connect(min(2000, conns - len(socks)))
        mon = fastlive.Monitor()
        for s in socks:
            mon.add(s)
        peers.rst(socks[:10])
        end = time.monotonic() + 10
        dead = 0
        while dead < 10 and time.monotonic() < end:
            dead += len(mon.wait(0.2))
        proc_reg, mach_reg = CollectorRegistry(), CollectorRegistry()
        proc_reg.register(FastliveCollector(process=True))
        mcoll = FastliveCollector(process=False, machine=True)
        mach_reg.register(mcoll)
        sampler = MachineSampler()
        c = sampler._c
        t = ffi.new("struct fl_tally *")
        scratch = ffi.new("uint32_t[65536]")
        ports, counts = ffi.new("uint16_t[10]"), ffi.new("uint32_t[10]")
        census_obj = fastlive.census()
        n_sockets = len(census_obj)

        def dump() -> None:
            lib.fl_census_dump(c, 3, 0, -1, 1)

        def dump_noinfo() -> None:
            lib.fl_census_dump(c, 3, 0, -1, 0)

        def tally() -> None:
            lib.fl_census_tally(c, t, scratch, ports, counts, 10)

        cases: Dict[str, Callable[[], object]] = {
            "process scrape": lambda: generate_latest(proc_reg),
            "machine scrape": lambda: generate_latest(mach_reg),
            "kernel dump": dump,
            "dump, no tcp_info": dump_noinfo,
            "C tally": tally,
            "python tally": lambda: python_tally(census_obj),
            "/proc/net/tcp": proc_net_tcp,
        }
        dump_noinfo()
        dump()
        times: Dict[str, List[float]] = {k: [] for k in cases}
        names = list(cases)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for k in order:
                t0 = time.perf_counter()
                cases[k]()
                times[k].append((time.perf_counter() - t0) * 1e3)
        print(f"bench_metrics: {n_sockets} TCP sockets on the machine, {len(mon)} watched by "
              f"one Monitor ({dead} deaths), {args.rounds} interleaved rounds, "
              f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print("| what | median ms | min ms | us/socket (median) |")
        print("|---|---|---|---|")
        for k in names:
            med, mn = statistics.median(times[k]), min(times[k])
            print(f"| {k} | {med:.3f} | {mn:.3f} | {med * 1e3 / max(n_sockets, 1):.3f} |")
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"ratios: C tally vs python tally x{med['python tally'] / med['C tally']:.0f}; "
              f"machine scrape vs /proc/net/tcp parse x{med['/proc/net/tcp'] / med['machine scrape']:.1f};"
              f" machine scrape = kernel dump {med['kernel dump']:.2f} + tally {med['C tally']:.3f}"
              f" + exposition {max(med['machine scrape'] - med['kernel dump'] - med['C tally'], 0):.2f} ms")
        print(f"process scrape at {len(mon)} watched connections: {med['process scrape']:.3f} ms "
              f"(budget 5 ms: {'met' if med['process scrape'] < 5 else 'NOT met'}); machine scrape at "
              f"{n_sockets} sockets: {med['machine scrape']:.2f} ms "
              f"(budget 5 ms: {'met' if med['machine scrape'] < 5 else 'NOT met'})")
        mcoll.close()
        sampler.close()
        mon.close()
        close_all(socks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
