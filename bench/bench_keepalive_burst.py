#!/usr/bin/env python3
"""False deaths when thousands of idle connections are armed at once.

For each N (connections) and bound B (seconds), one run:

  1. a helper process opens N loopback connections to this process and
     holds them, alive and silent (it never reads or writes); then nothing
     is sent for ``--quiet`` seconds (default 1);
  2. this process arms all N accepted sockets at once, back to back, with
     ``--plan old`` (the pre-fix plan: every socket the same
     idle/interval/count/user timeout) or ``--plan new`` (fastlive.detect_within,
     which spreads the deadlines) or ``--plan monitor`` (Monitor.add(within=B));
  3. it watches them for 2 x B + 3 s and counts the sockets that report
     ETIMEDOUT although the peer process is alive (false deaths), and the
     packets the kernel dropped in that time because a CPU's input backlog
     was full (/proc/net/softnet_stat column 2, summed over the CPUs; other
     processes' drops on this machine count too, so run it alone).

Prints one line per run.  Not a test: nothing is asserted.  Loopback only;
the helper dies with this process (PR_SET_PDEATHSIG and stdin EOF).
Run heavy runs under the shared lock::

    flock /work/wt/heavy.lock python3 bench/bench_keepalive_burst.py --plan old --plan new
"""
from __future__ import annotations

import argparse
import errno
import os
import select
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import fastlive  # noqa: E402
from fastlive.keepalive import BUSY_SLACK  # noqa: E402


def _hold(port: int, n: int) -> None:  # pragma: no cover - runs in the child
    """Child: n connections to 127.0.0.1:port, held silently until stdin EOF."""
    import ctypes
    import threading
    try:
        ctypes.CDLL(None).prctl(1, 9, 0, 0, 0)            # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass
    threading.Timer(900, os._exit, (2,)).start()           # whatever happens
    held = []
    deadline = time.monotonic() + 120
    for _ in range(n):
        if time.monotonic() > deadline:
            break
        held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
    print(len(held), flush=True)
    sys.stdin.read()


def softnet_drops() -> int:
    """Packets dropped because a CPU's backlog (netdev_max_backlog) was full."""
    with open("/proc/net/softnet_stat") as f:
        return sum(int(line.split()[1], 16) for line in f if line.strip())


def old_plan(bound: int) -> fastlive.KeepaliveSettings:
    """plan_within before the fix (one plan for every socket)."""
    whole = bound
    count = min(3, whole - 1)
    interval = max(1, whole // (2 * count))
    idle = whole - interval * count
    return fastlive.KeepaliveSettings(True, idle, interval, count, max(0.5, whole - BUSY_SLACK))


def run(n: int, bound: int, plan: str, watch: Optional[float], quiet: float) -> Dict[str, float]:
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(4096)
    port = lst.getsockname()[1]
    helper = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--hold", str(port), str(n)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    socks: List[socket.socket] = []
    mon = None
    try:
        lst.settimeout(30)
        while len(socks) < n:
            s, _ = lst.accept()
            socks.append(s)
        assert helper.stdout is not None
        made = int(helper.stdout.readline())
        if made != n:
            raise RuntimeError(f"helper made {made} of {n} connections")
        time.sleep(quiet)                                  # every connection idle this long
        d0 = softnet_drops()
        t0 = time.monotonic()
        if plan == "old":
            p = old_plan(bound)
            for s in socks:
                fastlive.set_keepalive(s, True, idle=p.idle, interval=p.interval, count=p.count,
                                       user_timeout=p.user_timeout)
        elif plan == "new":
            for s in socks:
                fastlive.detect_within(s, bound)
        else:
            mon = fastlive.Monitor()
            for s in socks:
                mon.add(s, within=bound)
        arm = time.monotonic() - t0
        idles = sorted({fastlive.get_keepalive(s).idle for s in socks})
        po = select.poll()
        byfd = {s.fileno(): s for s in socks}
        for fd in byfd:
            po.register(fd, 0)                             # POLLERR / POLLHUP only
        dead: Dict[int, float] = {}
        end = t0 + (watch if watch is not None else 2 * bound + 3)
        while time.monotonic() < end:
            for fd, _ev in po.poll(200):
                if fd not in dead:
                    dead[fd] = time.monotonic() - t0
                    po.unregister(fd)
        alive = helper.poll() is None
        d1 = softnet_drops()
        etimedout = sum(1 for fd in dead
                        if byfd[fd].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ETIMEDOUT)
        first = min(dead.values()) if dead else float("nan")
        return {"n": n, "bound": bound, "false": etimedout if alive else -1, "other": len(dead) - etimedout,
                "drops": d1 - d0, "arm_s": arm, "first_s": first, "idles": len(idles)}
    finally:
        if mon is not None:
            mon.close()
        for s in socks:
            s.close()
        lst.close()
        helper.kill()
        helper.wait(30)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, action="append", help="connections (repeatable)")
    ap.add_argument("--bound", type=int, action="append", help="seconds (repeatable)")
    ap.add_argument("--plan", choices=["old", "new", "monitor"], action="append")
    ap.add_argument("--watch", type=float, help="seconds to watch (default 2 x bound + 3)")
    ap.add_argument("--quiet", type=float, default=1.0,
                    help="seconds the connections are idle before the arming (default 1)")
    ap.add_argument("--floor", type=float, help="fastlive.keepalive.SPREAD_FLOOR for --plan new")
    ap.add_argument("--quick", action="store_true", help="N=200, bound 3, 4 s: proves it runs")
    a = ap.parse_args(argv)
    ns = a.n or ([200] if a.quick else [2000, 5000, 10000])
    bounds = a.bound or ([3] if a.quick else [5, 10, 30])
    plans = a.plan or ["old", "new"]
    if a.floor is not None:
        fastlive.keepalive.SPREAD_FLOOR = a.floor
    watch = 4.0 if a.quick and a.watch is None else a.watch
    print(f"netdev_max_backlog={open('/proc/sys/net/core/netdev_max_backlog').read().strip()} "
          f"cpus={os.cpu_count()} spread_floor={fastlive.keepalive.SPREAD_FLOOR} "
          f"spread_block={fastlive.keepalive.SPREAD_BLOCK} quiet={a.quiet}s")
    print(f"{'plan':8} {'N':>6} {'bound':>5} {'false deaths':>12} {'other':>5} {'softnet drops':>13} "
          f"{'arm s':>6} {'1st death s':>11} {'idles':>5}")
    for bound in bounds:
        for n in ns:
            for plan in plans:
                r = run(n, bound, plan, watch, a.quiet)
                print(f"{plan:8} {n:6d} {bound:5d} {int(r['false']):12d} {int(r['other']):5d} "
                      f"{int(r['drops']):13d} {r['arm_s']:6.2f} {r['first_s']:11.2f} {int(r['idles']):5d}",
                      flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--hold":
        _hold(int(sys.argv[2]), int(sys.argv[3]))
        sys.exit(0)
    sys.exit(main())
