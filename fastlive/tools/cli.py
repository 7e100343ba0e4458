"""The ``fastlive`` command (also ``python -m fastlive``).

Each subcommand lives in the module named in ``COMMANDS``; that module
provides ``add_arguments(parser)`` and ``run(args) -> int``.  A subcommand's
usage errors (unknown options, bad numbers) come from its own parser, so
they read ``fastlive demo: error: ...`` and print the subcommand's usage.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, List, Optional, Tuple

from .._lib import count, seconds
from .._version import __version__

__all__ = ["COMMANDS", "build_parser", "main", "seconds_arg", "count_arg"]

#: (command, module, one-line help)
COMMANDS: List[Tuple[str, str, str]] = [
    ("demo", "fastlive.tools.demo", "fail peers in every way and show which method sees what"),
    ("netns-sweep", "fastlive.tools.netns",
     "delete network namespaces left behind by killed fastlive test runs"),
    ("census", "fastlive.tools.census",
     "every TCP socket of the machine from one kernel dump (--follow: the death log)"),
    ("top", "fastlive.tools.top", "live view of the machine's TCP connections, suspect ones first"),
    ("client", "fastlive.tools.article", "the article's TCP client (takes over the process)"),
    ("server", "fastlive.tools.article", "the article's TCP server, one --method per section "
     "(takes over the process)"),
    ("exporter", "fastlive.tools.exporter", "serve /metrics for Prometheus: this machine's TCP census"),
]


def seconds_arg(name: str, lo: float, hi: float) -> Callable[[str], float]:
    """An argparse ``type`` for a duration in ``lo..hi`` seconds, checked by
    fastlive's one validator (finite, in range); argparse names the option."""
    def conv(text: str) -> float:
        try:
            value = seconds(name, float(text), maximum=hi)
            if value >= lo:
                return value
        except (TypeError, ValueError):
            pass
        raise argparse.ArgumentTypeError(f"must be a number of seconds in {lo:g}..{hi:g}, got {text!r}")
    return conv


def count_arg(name: str, lo: int, hi: int) -> Callable[[str], int]:
    """An argparse ``type`` for an integer in ``lo..hi``, checked by
    fastlive's one validator; argparse names the option."""
    def conv(text: str) -> int:
        try:
            return count(name, int(text), lo, hi)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be an integer in {lo}..{hi}, got {text!r}") from None
    return conv


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The top-level parser, one subparser per row of :data:`COMMANDS`
    (each subparser knows itself as ``args._parser``).  With ``command``,
    only that subcommand's module is imported to give its options (the
    others stay one line of help; ``""``: none is): ``fastlive census``
    does not load the demo's fault kit, nor ``fastlive --help`` anything at
    all.  ``None`` (the default) imports every one: the whole parser."""
    parser = argparse.ArgumentParser(
        prog="fastlive",
        description="Is the peer of a TCP connection still there? (Linux)")
    parser.add_argument("--version", action="version",
                        version=f"fastlive {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_ in COMMANDS:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module, _parser=p)
        if command is None or command == name:
            importlib.import_module(module).add_arguments(p)
    return parser


def _command_in(argv: List[str]) -> Optional[str]:
    """The subcommand ``argv`` names: the first word that is not an option
    (the top level has no option that takes a value); None when there is
    none, or it is not a command (argparse then reports it)."""
    for word in argv:
        if word == "--":
            return None
        if not word.startswith("-"):
            return word if any(word == c[0] for c in COMMANDS) else None
    return None


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the
    exit status (2 for usage errors, which argparse reports and exits on)."""
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(_command_in(argv) or "")
    args, extra = parser.parse_known_args(argv)
    sub: Optional[argparse.ArgumentParser] = getattr(args, "_parser", None)
    if extra:
        # argparse hands a subcommand's unknown options up to the top
        # parser; report them with the subcommand's usage instead.
        (sub or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if sub is None:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into head & co.
        sys.stderr.close()
        return 0
