#!/usr/bin/env python3
"""Side-by-side cost of a machine-wide TCP census, one run.

At N = 1,000 / 5,000 / 15,000 loopback connections (2N sockets, held by
helper processes), in interleaved rounds (the order rotating), with the
same state filter (ESTABLISHED) on every side:

  fastlive      fastlive.census(states="established")  (tcp_info included)
  plain C       bench/plain_census.c: the same sock_diag dump in the
                plainest C loop (one compat request for both families),
                copying each message and its tcp_info into an array
  plain C v2    the same with one v2 request per family (two table walks)
  ss            `ss -tin state established`, the process end to end
  psutil        psutil.net_connections("tcp"), ESTABLISHED kept in Python
  pyroute2      DiagSocket.get_sock_stats (AF_INET + AF_INET6, INET_DIAG_INFO)

then the whole machine with full tcp_info (fastlive.census(), every
state) and a kernel-filtered dump (port= of a listener with 10
connections) against `ss` with the same filter, whose cost should follow
the matches, not N.  Prints medians (min) in ms and the ratios.

Not a test: nothing is asserted; ``--quick`` (small N, few rounds) proves
the script runs.  Loopback only; helpers die with this process.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import cffi  # noqa: E402

import fastlive  # noqa: E402

try:
    import psutil
except ImportError:  # pragma: no cover - bench extra not installed
    psutil = None
try:
    from pyroute2 import DiagSocket
except ImportError:  # pragma: no cover - bench extra not installed
    DiagSocket = None

EST = 1 << 1                     # TCPF_ESTABLISHED
INET_DIAG_INFO = 2
PER_HOLDER = 4000                # pairs per helper process (8,000 fds)


# --- helper processes holding the connections -----------------------------------

def _hold(k: int) -> None:  # pragma: no cover - runs in the child
    """Child: k loopback pairs (both ends here) on a fresh listener; prints
    its port, then waits for end of file on stdin."""
    import ctypes
    import threading
    try:
        ctypes.CDLL(None).prctl(1, 9, 0, 0, 0)            # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass
    threading.Timer(1800, os._exit, (2,)).start()          # whatever happens
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(4096)
    addr = lst.getsockname()
    held = []
    deadline = time.monotonic() + 120
    for _ in range(k):
        if time.monotonic() > deadline:
            break
        c = socket.create_connection(addr, timeout=10)
        s, _ = lst.accept()
        held += (c, s)
    print(addr[1], len(held) // 2, flush=True)
    sys.stdin.read()


class Holders:
    def __init__(self) -> None:
        self.procs: List[subprocess.Popen[str]] = []
        self.ports: List[int] = []
        self.n = 0

    def add(self, k: int) -> int:
        """k more connections; returns the port of the last helper."""
        port = 0
        while k > 0:
            m = min(k, PER_HOLDER)
            p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--hold", str(m)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            self.procs.append(p)
            assert p.stdout is not None
            line = p.stdout.readline().split()
            if len(line) != 2 or int(line[1]) != m:
                raise RuntimeError(f"helper made {line} instead of {m} connections")
            port = int(line[0])
            self.ports.append(port)
            self.n += m
            k -= m
        return port

    def close(self) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait(30)


# --- contenders -------------------------------------------------------------------

def build_plain() -> Tuple[cffi.FFI, object]:
    out = os.path.join(tempfile.mkdtemp(prefix="fl-bench-"), "plain_census.so")
    subprocess.run(["gcc", "-O2", "-Wall", "-shared", "-fPIC", "-o", out,
                    os.path.join(HERE, "plain_census.c")], check=True)
    ffi = cffi.FFI()
    ffi.cdef("int pc_dump(uint32_t states, int want_info); int pc_dump_v2(uint32_t, int);")
    return ffi, ffi.dlopen(out)


def run_ss(*filt: str) -> int:
    out = subprocess.run(["ss", "-tinH", *filt], stdout=subprocess.PIPE, check=True).stdout
    return out.count(b"\n")


def run_psutil() -> int:
    return sum(1 for c in psutil.net_connections("tcp") if c.status == "ESTABLISHED")


def run_pyroute2() -> int:
    n = 0
    with DiagSocket() as ds:
        ds.bind()
        for fam in (socket.AF_INET, socket.AF_INET6):
            n += len(list(ds.get_sock_stats(family=fam, states=EST,
                                            extensions=1 << (INET_DIAG_INFO - 1))))
    return n


def timed(fn: Callable[[], int]) -> Tuple[float, int]:
    t0 = time.perf_counter()
    n = fn()
    return (time.perf_counter() - t0) * 1000, n


def rounds(contenders: Dict[str, Callable[[], int]], n: int) -> Dict[str, Tuple[float, float, int]]:
    """Interleaved rounds, the order rotating; (median ms, min ms, last count)."""
    names = list(contenders)
    times: Dict[str, List[float]] = {k: [] for k in names}
    counts: Dict[str, int] = {}
    for r in range(n):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            ms, cnt = timed(contenders[k])
            times[k].append(ms)
            counts[k] = cnt
    return {k: (statistics.median(v), min(v), counts[k]) for k, v in times.items()}


def fmt(v: Optional[Tuple[float, float, int]]) -> str:
    return "-" if v is None else f"{v[0]:9.2f} ({v[1]:.2f})"


def _cell(res: Dict[str, Tuple[float, float, int]], k: str, f: float) -> Tuple[str, str]:
    if k not in res:
        return "-", "-"
    return f"{res[k][0]:.2f}", f"{res[k][0] / f:.1f}x"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,5000,15000")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--slow-rounds", type=int, default=3, help="rounds of psutil and pyroute2")
    ap.add_argument("--quick", action="store_true", help="N=200,500, 3 rounds")
    ap.add_argument("--hold", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.hold is not None:
        _hold(args.hold)
        return 0
    sizes = [200, 500] if args.quick else [int(s) for s in args.sizes.split(",")]
    nrounds = 3 if args.quick else args.rounds
    slow = 1 if args.quick else args.slow_rounds
    ffi, plain = build_plain()
    have_ss = subprocess.run(["which", "ss"], capture_output=True).returncode == 0
    print(f"fastlive {fastlive.__version__}, Python {sys.version.split()[0]}, "
          f"kernel {os.uname().release}, {os.cpu_count()} CPUs; "
          f"{time.strftime('%H:%M:%S UTC', time.gmtime())}")
    print(f"psutil {'yes' if psutil else 'not installed'}, "
          f"pyroute2 {'yes' if DiagSocket else 'not installed'}, "
          f"ss {'yes' if have_ss else 'not installed'}")
    h = Holders()
    rows = []
    try:
        small = h.add(10)
        for n in sizes:
            h.add(n - (h.n - 10))
            time.sleep(0.5)
            fast: Dict[str, Callable[[], int]] = {
                "fastlive": lambda: len(fastlive.census(states="established")),
                "plain C": lambda: int(plain.pc_dump(EST, 1)),
                "plain C v2": lambda: int(plain.pc_dump_v2(EST, 1)),
            }
            if have_ss:
                fast["ss"] = lambda: run_ss("state", "established")
            res = rounds(fast, nrounds)
            slow_c: Dict[str, Callable[[], int]] = {}
            if psutil is not None:
                slow_c["psutil"] = run_psutil
            if DiagSocket is not None:
                slow_c["pyroute2"] = run_pyroute2
            res.update(rounds(slow_c, slow) if slow_c else {})
            full = rounds({"all+info": lambda: len(fastlive.census()),
                           "all, no info": lambda: len(fastlive.census(info=False))}, nrounds)
            filt: Dict[str, Callable[[], int]] = {
                "port=": lambda: len(fastlive.census(port=small))}
            if have_ss:
                filt["ss port"] = lambda: run_ss("state", "all", f"( sport = :{small} or dport = :{small} )")
            full.update(rounds(filt, nrounds))
            rows.append((n, res, full))
            f = res["fastlive"][0]
            print(f"\nN = {n:,} connections ({res['fastlive'][2]:,} ESTABLISHED sockets seen; "
                  f"plain C {res['plain C'][2]:,}, ss {res.get('ss', (0, 0, '-'))[2]} lines)")
            print(f"  {'contender':<14} {'median ms (min)':>18} {'vs fastlive':>12}   ns/socket")
            for k, v in res.items():
                per = v[0] * 1e6 / max(1, res["fastlive"][2])
                print(f"  {k:<14} {fmt(v):>18} {v[0] / f:>11.2f}x   {per:9.0f}")
            a = full["all+info"]
            print(f"  whole machine, every state, tcp_info: {a[2]:,} sockets in {a[0]:.2f} ms "
                  f"({a[0] * 1e6 / max(1, a[2]):.0f} ns/socket); without tcp_info "
                  f"{full['all, no info'][0]:.2f} ms")
            sp = full["port="]
            print(f"  kernel-filtered port= ({sp[2]} sockets match): {sp[0]:.3f} ms"
                  + (f"; ss with the same filter {full['ss port'][0]:.2f} ms" if "ss port" in full else ""))
    finally:
        h.close()

    print("\nSummary (median ms; ratios against fastlive.census)")
    head = ("| N | sockets | fastlive | plain C | fastlive/plain C | ss -tin | ss/fastlive "
            "| psutil | psutil/fastlive | pyroute2 | pyroute2/fastlive | all states+info | port= |")
    print(head)
    print("|" + "---:|" * 13)
    for n, res, full in rows:
        f = res["fastlive"][0]

        ss, ssr = _cell(res, "ss", f)
        ps, psr = _cell(res, "psutil", f)
        pr, prr = _cell(res, "pyroute2", f)
        print(f"| {n:,} | {res['fastlive'][2]:,} | {f:.2f} | {res['plain C'][0]:.2f} | "
              f"{f / res['plain C'][0]:.2f} | {ss} | {ssr} | {ps} | {psr} | {pr} | {prr} | "
              f"{full['all+info'][0]:.2f} ({full['all+info'][2]:,}) | {full['port='][0]:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
