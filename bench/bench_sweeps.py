#!/usr/bin/env python3
"""Side-by-side cost of fastlive's batch sweeps and Monitor, per fd per sweep.

For each N (default 1,000 / 5,000 / 15,000 loopback connections; the peer
ends live in a helper process), 1% of the peers close with FIN and 1% with
RST before measuring.  Then, in interleaved rounds (every contender once per
round, the order rotating), it times:

  poll      fastlive Batch.sweep_poll | plain C poll() loop | Python select.poll
  states    Batch.sweep_states        | C getsockopt(TCP_INFO, 1 byte) loop
            | Python getsockopt loop reading buf[0] | psutil net_connections
  tcp_info  Batch.sweep_tcp_info      | C getsockopt(TCP_INFO) loop into an array
            | Python getsockopt + struct.unpack into one namedtuple per conn
  peek      Batch.sweep_peek          | C recv(MSG_PEEK) loop | Python recv loop
  epoll     Monitor.wait(0), N live, no events | C epoll_wait(0) | select.epoll.poll(0)

and prints median and min ns per fd per sweep (per call for epoll), with
ratios against the plain C loop and against pure Python.  Then: Monitor.wait
with k deaths, single-socket tcp_info(), and memory over 1,000 sweeps.

The plain C loops (bench/plain_loops.c) are compiled here with gcc and
called once per sweep through cffi's ABI mode.  Not a test: nothing is
asserted; ``--quick`` (small N, few rounds) proves the script runs.
"""
from __future__ import annotations

import argparse
import collections
import gc
import os
import platform
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
from typing import Callable, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import cffi  # noqa: E402

import fastlive  # noqa: E402
from fastlive import Batch, Monitor, tcp_info  # noqa: E402
from fastlive._lib import ffi as fl_ffi  # noqa: E402
from fastlive.testing import ManyPeers, close_all  # noqa: E402

try:
    import psutil
except ImportError:  # pragma: no cover - bench extra not installed
    psutil = None

TCP_INFO = getattr(socket, "TCP_INFO", 11)
POLLRDHUP = getattr(select, "POLLRDHUP", 0x2000)
EPOLLRDHUP = getattr(select, "EPOLLRDHUP", 0x2000)
INFO_SIZE = fl_ffi.sizeof("struct fl_tcp_info")
PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT


# --- the plain C baseline -----------------------------------------------------

def build_plain() -> Plain:
    out = os.path.join(tempfile.mkdtemp(prefix="fl-bench-"), "plain_loops.so")
    subprocess.run(["gcc", "-O2", "-Wall", "-shared", "-fPIC", "-o", out,
                    os.path.join(HERE, "plain_loops.c")], check=True)
    ffi = cffi.FFI()
    ffi.cdef("""
        int pl_setup(const int *fds, int n, int info_size);
        int pl_poll(void); int pl_states(void); int pl_tcp_info(void);
        int pl_peek(void); int pl_epoll_wait(int epfd);
    """)
    return Plain(ffi, ffi.dlopen(out))


class Plain:
    """The compiled baseline: its cffi FFI, library and fd array."""

    def __init__(self, ffi: cffi.FFI, lib: object) -> None:
        self.ffi, self.lib = ffi, lib
        self.fds = None

    def setup(self, fds: List[int]) -> None:
        self.fds = self.ffi.new("int[]", fds)
        rc = self.lib.pl_setup(self.fds, len(fds), INFO_SIZE)
        if rc < 0:
            raise OSError(-rc, os.strerror(-rc))


# --- pure Python equivalents --------------------------------------------------

def _record_format() -> Tuple[struct.Struct, type]:
    """A struct.Struct for the whole struct tcp_info (bit-field storage
    units as plain ints) and a namedtuple type for its fields."""
    fmt, names, at = "=", [], 0
    codes = {1: "B", 2: "H", 4: "I", 8: "Q"}
    for cname, f in fl_ffi.typeof("struct fl_tcp_info").fields:
        if f.offset < at:
            continue                      # another bit-field of the same unit
        if f.offset > at:
            fmt += f"{f.offset - at}x"
        size = fl_ffi.sizeof(f.type)
        fmt += codes[size]
        names.append(cname[len("tcpi_"):])
        at = f.offset + size
    if at < INFO_SIZE:
        fmt += f"{INFO_SIZE - at}x"
    return struct.Struct(fmt), collections.namedtuple("PyTcpInfo", names)


REC, PyTcpInfo = _record_format()


class PythonSweeps:
    """The best pure-Python equivalent of each sweep."""

    def __init__(self, socks: List[socket.socket]) -> None:
        self.socks = socks
        self.gso = [s.getsockopt for s in socks]
        self.recv = [s.recv for s in socks]
        self.by_fd = {s.fileno(): s for s in socks}
        self.poller = select.poll()
        for s in socks:
            self.poller.register(s, select.POLLIN | POLLRDHUP)

    def poll(self) -> int:
        dead = 0
        for fd, ev in self.poller.poll(0):
            if ev & select.POLLERR:
                self.by_fd[fd].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if ev & (select.POLLERR | select.POLLHUP | POLLRDHUP | select.POLLNVAL):
                dead += 1
        return dead

    def states(self) -> int:
        dead = []
        for i, g in enumerate(self.gso):
            if g(6, TCP_INFO, 1)[0] != 1:
                dead.append(i)
        return len(dead)

    def tcp_info(self) -> int:
        unpack, make, size = REC.unpack, PyTcpInfo._make, INFO_SIZE
        recs = []
        for g in self.gso:
            buf = g(6, TCP_INFO, size)
            if len(buf) < size:
                buf = buf.ljust(size, b"\0")
            recs.append(make(unpack(buf)))
        self.recs = recs
        return sum(1 for r in recs if r.state != 1)

    def peek(self) -> int:
        dead = []
        for i, r in enumerate(self.recv):
            try:
                if r(1, PEEK) == b"":
                    dead.append(i)
            except BlockingIOError:
                pass
            except OSError:
                dead.append(i)
        return len(dead)


# --- timing ---------------------------------------------------------------------

def sample(fn: Callable[[], object], reps: int) -> int:
    t = time.perf_counter_ns()
    for _ in range(reps):
        fn()
    return time.perf_counter_ns() - t


def calibrate(fn: Callable[[], object], target_ns: int) -> int:
    t = sample(fn, 1)
    return max(1, min(10000, int(target_ns / max(t, 1))))


def measure(contenders: Dict[str, Callable[[], object]], rounds: int, per: int,
            target_ns: int) -> Dict[str, List[float]]:
    """Interleaved rounds: every contender once per round, rotating order.
    Returns ns per unit (``per`` units per call) for each round."""
    names = list(contenders)
    for fn in contenders.values():       # warm up
        fn()
    reps = {k: calibrate(fn, target_ns) for k, fn in contenders.items()}
    out: Dict[str, List[float]] = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            contenders[k]()              # untimed: caches warm for this one
            ns = sample(contenders[k], reps[k])
            out[k].append(ns / (reps[k] * per))
    return out


# --- one N ----------------------------------------------------------------------

def wait_dead(b: Batch, want: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = b.sweep_poll(0)
        if n >= want or time.monotonic() > deadline:
            return n
        time.sleep(0.01)


def run_n(n: int, rounds: int, plain: Plain, target_ns: int,
          use_psutil: bool) -> Tuple[Dict[str, Dict[str, List[float]]], dict]:
    extra: dict = {}
    with ManyPeers(timeout=60) as ph:
        socks = ph.connect(n)
        try:
            ph.fin(socks[10::100])
            ph.rst(socks[55::100])
            ndead = len(socks[10::100]) + len(socks[55::100])
            b = Batch(socks)
            extra["dead"] = wait_dead(b, ndead)
            extra["expected_dead"] = ndead
            fds = [s.fileno() for s in socks]
            plain.setup(fds)
            pl = plain.lib
            py = PythonSweeps(socks)
            results: Dict[str, Dict[str, List[float]]] = {}

            results["poll"] = measure({
                "fastlive": lambda: b.sweep_poll(0),
                "plain C": pl.pl_poll,
                "python": py.poll}, rounds, n, target_ns)
            states = {
                "fastlive": b.sweep_states,
                "plain C": pl.pl_states,
                "python": py.states}
            results["states"] = measure(states, rounds, n, target_ns)
            extra["ns_sockets"] = namespace_tcp_sockets()
            if use_psutil and psutil is not None:
                # Apart, paired with the Python loop: psutil reads /proc
                # (every fd link, all of /proc/net/tcp*) and would disturb
                # the caches of whatever is timed after it.
                proc = psutil.Process()
                conns = getattr(proc, "net_connections", None) or proc.connections
                results["psutil"] = measure({
                    "psutil": lambda: conns(kind="tcp"),
                    "python": py.states}, max(3, rounds // 4), n, target_ns)
            results["tcp_info"] = measure({
                "fastlive": b.sweep_tcp_info,
                "plain C": pl.pl_tcp_info,
                "python": py.tcp_info}, rounds, n, target_ns)
            results["peek"] = measure({
                "fastlive": b.sweep_peek,
                "plain C": pl.pl_peek,
                "python": py.peek}, rounds, n, target_ns)

            # Monitor.wait with N live connections and no events (per call).
            live = [s for i, s in enumerate(socks) if b.statuses[i] == 0]
            with Monitor() as mon:
                for s in live:
                    mon.add(s)
                ep = select.epoll()
                cep = select.epoll()
                mask = (select.EPOLLERR | select.EPOLLHUP | EPOLLRDHUP
                        | select.EPOLLONESHOT)
                for s in live:
                    ep.register(s, mask)
                    cep.register(s, mask)
                cfd = cep.fileno()
                try:
                    results["epoll"] = measure({
                        "fastlive": lambda: mon.wait(0),
                        "plain C": lambda: pl.pl_epoll_wait(cfd),
                        "python": lambda: ep.poll(0)}, rounds, 1, target_ns)
                    extra["wait_k"] = wait_with_deaths(ph, mon, n, rounds)
                    extra["drain_k"] = drain_deaths(ph, live)
                finally:
                    ep.close()
                    cep.close()
            b.close()
        finally:
            close_all(socks)
    return results, extra


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def wait_with_deaths(ph: ManyPeers, mon: Monitor, n: int,
                     rounds: int) -> Dict[int, Tuple[float, float]]:
    """One Monitor.wait(0) collecting k deaths among N live: (median us per
    call, median ns per death) for a few k.  Each sample needs k fresh
    deaths, so it is a single call, not a loop; just before it one death
    goes through a second monitor so the code path is warm (the first call
    after an idle spell costs several times more on a shared VM: caches)."""
    out = {}
    with Monitor() as warm:
        for k in (1, 10, 100):
            if k > n // 10:
                continue
            per_call = []
            for _ in range(max(3, rounds // 3)):
                victims = ph.connect(k)
                w = ph.connect(1)
                try:
                    for s in victims:
                        mon.add(s)
                    ph.fin(victims + w)
                    ready = select.poll()               # fd may be >= 1024
                    ready.register(mon.fileno(), select.POLLIN)
                    if ready.poll(5000):                # then let all k queue
                        time.sleep(0.02)
                    spin(0.002)
                    warm.add(w[0])
                    warm.wait(0.5)
                    t = time.perf_counter_ns()
                    got = mon.wait(0)
                    dt = time.perf_counter_ns() - t
                    got += mon.wait(0.2) if len(got) < k else []
                    if len(got) == k:
                        per_call.append(dt)
                finally:
                    close_all(victims + w)
            if per_call:
                med = statistics.median(per_call)
                out[k] = (med / 1000, med / k)
    return out


def drain_deaths(ph: ManyPeers, live: List[socket.socket]) -> Dict[int, float]:
    """Steady state: a Monitor(max_events=k) watching the N live sockets
    and a backlog of 20 x k dead ones; each wait(0) returns k deaths.
    Median us per call, for k = 1 and 10."""
    out = {}
    for k in (1, 10):
        with Monitor(max_events=k) as m:
            for s in live:
                m.add(s)
            victims = ph.connect(20 * k)
            try:
                for s in victims:
                    m.add(s)
                ph.fin(victims)
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    ready = select.poll()
                    ready.register(m.fileno(), select.POLLIN)
                    if ready.poll(500):
                        break
                time.sleep(0.05)
                times = []
                for _ in range(20):
                    t = time.perf_counter_ns()
                    got = m.wait(0)
                    dt = time.perf_counter_ns() - t
                    if len(got) == k:
                        times.append(dt)
                if times:
                    out[k] = statistics.median(times) / 1000
            finally:
                close_all(victims)
    return out


# --- other measurements ----------------------------------------------------------

def single_tcp_info(rounds: int) -> Dict[str, Tuple[float, float]]:
    lst = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(lst.getsockname())
    p, _ = lst.accept()
    fd = c.fileno()
    try:
        res = measure({
            "fastlive.tcp_info(sock)": lambda: tcp_info(c),
            "fastlive.tcp_info(fd)": lambda: tcp_info(fd),
            "python getsockopt+unpack": lambda: PyTcpInfo._make(
                REC.unpack(c.getsockopt(6, TCP_INFO, INFO_SIZE))),
            "python getsockopt (bytes)": lambda: c.getsockopt(6, TCP_INFO, INFO_SIZE),
        }, rounds, 1, 2_000_000)
    finally:
        for s in (c, p, lst):
            s.close()
    return {k: (statistics.median(v), min(v)) for k, v in res.items()}


def namespace_tcp_sockets() -> int:
    """TCP sockets in this network namespace (/proc/net/tcp, tcp6): what
    psutil's net_connections parses whatever N is."""
    n = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                n += sum(1 for _ in f) - 1
        except OSError:
            pass
    return n


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_over_sweeps(n: int, sweeps: int) -> dict:
    with ManyPeers(timeout=60) as ph:
        socks = ph.connect(n)
        try:
            ph.fin(socks[10::100])
            b = Batch(socks)
            for f in (lambda: b.sweep_poll(0), b.sweep_states, b.sweep_tcp_info,
                      b.sweep_peek):
                f()
            gc.collect()
            tracemalloc.start()
            r0, t0 = rss(), tracemalloc.get_traced_memory()[0]
            for _ in range(sweeps):
                b.sweep_poll(0)
                b.sweep_states()
                b.sweep_tcp_info()
                b.sweep_peek()
            gc.collect()
            t1 = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
            return {"n": n, "sweeps": sweeps, "rss_growth": rss() - r0,
                    "traced_growth": t1 - t0}
        finally:
            close_all(socks)


def machine() -> Dict[str, str]:
    fields = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            key, _, val = line.partition(":")
            fields[key.strip()] = val.strip()
    except OSError:
        pass
    model = fields.get("Model name", "?")
    if "CPU family" in fields:
        model += f" (family {fields['CPU family']} model {fields.get('Model', '?')})"
    if "Hypervisor vendor" in fields:
        model += f", {fields['Hypervisor vendor']} guest"
    return {"cpu": model, "cores": str(os.cpu_count()),
            "kernel": platform.release(), "python": platform.python_version(),
            "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "fastlive": fastlive.__version__,
            "psutil": psutil.__version__ if psutil else "not installed"}


# --- report ---------------------------------------------------------------------

def paired(cont: Dict[str, List[float]], a: str, b: str) -> float:
    """Median over rounds of a/b, each round's two samples taken side by
    side: robust against load that drifts between rounds."""
    return statistics.median(x / y for x, y in zip(cont[a], cont[b]))


def table(all_res: Dict[int, Dict[str, Dict[str, List[float]]]]) -> str:
    lines = ["| sweep | N | contender | median ns/fd | min ns/fd | x plain C | x python |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for n, res in all_res.items():
        for kind, cont in res.items():
            if kind == "psutil":
                continue
            unit = " (ns/call)" if kind == "epoll" else ""
            for k, v in cont.items():
                lines.append(f"| {kind} | {n} | {k}{unit} | {statistics.median(v):.1f} "
                             f"| {min(v):.1f} | {paired(cont, k, 'plain C'):.2f} "
                             f"| {paired(cont, k, 'python'):.2f} |")
            if kind == "states" and "psutil" in res:
                v = res["psutil"]["psutil"]
                xc = statistics.median(v) / statistics.median(cont["plain C"])
                lines.append(f"| states | {n} | psutil net_connections | "
                             f"{statistics.median(v):.1f} | {min(v):.1f} | {xc:.2f} "
                             f"| {paired(res['psutil'], 'psutil', 'python'):.2f} |")
    return "\n".join(lines)


def targets(all_res: Dict[int, Dict[str, Dict[str, List[float]]]],
            extras: Optional[Dict[int, dict]] = None) -> str:
    """Each target with its paired-median ratio (and the ratio of minima)."""
    out = []

    def line(n: int, what: str, r: float, rmin: float, ok: bool, goal: str) -> None:
        out.append(f"N={n} {what} = {r:.3f} (of minima {rmin:.3f}) "
                   f"{'ok' if ok else 'MISSED'} {goal}")

    for n, res in all_res.items():
        mins = {kind: {k: min(v) for k, v in cont.items()} for kind, cont in res.items()}
        for kind in ("poll", "states", "tcp_info", "peek"):
            r = paired(res[kind], "fastlive", "plain C")
            line(n, f"{kind}: fastlive/plain C", r,
                 mins[kind]["fastlive"] / mins[kind]["plain C"], r <= 1.15, "<= 1.15")
        for kind, goal, lim in (("states", "> 1", 1.0), ("tcp_info", ">= 3", 3.0),
                                ("peek", ">= 2", 2.0)):
            r = paired(res[kind], "python", "fastlive")
            line(n, f"{kind}: python/fastlive", r,
                 mins[kind]["python"] / mins[kind]["fastlive"],
                 r > lim if goal == "> 1" else r >= lim, goal)
        w = statistics.median(res["epoll"]["fastlive"]) / 1000
        r = paired(res["epoll"], "fastlive", "python")
        line(n, "Monitor.wait(0), no events: fastlive/select.epoll.poll(0)", r,
             mins["epoll"]["fastlive"] / mins["epoll"]["python"], r <= 1.3, "<= 1.3")
        out.append(f"N={n} Monitor.wait(0), no events: {w:.2f} us per call (min "
                   f"{min(res['epoll']['fastlive']) / 1000:.2f})")
        ex = (extras or {}).get(n, {})
        for what, val in (("fresh", ex.get("wait_k", {}).get(10, (None, None))[1]),
                          ("backlog", (ex.get("drain_k", {}).get(10) or 0) * 100 or None)):
            if val is not None:
                out.append(f"N={n} Monitor.wait(0) collecting k=10 ({what}): {val / 1000:.2f} us "
                           f"per death {'ok' if val < 3000 else 'MISSED'} < 3 us")
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="N=200, 3 rounds: proves the script works, numbers mean little")
    ap.add_argument("--n", default=None, help="comma-separated N (default 1000,5000,15000)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 21)")
    ap.add_argument("--no-psutil", action="store_true")
    args = ap.parse_args(argv)
    ns = [200] if args.quick else [1000, 5000, 15000]
    if args.n:
        ns = [int(x) for x in args.n.split(",")]
    rounds = args.rounds or (3 if args.quick else 21)
    target_ns = 300_000 if args.quick else 3_000_000

    info = machine()
    print("# fastlive batch/monitor benchmark")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(f"N = {ns}, {rounds} interleaved rounds; 1% FIN + 1% RST peers; "
          "ratios are medians of per-round paired ratios")
    sys.stdout.flush()
    plain = build_plain()
    all_res = {}
    extras = {}
    for n in ns:
        t = time.monotonic()
        all_res[n], extras[n] = run_n(n, rounds, plain, target_ns,
                                      not args.no_psutil)
        print(f"N={n}: dead seen {extras[n]['dead']} of {extras[n]['expected_dead']}"
              f" expected; {extras[n]['ns_sockets']} TCP sockets in the namespace"
              f" (psutil parses them all); {time.monotonic() - t:.1f} s", flush=True)
    print()
    print(table(all_res))
    print()
    print("Monitor.wait(0) collecting k fresh deaths among N live (one call each, median):")
    for n in ns:
        for k, (us, per) in extras[n]["wait_k"].items():
            print(f"  N={n} k={k}: {us:.2f} us per call, {per:.0f} ns per death")
    print("Monitor.wait(0) draining a backlog, k deaths per call (steady state, median):")
    for n in ns:
        for k, us in extras[n]["drain_k"].items():
            print(f"  N={n} k={k}: {us:.2f} us per call, {us * 1000 / k:.0f} ns per death")
    print()
    print("single socket (ns per call, median / min):")
    for k, (med, mn) in single_tcp_info(rounds).items():
        print(f"  {k}: {med:.0f} / {mn:.0f}")
    print()
    mem = memory_over_sweeps(min(ns), 100 if args.quick else 1000)
    print(f"memory over {mem['sweeps']} x 4 sweeps at N={mem['n']}: RSS "
          f"{mem['rss_growth'] / 1024:+.0f} KiB, Python heap "
          f"{mem['traced_growth'] / 1024:+.1f} KiB")
    print()
    print("targets:")
    print(targets(all_res, extras))
    print()
    print(f"load after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
