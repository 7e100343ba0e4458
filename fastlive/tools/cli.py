"""The ``fastlive`` command (also ``python -m fastlive``).

Each subcommand lives in the module named in ``COMMANDS``; that module
provides ``add_arguments(parser)`` and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional, Tuple

from .._version import __version__

__all__ = ["COMMANDS", "build_parser", "main"]

#: (command, module, one-line help)
COMMANDS: List[Tuple[str, str, str]] = [
    ("demo", "fastlive.tools.demo", "fail peers in every way and show which method sees what"),
    ("netns-sweep", "fastlive.tools.netns",
     "delete network namespaces left behind by killed fastlive test runs"),
    ("client", "fastlive.tools.article", "the article's TCP client (takes over the process)"),
    ("server", "fastlive.tools.article", "the article's TCP server, one --method per section "
     "(takes over the process)"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastlive",
        description="Is the peer of a TCP connection still there? (Linux)")
    parser.add_argument("--version", action="version",
                        version=f"fastlive {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_ in COMMANDS:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into head & co.
        sys.stderr.close()
        return 0
