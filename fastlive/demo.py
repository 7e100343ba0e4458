"""``fastlive demo``: fail a loopback peer in several ways and show what
each non-blocking check says."""
from __future__ import annotations

import argparse
import json
import select
import socket
import struct
from typing import Callable, Dict, List, Tuple

from . import check_peek, check_poll, check_select, check_so_error, check_tcp_info, send
from .verdict import Verdict


def _pair() -> Tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as lst:
        cli = socket.create_connection(lst.getsockname(), timeout=2)
        srv, _ = lst.accept()
    return cli, srv


def _healthy(peer: socket.socket) -> None:
    pass


def _fin(peer: socket.socket) -> None:
    peer.close()


def _rst(peer: socket.socket) -> None:
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()


def _half_close(peer: socket.socket) -> None:
    peer.shutdown(socket.SHUT_WR)


SCENARIOS: Dict[str, Callable[[socket.socket], None]] = {
    "healthy": _healthy, "fin": _fin, "rst": _rst, "half-close": _half_close,
}
CHECKS: Dict[str, Callable[[socket.socket], Verdict]] = {
    "peek": check_peek, "select": check_select, "poll": check_poll,
    "tcp_info": check_tcp_info, "so_error": check_so_error,
    "send": lambda s: send(s, b"x").verdict,
}


def matrix() -> List[Dict[str, str]]:
    rows = []
    for name, fail in SCENARIOS.items():
        cli, srv = _pair()
        try:
            fail(srv)
            # Wait for the event to land without taking the socket error,
            # which the kernel hands out only once.
            p = select.poll()
            p.register(cli, select.POLLIN)
            p.poll(500 if name != "healthy" else 0)
            row = {"failure": name}
            for cname, fn in CHECKS.items():
                row[cname] = fn(cli).status.name.lower()
            rows.append(row)
        finally:
            cli.close()
            srv.close()
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    rows = matrix()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    cols = ["failure", *CHECKS]
    width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    print("  ".join(c.ljust(width[c]) for c in cols))
    for r in rows:
        print("  ".join(r[c].ljust(width[c]) for c in cols))
    return 0
