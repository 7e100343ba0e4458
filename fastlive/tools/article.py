"""The article's client and server programs, run from Python.

:func:`run_client` and :func:`run_server` call the C ports in
``csrc/article.c`` (reconstructed originals: ``tests/orig/``).  They are
programs, not checks, and **they take over the process**:

- they install C handlers for SIGINT ("Catch a exit signal", then
  ``exit(0)`` without running Python's cleanup) and SIGPIPE ("Catch a
  SIGPIPE signal"), replacing Python's own;
- they print with C stdio to file descriptor 1 (flushed line by line), not
  through ``sys.stdout``: redirecting ``sys.stdout`` in Python does not
  capture them;
- the server ``fork()``\\ s one child per connection from C, bypassing
  Python's fork handlers; children never come back into Python;
- by default (faithful mode) they never return.

Call them from the main thread of a process you hand over to them, as the
``fastlive client`` / ``fastlive server`` commands do.  With ``iterations``
or ``connections`` (bounded mode) or ``stop_on_death`` they do return, and
restore the previous SIGINT/SIGPIPE handlers first.

:func:`stop_matrix` runs the servers in stop mode in child processes, so
it is safe to call from any program (``fastlive demo``).

``stop_on_death`` turns the article's commented-out ``//return`` back on:
the loop ends when its method sees the peer gone, after printing one line
``stop: <method> noticed <what> after <s> s without a sign of life (...)``.
"""
from __future__ import annotations

import argparse
import ipaddress
import signal
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .._lib import check_rc, count, ffi, lib
from .cli import count_arg

__all__ = [
    "DEFAULT_HOST", "DEFAULT_PORT", "METHODS", "run_client", "run_server", "Noticed", "EVENTS",
    "stop_matrix", "add_arguments", "run",
]

INT_MAX = 0x7FFFFFFF
MAX_HEARTBEAT = 86400          # seconds of silence, section 6
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8888

#: Server variants, by the article's sections 1..6.
METHODS: Dict[str, int] = {
    "rw": lib.FL_ART_RW,
    "select": lib.FL_ART_SELECT,
    "tcpinfo": lib.FL_ART_TCPINFO,
    "keepalive": lib.FL_ART_KEEPALIVE,
    "rcvtimeo": lib.FL_ART_RCVTIMEO,
    "heartbeat": lib.FL_ART_HEARTBEAT,
}


def _opts(host: str, port: int, method: int = 0, *, stop_on_death: bool = False,
          iterations: int = 0, connections: int = 0,
          keepalive: Optional[Tuple[int, int, int]] = None, heartbeat: int = 0) -> Any:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise ValueError(f"host must be a dotted IPv4 address, got {host!r}") from None
    port = count("port", port, 1, 65535)
    iterations = count("iterations", iterations, 0, INT_MAX)      # 0 = forever
    connections = count("connections", connections, 0, INT_MAX)   # 0 = forever
    heartbeat = count("heartbeat", heartbeat, 0, MAX_HEARTBEAT)   # 0: the C default, 3 s
    if keepalive is not None:
        if not isinstance(keepalive, (tuple, list)) or len(keepalive) != 3:
            raise TypeError(f"keepalive must be (idle, interval, count), got {keepalive!r}")
        keepalive = (count("keepalive idle", keepalive[0], 1, 32767),
                     count("keepalive interval", keepalive[1], 1, 32767),
                     count("keepalive count", keepalive[2], 1, 127))
    host_c = ffi.new("char[]", host.encode())
    o = ffi.new("struct fl_article_opts *")
    o.host = host_c
    o.port = port
    o.method = method
    o.stop_on_death = 1 if stop_on_death else 0
    o.iterations = iterations
    o.connections = connections
    if keepalive is not None:
        o.keepalive_idle_s, o.keepalive_intvl_s, o.keepalive_cnt = keepalive
    o.heartbeat_s = heartbeat
    return o, host_c  # keep host_c alive as long as o


def _flush_python_streams() -> None:
    # Python's buffered output would otherwise come after (or, in a forked
    # child, twice around) what C prints to the same fd.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError, OSError):
            pass


def run_client(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
               stop_on_death: bool = False, iterations: int = 0) -> int:
    """Run the article's client loop: write ``b"I am client\\0"`` (12 bytes),
    read the reply, print, sleep one second; forever unless bounded.

    Takes over the process (see the module docstring).  The connect() is
    unchecked, as in the article: a refused connection shows up as write
    and read errors.  Returns 0; raises ``OSError`` if the socket could not
    be created, ``ValueError`` for a bad host/port.
    """
    o, _keep = _opts(host, port, stop_on_death=stop_on_death, iterations=iterations)
    _flush_python_streams()
    return check_rc(lib.fl_article_client(o))


def run_server(method: str = "rw", host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
               stop_on_death: bool = False, iterations: int = 0, connections: int = 0,
               keepalive: Tuple[int, int, int] = (10, 1, 3), heartbeat: int = 3) -> int:
    """Run the article's server: bind (SO_REUSEADDR), listen (backlog 2),
    fork one child per connection that runs ``method``'s loop.

    ``method``: ``rw`` (section 1), ``select`` (2), ``tcpinfo`` (3),
    ``keepalive`` (4; ``keepalive`` = (idle, interval, count) seconds),
    ``rcvtimeo`` (5; 10.2 s, as the article), ``heartbeat`` (6; ``heartbeat``
    seconds of silence mean gone).  Takes over the process (see the module
    docstring); with ``connections`` > 0 it returns after that many
    connections' children have ended (so bound them with ``iterations`` or
    ``stop_on_death``).  Raises ``OSError`` when bind/listen fail (after the
    article's "bind error" line), ``ValueError`` for bad arguments.
    """
    try:
        m = METHODS[method]
    except KeyError:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}") from None
    o, _keep = _opts(host, port, m, stop_on_death=stop_on_death, iterations=iterations,
                     connections=connections, keepalive=keepalive, heartbeat=heartbeat)
    _flush_python_streams()
    return check_rc(lib.fl_article_server(o))


# ---- stop mode, safely: each server in its own process ----------------------

@dataclass(frozen=True)
class Noticed:
    """What one server method noticed (stop mode) after one peer event."""
    method: str
    event: str                 #: "close" (FIN), "reset" (RST) or "quiet" (stays silent)
    noticed: Optional[str]     #: the stop line's "what", None if nothing within the wait
    after_s: Optional[float]   #: seconds from the event until the server had stopped
    transcript: str            #: everything the server printed


EVENTS = ("close", "reset", "quiet")


def _one_stop(method: str, event: str, wait: float, keepalive: Tuple[int, int, int],
              heartbeat: int) -> Noticed:
    import os
    import socket
    import struct
    import subprocess
    import time

    from ..testing._spawn import python_argv

    env = dict(os.environ)
    env.pop("PYTHONUNBUFFERED", None)
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind((DEFAULT_HOST, 0))
        port = probe.getsockname()[1]
    argv = [*python_argv("fastlive.tools.cli"), "server", "--method", method, "--port", str(port),
            "--stop-on-death", "--connections", "1", "--keepalive", *map(str, keepalive),
            "--heartbeat", str(heartbeat)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, env=env)
    sock = None
    try:
        deadline = time.monotonic() + 10
        while sock is None:
            try:
                sock = socket.create_connection((DEFAULT_HOST, port), timeout=5)
            except ConnectionRefusedError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
        sock.sendall(b"I am client\0")
        if method != "tcpinfo":  # the only loop that never replies
            got = b""
            while len(got) < 12:
                chunk = sock.recv(12 - len(got))
                if not chunk:
                    break
                got += chunk
        t_event = time.monotonic()
        if event == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if event != "quiet":
            sock.close()
            sock = None
        try:
            out, _ = proc.communicate(timeout=wait)  # --connections 1: exits after the child
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate(timeout=5)
        text = out.decode(errors="replace")
        for line in text.splitlines():
            if line.startswith("stop: ") and " noticed " in line:
                what = line.split(" noticed ", 1)[1].rsplit(" after ", 1)[0]
                return Noticed(method, event, what, time.monotonic() - t_event, text)
        return Noticed(method, event, None, None, text)
    finally:
        if sock is not None:
            sock.close()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)


def stop_matrix(methods: Sequence[str] = tuple(METHODS), events: Sequence[str] = EVENTS,
                wait: float = 4.0, keepalive: Tuple[int, int, int] = (1, 1, 2),
                heartbeat: int = 1) -> List[Noticed]:
    """Run each server method in stop mode, in its own process on 127.0.0.1
    (so the caller's process is NOT taken over), against a scripted peer that
    exchanges one message and then closes, resets or goes quiet; report what
    each method noticed and after how long (``None``: nothing within
    ``wait`` seconds, e.g. rcvtimeo's 10.2 s, or keepalive on loopback,
    where the peer's kernel answers every probe).  All rows run at once."""
    import concurrent.futures

    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}")
    for e in events:
        if e not in EVENTS:
            raise ValueError(f"unknown event {e!r}")
    pairs = [(m, e) for m in methods for e in events]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(pairs))) as pool:
        futs = [pool.submit(_one_stop, m, e, wait, keepalive, heartbeat) for m, e in pairs]
        return [f.result() for f in futs]


# ---- the `fastlive client` / `fastlive server` commands ------------------

def _is_server(parser: argparse.ArgumentParser) -> bool:
    return parser.prog.split()[-1] == "server"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``fastlive client`` or ``fastlive server`` (by the
    parser's prog), each number checked by its argparse type."""
    server = _is_server(parser)
    if server:
        parser.add_argument("--method", choices=list(METHODS), default="rw",
                            help="the article's section: rw (1), select (2), tcpinfo (3), "
                                 "keepalive (4), rcvtimeo (5), heartbeat (6); default rw")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"IPv4 address to {'listen on' if server else 'connect to'} "
                             f"(default {DEFAULT_HOST})")
    parser.add_argument("--port", type=count_arg("--port", 1, 65535), default=DEFAULT_PORT,
                        help=f"TCP port (default {DEFAULT_PORT})")
    parser.add_argument("--stop-on-death", action="store_true",
                        help="return when the method sees the peer gone (the article's "
                             "commented-out return) and say what it saw, after how long")
    parser.add_argument("--iterations", type=count_arg("--iterations", 0, INT_MAX), default=0,
                        metavar="N",
                        help="bounded mode: N passes per connection (default 0: forever)")
    if server:
        parser.add_argument("--connections", type=count_arg("--connections", 0, INT_MAX),
                            default=0, metavar="N",
                            help="bounded mode: serve N connections, wait for them, exit "
                                 "(default 0: forever)")
        parser.add_argument("--keepalive", type=count_arg("--keepalive", 1, 32767), nargs=3,
                            default=[10, 1, 3],
                            metavar=("IDLE", "INTVL", "CNT"),
                            help="method keepalive: TCP_KEEPIDLE, TCP_KEEPINTVL (s), "
                                 "TCP_KEEPCNT (default 10 1 3)")
        parser.add_argument("--heartbeat", type=count_arg("--heartbeat", 1, MAX_HEARTBEAT),
                            default=3, metavar="S",
                            help="method heartbeat: seconds without data that mean the "
                                 "peer is gone (default 3)")
    parser.set_defaults(_article_role="server" if server else "client")


def run(args: argparse.Namespace) -> int:
    """Hand the process to the article's client or server; 255 when its
    setup failed (the original's ``return -1``), else 0."""
    try:
        if args._article_role == "server":
            run_server(args.method, args.host, args.port, stop_on_death=args.stop_on_death,
                       iterations=args.iterations, connections=args.connections,
                       keepalive=tuple(args.keepalive), heartbeat=args.heartbeat)
        else:
            run_client(args.host, args.port, stop_on_death=args.stop_on_death,
                       iterations=args.iterations)
    except (TypeError, ValueError) as exc:
        parser = getattr(args, "_parser", None)
        if parser is not None:
            parser.error(str(exc))    # usage and "fastlive server: error: ...", exit 2
        print(f"fastlive {args._article_role}: {exc}", file=sys.stderr)
        return 2
    except OSError:
        return 255  # the original's "return -1;" after "bind error" & co.
    return 0
