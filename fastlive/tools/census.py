"""``fastlive census``: every TCP socket of this network namespace, from one
sock_diag dump (a row of :data:`fastlive.tools.cli.COMMANDS`).

``--follow`` is the death log: each TCP socket as the kernel frees it, with
its final state and ``tcp_info``, until Ctrl-C or ``--duration``.
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from typing import Any, Dict, List, Optional, TextIO

from ..census import CensusEntry, census, census_follow
from ..tcpstate import TcpState

__all__ = ["add_arguments", "run", "format_entry", "format_death", "entry_json"]

def _f(info: Any, name: str) -> Optional[int]:
    """A TcpInfo field (None when the kernel did not return it)."""
    v = getattr(info, name)
    return None if v is None else int(v)


def _num(info: Any, name: str, scale: int = 1, fmt: str = "{}") -> str:
    """A TcpInfo field formatted ("-" when absent); divided by scale when > 1."""
    v = None if info is None else _f(info, name)
    if v is None:
        return "-"
    return fmt.format(v / scale if scale != 1 else v)



def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fastlive census`` options."""
    parser.add_argument("--state", action="append", metavar="STATE",
                        help="only this TCP state (e.g. established, close-wait); repeatable")
    parser.add_argument("--port", type=int, metavar="PORT",
                        help="only sockets whose local or remote port is PORT (filtered by the kernel)")
    parser.add_argument("--family", choices=("4", "6"), help="only IPv4 or only IPv6")
    parser.add_argument("--own", action="store_true", help="only this process's sockets (with fds)")
    parser.add_argument("--no-info", action="store_true", help="skip tcp_info (a smaller dump)")
    parser.add_argument("--json", action="store_true",
                        help="JSON for machines (one array; JSON lines with --follow)")
    parser.add_argument("--follow", action="store_true",
                        help="the death log: print each TCP socket as the kernel frees it")
    parser.add_argument("--duration", type=float, metavar="SECONDS",
                        help="with --follow: stop after this many seconds")


def _family(arg: Optional[str]) -> Optional[int]:
    return None if arg is None else (socket.AF_INET if arg == "4" else socket.AF_INET6)


def _hp(hp: Any, family: int) -> str:
    host, port = hp
    if family == socket.AF_INET6:
        host = f"[{host}]"
    return f"{host}:{port if port else '*'}"


def _state(e: CensusEntry) -> str:
    st = e.state
    return st.name if isinstance(st, TcpState) else str(st)


HEADER = (f"{'STATE':<12} {'RECV-Q':>7} {'SEND-Q':>7} {'LOCAL':<28} {'REMOTE':<28} "
          f"{'INODE':>9} {'UID':>6} {'RTT ms':>8} {'RETR':>5} NOTE")


def format_entry(e: CensusEntry) -> str:
    """One table row."""
    info = e.info
    rtt = _num(info, "rtt", 1000, "{:.3f}")
    retr = _num(info, "total_retrans")
    note = []
    if e.suspect:
        note.append("suspect")
    if e.fd is not None:
        note.append(f"fd={e.fd}")
    fam = e.family
    return (f"{_state(e):<12} {e.rqueue:>7} {e.wqueue:>7} {_hp(e.local, fam):<28} "
            f"{_hp(e.remote, fam):<28} {e.inode:>9} {e.uid:>6} {rtt:>8} {retr:>5} {' '.join(note)}")


def format_death(e: CensusEntry, t: float) -> str:
    """One line of the death log."""
    info = e.info
    parts = [time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}",
             f"{_state(e):<11}", f"{_hp(e.local, e.family)} -> {_hp(e.remote, e.family)}"]
    if info is not None:
        parts.append(f"rtt={_num(info, 'rtt', 1000, '{:.3f}ms')} "
                     f"retrans={_num(info, 'total_retrans')} "
                     f"sent={_num(info, 'bytes_acked')} recv={_num(info, 'bytes_received')} "
                     f"lost={_num(info, 'lost')} "
                     f"segs={_num(info, 'segs_out')}/{_num(info, 'segs_in')}")
    return "  ".join(parts)


def entry_json(e: CensusEntry) -> Dict[str, Any]:
    """One census record as a JSON-ready dict (``--json``)."""
    return e.as_dict()


def _follow(args: argparse.Namespace, out: TextIO) -> int:
    lost = 0
    with census_follow(family=_family(args.family), timeout=args.duration) as f:
        port = args.port
        try:
            for e in f:
                if port is not None and port not in (e.local[1], e.remote[1]):
                    continue
                now = time.time()
                if args.json:
                    d = entry_json(e)
                    d["time"] = now
                    out.write(json.dumps(d) + "\n")
                else:
                    out.write(format_death(e, now) + "\n")
                out.flush()
                if f.lost > lost:
                    print(f"fastlive: {f.lost - lost} events lost (receive queue full)",
                          file=sys.stderr)
                    lost = f.lost
        except KeyboardInterrupt:
            pass
    if f.lost:
        print(f"fastlive: {f.lost} events lost in all", file=sys.stderr)
    return 0


def run(args: argparse.Namespace, out: Optional[TextIO] = None) -> int:
    """Run ``fastlive census``: one dump printed as a table or JSON, or the death log with ``--follow``."""
    stream = out if out is not None else sys.stdout
    try:
        if args.follow:
            return _follow(args, stream)
        c = census(states=args.state, port=args.port, family=_family(args.family),
                   own=args.own, info=not args.no_info)
    except (ValueError, TypeError) as exc:
        print(f"fastlive census: {exc}", file=sys.stderr)
        return 2
    if args.json:
        json.dump([entry_json(e) for e in c], stream)
        stream.write("\n")
        return 0
    lines: List[str] = [HEADER]
    lines += [format_entry(e) for e in c]
    counts = ", ".join(f"{(k.name if isinstance(k, TcpState) else k)} {v}"
                       for k, v in sorted(c.counts().items(), key=lambda kv: -kv[1]))
    lines.append(f"{len(c)} sockets" + (f": {counts}" if counts else "")
                 + (" (dump interrupted: the set may be inexact)" if c.interrupted else ""))
    stream.write("\n".join(lines) + "\n")
    return 0
