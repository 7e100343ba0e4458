"""``fastlive top``: a live view of the machine's TCP connections (a row of
:data:`fastlive.tools.cli.COMMANDS`).

Every refresh is one :func:`fastlive.census` (one sock_diag dump).  Shown:
counts by state (with the change since the last refresh), then the
connections that look dead or suspect, grouped by remote peer with a
sparkline of their history, and CLOSE_WAIT sockets grouped by the process
and local port that hold them (the application never closed its end).

What counts as suspect, per socket (the kernel's own numbers):

* ``close-wait``: the peer closed (its FIN arrived) and this side did not.
* ``retransmitting``: RTO retransmissions outstanding (``tcpi_retransmits``
  or ``tcpi_backoff`` > 0).
* ``zero-window``: the peer advertises no receive window (the zero-window
  probe timer is pending, or ``tcpi_snd_wnd`` is 0).
* ``no-ack``: data unacknowledged and no ACK for more than 2 RTOs.
* ``keepalive``: keepalive probes sent and not answered.

The live view needs ``rich`` (``pip install fastlive[top]``); without it,
or when stdout is not a terminal, each refresh is printed as plain text.
``--once`` prints one refresh and exits (for scripts).
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, Iterable, List, Optional, Set, Tuple, Union

from ..census import WHY, Census, CensusEntry, census, why_names
from ..tcpstate import TcpState
from .census import _num

__all__ = ["add_arguments", "run", "Suspect", "Snapshot", "analyze", "reasons",
           "owners", "sparkline", "History", "render_plain"]

SPARKS = "▁▂▃▄▅▆▇█"
REASONS = tuple(WHY.values())


def reasons(e: CensusEntry) -> List[str]:
    """Why a socket looks dead or suspect ([] when it does not); the rules
    live in C (``fl_census_why``), see :data:`fastlive.census.WHY`."""
    return e.why


@dataclass
class Suspect:
    """One socket that looks dead or suspect."""

    entry: CensusEntry
    why: List[str]

    @property
    def peer(self) -> str:
        """The remote host this suspect connection talks to (the grouping key)."""
        return self.entry.remote[0]


@dataclass
class Snapshot:
    """What one refresh found."""

    when: float
    total: int
    counts: Dict[Union[TcpState, int], int]
    suspects: List[Suspect]
    peers: Dict[str, Tuple[int, collections.Counter[str]]]   #: peer -> (conns, reasons)
    close_wait: Dict[Tuple[str, int], int] = field(default_factory=dict)  #: (process, port) -> n
    dump_ms: float = 0.0
    interrupted: bool = False


def owners(inodes: Set[int], limit_s: float = 0.5) -> Dict[int, str]:
    """``"pid/comm"`` of the process holding each socket inode, from
    ``/proc/<pid>/fd`` (only processes this user may look into; bounded to
    ``limit_s`` seconds)."""
    found: Dict[int, str] = {}
    if not inodes:
        return found
    deadline = time.monotonic() + limit_s
    try:
        pids = [d for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return found
    for pid in pids:
        if time.monotonic() > deadline or len(found) == len(inodes):
            break
        base = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(base)
        except OSError:
            continue
        comm = None
        for fd in fds:
            try:
                link = os.readlink(f"{base}/{fd}")
            except OSError:
                continue
            if not link.startswith("socket:["):
                continue
            ino = int(link[8:-1])
            if ino in inodes and ino not in found:
                if comm is None:
                    try:
                        with open(f"/proc/{pid}/comm") as fh:
                            comm = fh.read().strip()
                    except OSError:
                        comm = "?"
                found[ino] = f"{pid}/{comm}"
    return found


def analyze(c: Census, dump_ms: float = 0.0, find_owners: bool = True) -> Snapshot:
    """Counts, suspects, per-peer groups and CLOSE_WAIT per process/port.
    The reasons are computed in C for every record in one pass; Python
    objects are made only for the suspect ones."""
    why = c.why()
    states = c.states()
    hosts = c.remote_hosts()
    skip = (TcpState.LISTEN, TcpState.TIME_WAIT)
    suspects: List[Suspect] = []
    peers: Dict[str, Tuple[int, collections.Counter[str]]] = {}
    for k, host in enumerate(hosts):
        if states[k] in skip:
            continue
        n, ctr = peers.get(host, (0, collections.Counter()))
        bits = why[k]
        if bits:
            names = why_names(bits)
            ctr.update(names)
            suspects.append(Suspect(c[k], names))
        peers[host] = (n + 1, ctr)
    cw = [s.entry for s in suspects if "close-wait" in s.why]
    names_of = owners({e.inode for e in cw if e.inode}) if find_owners and cw else {}
    close_wait: Dict[Tuple[str, int], int] = collections.Counter(
        (names_of.get(e.inode, "?"), e.local[1]) for e in cw)
    rank = {r: i for i, r in enumerate(reversed(REASONS))}
    suspects.sort(key=lambda s: (-max(rank[w] for w in s.why), -len(s.why)))
    return Snapshot(time.time(), len(c), c.counts(), suspects, peers, dict(close_wait),
                    dump_ms, c.interrupted)


def sparkline(values: Iterable[int]) -> str:
    """The last values as a row of block characters (one per refresh)."""
    vals = list(values)
    if not vals:
        return ""
    top = max(vals)
    if top <= 0:
        return SPARKS[0] * len(vals)
    return "".join(SPARKS[min(len(SPARKS) - 1, (v * (len(SPARKS) - 1) + top - 1) // top)]
                   for v in vals)


class History:
    """Suspect counts per peer and state counts over the last refreshes."""

    def __init__(self, depth: int = 30) -> None:
        self.depth = depth
        self.peer: Dict[str, Deque[int]] = {}
        self.prev: Optional[Snapshot] = None
        self.last: Optional[Snapshot] = None

    def add(self, snap: Snapshot) -> None:
        """Record one refresh's counts."""
        self.prev, self.last = self.last, snap
        seen = set()
        for host, (_n, ctr) in snap.peers.items():
            seen.add(host)
            d = self.peer.setdefault(host, collections.deque(maxlen=self.depth))
            d.append(sum(ctr.values()))
        for host, d in list(self.peer.items()):
            if host not in seen:
                d.append(0)
                if not any(d):
                    del self.peer[host]

    def delta(self, key: Union[TcpState, int]) -> Optional[int]:
        """The change of a state's count since the previous refresh."""
        if self.prev is None or self.last is None:
            return None
        return self.last.counts.get(key, 0) - self.prev.counts.get(key, 0)

    def peer_delta(self, host: str) -> Optional[int]:
        """The change of a remote peer's suspect count since the previous refresh."""
        if self.prev is None or self.last is None:
            return None
        return self.last.peers.get(host, (0, None))[0] - self.prev.peers.get(host, (0, None))[0]


def _name(k: Union[TcpState, int]) -> str:
    return k.name if isinstance(k, TcpState) else str(k)


def _sign(d: Optional[int]) -> str:
    return "" if d is None else f"{d:+d}"


def _hp(hp: Tuple[str, int]) -> str:
    return f"[{hp[0]}]:{hp[1]}" if ":" in hp[0] else f"{hp[0]}:{hp[1]}"


def _conn_row(s: Suspect) -> List[str]:
    e, info = s.entry, s.entry.info
    rtt = _num(info, "rtt", 1000, "{:.1f}")
    unacked = _num(info, "unacked")
    ack = _num(info, "last_ack_recv", 1000, "{:.1f}s")
    retr = _num(info, "total_retrans")
    return [_name(e.state), _hp(e.local), _hp(e.remote), ",".join(s.why), rtt, retr, unacked, ack,
            str(e.rqueue), str(e.wqueue)]


CONN_HEAD = ["STATE", "LOCAL", "REMOTE", "WHY", "RTT ms", "RETR", "UNACKED", "LAST ACK", "RECV-Q",
             "SEND-Q"]


def _peer_rows(h: History, limit: int) -> List[List[str]]:
    snap = h.last
    assert snap is not None
    rows = []
    for host, (n, ctr) in snap.peers.items():
        bad = sum(ctr.values())
        if not bad:
            continue
        why = ", ".join(f"{k} {v}" for k, v in ctr.most_common())
        rows.append((bad, [host, str(n), _sign(h.peer_delta(host)), str(bad), why,
                           sparkline(h.peer.get(host, ()))]))
    rows.sort(key=lambda r: -r[0])
    return [r for _b, r in rows[:limit]]


def _table(head: List[str], rows: List[List[str]]) -> List[str]:
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) if rows else len(head[i])
              for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*head).rstrip()] + [fmt.format(*r).rstrip() for r in rows]


def render_plain(h: History, limit: int = 20) -> str:
    """One refresh as plain text."""
    snap = h.last
    assert snap is not None
    out = [f"fastlive top  {time.strftime('%H:%M:%S', time.localtime(snap.when))}  "
           f"{snap.total} TCP sockets  dump {snap.dump_ms:.1f} ms"
           + ("  (dump interrupted)" if snap.interrupted else "")]
    states = sorted(snap.counts.items(), key=lambda kv: -kv[1])
    out.append("states: " + "  ".join(f"{_name(k)} {v}{' (' + _sign(h.delta(k)) + ')' if h.delta(k) else ''}"
                                       for k, v in states))
    n_sus = len(snap.suspects)
    out.append(f"suspect: {n_sus}" + (": " + ", ".join(
        f"{r} {sum(r in s.why for s in snap.suspects)}" for r in REASONS
        if any(r in s.why for s in snap.suspects)) if n_sus else ""))
    peers = _peer_rows(h, limit)
    if peers:
        out.append("")
        out.append("by peer")
        out += _table(["PEER", "CONNS", "DELTA", "SUSPECT", "WHY", "TREND"], peers)
    if snap.close_wait:
        out.append("")
        out.append("CLOSE_WAIT by process/port (the application never closed its end)")
        rows = [[proc, str(port), str(n)] for (proc, port), n in
                sorted(snap.close_wait.items(), key=lambda kv: -kv[1])[:limit]]
        out += _table(["PROCESS", "PORT", "CLOSE_WAIT"], rows)
    if snap.suspects:
        out.append("")
        out.append("suspect connections")
        out += _table(CONN_HEAD, [_conn_row(s) for s in snap.suspects[:limit]])
    return "\n".join(out)


def _render_rich(h: History, limit: int) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    snap = h.last
    assert snap is not None
    parts: List[Any] = []
    head = Text.assemble(("fastlive top", "bold"), f"  {time.strftime('%H:%M:%S')}  ",
                         (f"{snap.total}", "bold"), " TCP sockets  ",
                         f"dump {snap.dump_ms:.1f} ms",
                         ("  (dump interrupted)" if snap.interrupted else "", "yellow"))
    parts.append(head)
    st = Table(title="states", title_justify="left", show_edge=False, pad_edge=False)
    st.add_column("STATE")
    st.add_column("COUNT", justify="right")
    st.add_column("DELTA", justify="right")
    for k, v in sorted(snap.counts.items(), key=lambda kv: -kv[1]):
        d = h.delta(k)
        style = "red" if k == TcpState.CLOSE_WAIT else ""
        st.add_row(Text(_name(k), style=style), str(v), _sign(d) if d else "")
    parts.append(st)
    peers = _peer_rows(h, limit)
    if peers:
        pt = Table(title="suspect peers", title_justify="left", show_edge=False, pad_edge=False)
        for col in ["PEER", "CONNS", "DELTA", "SUSPECT", "WHY", "TREND"]:
            pt.add_column(col, justify="right" if col in ("CONNS", "DELTA", "SUSPECT") else "left")
        for r in peers:
            pt.add_row(*r[:3], Text(r[3], style="bold red"), r[4], Text(r[5], style="red"))
        parts.append(pt)
    if snap.close_wait:
        ct = Table(title="CLOSE_WAIT by process/port", title_justify="left", show_edge=False,
                   pad_edge=False)
        for col in ["PROCESS", "PORT", "CLOSE_WAIT"]:
            ct.add_column(col)
        for (proc, port), n in sorted(snap.close_wait.items(), key=lambda kv: -kv[1])[:limit]:
            ct.add_row(proc, str(port), str(n))
        parts.append(ct)
    if snap.suspects:
        t = Table(title="suspect connections", title_justify="left", show_edge=False, pad_edge=False)
        for col in CONN_HEAD:
            t.add_column(col)
        for s in snap.suspects[:limit]:
            t.add_row(*_conn_row(s))
        parts.append(t)
    else:
        parts.append(Text("no suspect connections", style="green"))
    return Group(*parts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fastlive top`` options."""
    parser.add_argument("--interval", type=float, default=2.0, metavar="SECONDS",
                        help="seconds between refreshes (default 2)")
    parser.add_argument("--once", action="store_true", help="print one refresh as text and exit")
    parser.add_argument("--plain", action="store_true", help="plain text even on a terminal")
    parser.add_argument("--duration", type=float, metavar="SECONDS",
                        help="stop after this many seconds (default: until Ctrl-C)")
    parser.add_argument("--port", type=int, metavar="PORT",
                        help="only sockets whose local or remote port is PORT")
    parser.add_argument("--state", action="append", metavar="STATE",
                        help="only this TCP state; repeatable")
    parser.add_argument("--limit", type=int, default=20, help="rows per table (default 20)")


def _snapshot(args: argparse.Namespace) -> Snapshot:
    t0 = time.perf_counter()
    c = census(states=args.state, port=args.port)
    return analyze(c, (time.perf_counter() - t0) * 1000)


def run(args: argparse.Namespace) -> int:
    """Run ``fastlive top``: a live view in a terminal (rich), plain text otherwise or with ``--once``."""
    if not (args.interval > 0) or args.interval > 86400:
        print("fastlive top: --interval must be > 0 seconds", file=sys.stderr)
        return 2
    if args.limit < 1:
        print("fastlive top: --limit must be >= 1", file=sys.stderr)
        return 2
    h = History()
    try:
        h.add(_snapshot(args))
    except (ValueError, TypeError) as exc:
        print(f"fastlive top: {exc}", file=sys.stderr)
        return 2
    if args.once:
        print(render_plain(h, args.limit))
        return 0
    deadline = None if args.duration is None else time.monotonic() + args.duration
    live = sys.stdout.isatty() and not args.plain
    rich_ok = False
    if live:
        try:
            import rich  # noqa: F401
            rich_ok = True
        except ImportError:
            print("fastlive top: the live view needs rich (pip install 'fastlive[top]'); "
                  "printing plain text", file=sys.stderr)
    try:
        if rich_ok:
            from rich.live import Live
            with Live(_render_rich(h, args.limit), auto_refresh=False, screen=False,
                      redirect_stdout=False) as view:
                while deadline is None or time.monotonic() < deadline:
                    _sleep(args.interval, deadline)
                    h.add(_snapshot(args))
                    view.update(_render_rich(h, args.limit), refresh=True)
        else:
            print(render_plain(h, args.limit), flush=True)
            while deadline is None or time.monotonic() < deadline:
                _sleep(args.interval, deadline)
                h.add(_snapshot(args))
                print("\n" + render_plain(h, args.limit), flush=True)
    except KeyboardInterrupt:
        pass
    return 0


def _sleep(interval: float, deadline: Optional[float]) -> None:
    wait = interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic()))
    time.sleep(wait)

