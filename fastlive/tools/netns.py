"""``fastlive netns-sweep``: delete network namespaces left behind by killed
fastlive test runs (a row of :data:`fastlive.tools.cli.COMMANDS`)."""
from __future__ import annotations

import argparse
import os
import sys

from ..testing._spawn import pid_alive
from ..testing.netns import NAME_RE, list_netns, sweep_stale_netns

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--list``."""
    parser.add_argument("--list", action="store_true",
                        help="only list fastlive's namespaces, delete nothing")


def run(args: argparse.Namespace) -> int:
    """List fastlive's namespaces with their owners, or (root) delete those
    whose owning process is gone (``ip netns delete``)."""
    if args.list:
        for name in list_netns():
            m = NAME_RE.fullmatch(name)
            if m:
                owner = "alive" if pid_alive(int(m.group(1))) else "stale"
                print(f"{name}  owner {m.group(1)} {owner}")
        return 0
    if os.geteuid() != 0:
        print("netns-sweep needs root", file=sys.stderr)
        return 1
    for name in sweep_stale_netns():
        print(f"deleted {name}")
    return 0


