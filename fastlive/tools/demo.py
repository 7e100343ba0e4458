"""``fastlive demo``: fail peers in every way and show which method sees what.

Each failure mode (a column) gets its own peers: helper processes on
loopback for FIN, RST, SIGKILL and SIGSTOP, and a network-namespace pair
per silent death (link down, blackhole) when running as root.  Every
method (a row) watches its own connection, once while idle and once with
unacknowledged data (the local side writes after the fault), so that no
method disturbs another: a check that takes a socket error, a keepalive
setting, a heartbeat all stay on their own socket.  A healthy peer is the
control column: whatever "detects" it is a false positive.

Timers are short so that the whole run takes about half a minute:
keepalive 1 s idle / 1 s interval / 3 probes, TCP_USER_TIMEOUT 3 s,
SO_RCVTIMEO 2 s, heartbeat every 0.5 s with 3 misses.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import select
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO, Tuple

from .. import heartbeat
from ..testing import NetnsPair, PeerProcess, netns_unavailable
from ..heartbeat import HeartbeatEngine
from ..keepalive import set_keepalive
from ..monitor import Monitor
from ..readiness import check_poll, check_select
from ..rw import check_peek, send
from ..tcpinfo import check_tcp_info
from ..timeouts import check_rcvtimeo, set_timeouts
from .._lib import seconds
from .cli import seconds_arg

__all__ = [
    "KEEPALIVE", "USER_TIMEOUT", "RCVTIMEO", "TICK", "BUSY_BYTES", "METHODS", "FAILURES", "SILENT",
    "Cell", "Result", "run_matrix", "render", "add_arguments", "run", "main",
]

KEEPALIVE = (1, 1, 3)          # idle, interval, count (seconds, probes)
USER_TIMEOUT = 3.0             # seconds
RCVTIMEO = 2.0                 # seconds
HB_INTERVAL, HB_MISSES = 0.5, 3
MAX_WINDOW = 600.0             # the longest --window (seconds)
TICK = 0.01                    # how often the polled methods look (seconds)
BUSY_BYTES = b"d" * 4096       # written after the fault in the "busy" cells

#: (key, label) of each method, in table order.
METHODS: List[Tuple[str, str]] = [
    ("read", "1 read (peek)"),
    ("write", "1 write errors"),
    ("select", "2 select"),
    ("epoll", "  epoll RDHUP"),
    ("tcp_info", "3 TCP_INFO"),
    ("keepalive", "4 keepalive"),
    ("user_timeout", "  USER_TIMEOUT"),
    ("rcvtimeo", "5 SO_RCVTIMEO"),
    ("heartbeat", "6 heartbeat"),
]
#: failure modes, in table order; each is run idle and busy.
FAILURES: List[Tuple[str, str]] = [
    ("healthy", "healthy"), ("fin", "FIN"), ("rst", "RST"), ("kill", "SIGKILL"),
    ("frozen", "SIGSTOP"), ("link-down", "link down"), ("blackhole", "blackhole"),
]
SILENT = ("link-down", "blackhole")


@dataclass
class Cell:
    """One method watching one connection under one failure mode."""

    method: str
    failure: str
    busy: bool
    detected: bool = False
    after: Optional[float] = None      #: seconds from the fault to the verdict
    status: str = ""
    errno: int = 0
    suspect_after: Optional[float] = None   #: TCP_INFO only
    skipped: str = ""
    t0: float = field(default=0.0, repr=False, compare=False)  #: when the fault hit
    faulted: bool = field(default=False, repr=False, compare=False)  #: the fault is complete
    busy_sent: bool = field(default=False, repr=False, compare=False)
    sock: Optional[socket.socket] = field(default=None, repr=False, compare=False)
    conn: int = field(default=-1, repr=False, compare=False)

    @property
    def column(self) -> str:
        """``failure/idle`` or ``failure/busy``."""
        return f"{self.failure}/{'busy' if self.busy else 'idle'}"

    def hit(self, t: float, status: str, err: int = 0) -> None:
        """Record the first verdict of death, ``t`` seconds after the fault."""
        if not self.detected:
            self.detected, self.after, self.status, self.errno = True, t, status, err

    def public(self) -> Dict[str, Any]:
        """The cell as JSON-ready data (what ``--json`` prints)."""
        return {k: getattr(self, k) for k in (
            "method", "failure", "busy", "detected", "after", "status", "errno",
            "suspect_after", "skipped")}


@dataclass
class Result:
    """The whole matrix: every cell, and the columns skipped with why."""

    window: float
    cells: List[Cell]
    skipped: Dict[str, str]

    def cell(self, method: str, failure: str, busy: bool) -> Cell:
        """The cell of ``method`` under ``failure`` (KeyError if none)."""
        for c in self.cells:
            if (c.method, c.failure, c.busy) == (method, failure, busy):
                return c
        raise KeyError((method, failure, busy))

    def as_json(self) -> Dict[str, Any]:
        """The matrix as JSON-ready data."""
        return {"window": self.window, "methods": [m for m, _ in METHODS],
                "failures": [f for f, _ in FAILURES], "skipped": self.skipped,
                "cells": [c.public() for c in self.cells]}


def _prepare(cell: Cell, sock: socket.socket, engine: HeartbeatEngine,
             monitor: Monitor, peer: PeerProcess) -> None:
    """Arm this cell's method on its own connection."""
    cell.sock = sock
    sock.setblocking(False)
    m = cell.method
    if m == "keepalive":
        idle, iv, cnt = KEEPALIVE
        set_keepalive(sock, idle=idle, interval=iv, count=cnt)
    elif m == "user_timeout":
        set_keepalive(sock, False, user_timeout=USER_TIMEOUT)
    elif m == "rcvtimeo":
        set_timeouts(sock, recv=RCVTIMEO)
    elif m == "epoll":
        monitor.add(sock, key=cell)
    elif m == "heartbeat":
        peer.echo(True, conn=cell.conn)     # the peer answers every frame


class _Watch:
    """Runs every polled method once per tick; event methods report through
    the Monitor and the heartbeat engine; SO_RCVTIMEO waits in threads."""

    def __init__(self, cells: List[Cell], engine: HeartbeatEngine,
                 monitor: Monitor) -> None:
        self.cells = [c for c in cells if not c.skipped]
        self.engine = engine
        self.monitor = monitor
        self.armed = False                  # faults injected: verdicts count
        self.errpoll = select.poll()
        self.by_fd: Dict[int, Cell] = {}
        self.hb_cells: Dict[int, Cell] = {}
        for c in self.cells:
            assert c.sock is not None
            if c.method in ("keepalive", "user_timeout"):
                self.errpoll.register(c.sock, select.POLLERR | select.POLLHUP)
                self.by_fd[c.sock.fileno()] = c
            if c.method == "heartbeat":
                self.hb_cells[c.sock.fileno()] = c

    @staticmethod
    def since(cell: Cell) -> float:
        return time.monotonic() - cell.t0

    def rcvtimeo_thread(self, cell: Cell, end: float) -> None:
        assert cell.sock is not None
        while time.monotonic() < end and not cell.detected:
            v = check_rcvtimeo(cell.sock)   # blocks up to SO_RCVTIMEO
            if v.dead and cell.t0:          # a timeout before the fault: wait again
                cell.hit(self.since(cell), v.status.name, v.errno)

    def tick(self) -> None:
        """One look by every method at every faulted cell, then the busy
        cells' data for the cells whose fault was complete when it began."""
        ready = [c for c in self.cells if c.faulted and c.busy and not c.busy_sent
                 # SO_RCVTIMEO looks from its own thread, in a blocking wait
                 # that ends with its verdict
                 and (c.method != "rcvtimeo" or c.detected)]
        for c in self.cells:
            if c.detected or c.sock is None or not c.t0:
                continue
            m = c.method
            if m == "read":
                v = check_peek(c.sock)
            elif m == "select":
                v = check_select(c.sock)
            elif m == "tcp_info":
                v = check_tcp_info(c.sock)
                if v.suspect and c.suspect_after is None:
                    c.suspect_after = self.since(c)
            elif m == "write":
                v = send(c.sock, b"w").verdict
            else:
                continue
            if v.dead:
                c.hit(self.since(c), v.status.name, v.errno)
        for fd, _ev in self.errpoll.poll(0):
            # The kernel's timers report only through the socket's error
            # (POLLERR) or a hang-up: classify with the library's own poll
            # check, which takes the error and names it as C does.
            c = self.by_fd[fd]
            if not c.t0 or c.detected or c.sock is None:
                continue
            v = check_poll(c.sock)
            if v.dead:
                c.hit(self.since(c), v.status.name, v.errno)
                self.errpoll.unregister(fd)
        for d in self.monitor.wait(0):
            cell = d.key
            cell.hit(self.since(cell), d.status.name, d.errno)
        for hd in self.engine.poll():
            cell = self.hb_cells.get(hd.fd)
            if cell is not None:      # before the faults this is a false positive
                cell.t0 = cell.t0 or time.monotonic()
                cell.hit(self.since(cell), hd.verdict.status.name, hd.verdict.errno)
        # Busy cells get their unacknowledged data once every method has
        # had one look after the fault: a write that draws an RST, or takes
        # a pending error, would otherwise change what the method sees.
        for c in ready:
            if c.busy and not c.busy_sent and c.sock is not None:
                c.busy_sent = True
                if c.method == "write":         # writes on every tick anyway
                    continue
                data = heartbeat.ping(0xFFFF) * 64 if c.method == "heartbeat" else BUSY_BYTES
                with contextlib.suppress(OSError):   # frames, never garbage, to the engine
                    c.sock.send(data)


def _cells_for(failure: str) -> List[Cell]:
    return [Cell(m, failure, busy) for busy in (False, True) for m, _ in METHODS]


def _inject(failure: str, peer: PeerProcess, cells: List[Cell],
            pair: Optional[NetnsPair], after: Callable[[], None]) -> None:
    """Fail the peer.  Each cell's clock starts just before its connection
    is hit (so a time includes the command that hit it); ``after`` runs as
    soon as a connection has been hit."""
    if failure in ("fin", "rst"):
        for c in cells:
            c.t0 = time.monotonic()
            (peer.close_socket if failure == "fin" else peer.reset)(c.conn)
            c.faulted = True
            after()
        return
    now = time.monotonic()
    for c in cells:
        c.t0 = now
    if failure == "kill":
        peer.kill()
    elif failure == "frozen":
        peer.freeze()
    elif failure == "link-down":
        assert pair is not None
        pair.link_down()
    elif failure == "blackhole":
        assert pair is not None
        pair.blackhole()
    for c in cells:
        c.faulted = True
    after()


def run_matrix(window: float = 10.0, *, netns: bool = True,
               progress: Optional[TextIO] = None) -> Result:
    """Run every failure x method and watch for ``window`` seconds (0 <
    window <= 600): set up the connections, inject every fault at once and
    record, per cell, whether and after how long its method saw a death
    and the verdict's status and errno exactly as the library returned
    them.  Netns columns need root (skipped with the reason otherwise)."""
    window = seconds("window", window, positive=True, maximum=MAX_WINDOW)
    def say(msg: str) -> None:
        if progress is not None:
            print(msg, file=progress, flush=True)

    skipped: Dict[str, str] = {}
    reason = netns_unavailable() if netns else "disabled (--no-netns)"
    cells: List[Cell] = []
    with contextlib.ExitStack() as stack:
        engine = stack.enter_context(HeartbeatEngine(tick=0.005))
        monitor = stack.enter_context(Monitor())
        groups: List[Tuple[str, PeerProcess, List[Cell], Optional[NetnsPair]]] = []
        for failure, label in FAILURES:
            fc = _cells_for(failure)
            cells += fc
            if failure in SILENT and reason:
                for c in fc:
                    c.skipped = reason
                skipped[failure] = reason
                say(f"  {label:10} skipped: {reason}")
                continue
            say(f"  {label:10} setting up {len(fc)} connections"
                + (" in a netns pair" if failure in SILENT else " on loopback"))
            pair: Optional[NetnsPair] = None
            if failure in SILENT:
                pair = stack.enter_context(NetnsPair())
                assert pair.peer is not None and pair.local is not None
                peer = pair.peer
                socks = [pair.local] + [pair.connect() for _ in fc[1:]]
            else:
                peer = stack.enter_context(PeerProcess(listen=("127.0.0.1", 0)))
                socks = []
                for i in range(len(fc)):
                    s = stack.enter_context(
                        socket.create_connection(("127.0.0.1", peer.port), timeout=10))
                    peer.wait_conns(i + 1)
                    socks.append(s)
            for i, (c, s) in enumerate(zip(fc, socks)):
                c.conn = i
                _prepare(c, s, engine, monitor, peer)
            groups.append((failure, peer, fc, pair))

        watch = _Watch(cells, engine, monitor)
        # The heartbeat starts once every connection is up and runs for a
        # second before the faults, so its silence clocks are in steady state.
        for fd in watch.hb_cells:
            engine.add(fd, HB_INTERVAL, HB_MISSES)
        # One thread looks at every cell each TICK from now to the end, so a
        # cell's time does not include the injection of later columns (ip
        # and nft commands take a while).
        stop = threading.Event()
        poke = threading.Event()            # a fault just hit: look now
        errors: List[BaseException] = []

        def ticker() -> None:
            try:
                while not stop.is_set():
                    watch.tick()
                    poke.wait(TICK)
                    poke.clear()
            except BaseException as exc:  # re-raised in the caller below
                errors.append(exc)

        tick_thread = threading.Thread(target=ticker, name="fastlive-demo-tick", daemon=True)
        tick_thread.start()
        try:
            time.sleep(1.0)
            end = time.monotonic() + window + 2
            threads = [threading.Thread(target=watch.rcvtimeo_thread,
                                        args=(c, end - 2), daemon=True)
                       for c in watch.cells if c.method == "rcvtimeo"]
            for t in threads:
                t.start()
            say(f"injecting faults; watching for {window:g} s ...")
            for failure, peer, fc, pair in groups:
                _inject(failure, peer, fc, pair, poke.set)
            start = time.monotonic()
            while not errors and time.monotonic() - start < window:
                time.sleep(min(2.0, max(0.0, start + window - time.monotonic())))
                n = sum(c.detected for c in watch.cells)
                say(f"  {time.monotonic() - start:4.0f} s: {n}/{len(watch.cells)} cells detected")
            for t in threads:
                t.join(max(0.0, end - time.monotonic()))
        finally:
            stop.set()
            poke.set()
            tick_thread.join(10)
        if errors:
            raise errors[0]
        for failure, peer, _fc, _pair in groups:
            if failure == "frozen" and peer.running:
                peer.thaw()
    return Result(window, cells, skipped)


def _fmt(c: Cell) -> str:
    if c.skipped:
        return "skip"
    if not c.detected or c.after is None:
        return "-"
    t = c.after
    txt = (f"{t * 1000:.1f}ms" if t < 0.01 else f"{t * 1000:.0f}ms" if t < 1
           else f"{t:.1f}s")
    return txt + ("!" if c.failure == "healthy" else "")


def render(result: Result, out: TextIO = sys.stdout) -> None:
    """Print the matrix as the table the README shows, with its legend."""
    cols = [(f, b) for f, _ in FAILURES for b in (False, True)]
    head1 = ["method".ljust(15)] + [dict(FAILURES)[f].center(15) for f, _ in FAILURES]
    head2 = [" " * 15] + ["idle".rjust(7) + " " + "busy".rjust(7) for _ in FAILURES]
    print(" ".join(head1), file=out)
    print(" ".join(head2), file=out)
    for m, label in METHODS:
        cells = [_fmt(result.cell(m, f, b)) for f, b in cols]
        row = [label.ljust(15)] + [f"{cells[i]:>7} {cells[i + 1]:>7}"
                                   for i in range(0, len(cells), 2)]
        print(" ".join(row), file=out)
    print(file=out)
    print("time from the fault to the method's verdict; '-' = not detected in "
          f"{result.window:g} s; '!' = a healthy peer was called dead (false positive).",
          file=out)
    print("busy = the local side wrote after the fault, so data is unacknowledged "
          "(a frozen peer's kernel still ACKs it).", file=out)
    for m, label in (("tcp_info", "TCP_INFO"),):
        sus = [f"{c.column} {c.suspect_after:.1f}s" for c in result.cells
               if c.method == m and c.suspect_after is not None and not c.detected]
        if sus:
            print(f"{label} 'suspect' (retransmits/probes/backoff) before any verdict: "
                  + ", ".join(sus), file=out)
    for failure, reason in result.skipped.items():
        print(f"{failure}: skipped: {reason}", file=out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options, on the ``fastlive demo`` subparser."""
    parser.add_argument("--json", action="store_true", help="print the matrix as JSON")
    parser.add_argument("--window", type=seconds_arg("--window", 1, MAX_WINDOW), default=10.0,
                        help=f"seconds to watch after the faults, 1..{MAX_WINDOW:g} (default 10)")
    parser.add_argument("--no-netns", action="store_true",
                        help="skip the network-namespace (silent death) columns")


def run(args: argparse.Namespace) -> int:
    """Run the matrix (progress on stderr) and print it as a table or JSON."""
    result = run_matrix(args.window, netns=not args.no_netns, progress=sys.stderr)
    if args.json:
        json.dump(result.as_json(), sys.stdout, indent=1)
        print()
    else:
        render(result)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``fastlive demo`` on its own: parse ``argv`` and :func:`run`."""
    p = argparse.ArgumentParser(prog="fastlive demo", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


