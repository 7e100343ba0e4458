"""``fastlive exporter``: a node-level Prometheus endpoint for one machine
(or one network namespace) - a row of :data:`fastlive.tools.cli.COMMANDS`.

Serves ``/metrics`` (the text format, or OpenMetrics when the scraper asks
for it): each scrape takes one census of the namespace's TCP sockets (a
``sock_diag`` dump, tallied in C; see :mod:`fastlive.metrics.prometheus`).
The listening socket is opened first, in the exporter's own namespace;
with ``--netns NAME`` the process then enters that namespace (setns(2),
needs CAP_SYS_ADMIN), so the census reports NAME while scrapes still
arrive where the exporter was started.
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import os
import signal
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, Optional, Tuple

__all__ = ["add_arguments", "run", "parse_listen", "enter_netns", "DEFAULT_LISTEN"]

#: Loopback only unless told otherwise.
DEFAULT_LISTEN = "127.0.0.1:9469"
_CLONE_NEWNET = 0x40000000


def parse_listen(text: str) -> Tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` as (host, port); ValueError naming
    ``--listen`` otherwise."""
    if not isinstance(text, str):
        raise TypeError(f"--listen must be a string, not {type(text).__name__}")
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"--listen {text!r}: expected HOST:PORT (e.g. {DEFAULT_LISTEN})")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"--listen {text!r}: write an IPv6 address as [ADDR]:PORT")
    try:
        n = int(port, 10)
    except ValueError:
        raise ValueError(f"--listen {text!r}: port {port!r} is not a number") from None
    if not 0 <= n <= 65535:
        raise ValueError(f"--listen {text!r}: port must be in 0..65535")
    return host, n


def _netns_file(name: str) -> str:
    if "/" in name:
        return name                       # a path: /proc/PID/ns/net, /run/netns/X
    if not name or name in (".", ".."):
        raise ValueError(f"--netns {name!r}: not a namespace name")
    for base in ("/run/netns", "/var/run/netns"):
        path = os.path.join(base, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(errno.ENOENT, f"--netns {name!r}: no network namespace of that name "
                            "(looked in /run/netns and /var/run/netns; see `ip netns list`)")


def enter_netns(name: str) -> None:
    """Moves the calling thread (and the threads it starts later) into the
    network namespace ``name`` (a name under /run/netns, or a path such as
    /proc/PID/ns/net).  OSError with the reason when it cannot."""
    path = _netns_file(name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise OSError(e.errno, f"--netns {name!r}: cannot open {path}: {e.strerror}") from None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            why = os.strerror(err)
            if err == errno.EPERM:
                why += " (entering a network namespace needs CAP_SYS_ADMIN)"
            elif err == errno.EINVAL:
                why += f" ({path} is not a network namespace)"
            raise OSError(err, f"--netns {name!r}: setns: {why}")
    finally:
        os.close(fd)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fastlive exporter`` options."""
    parser.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                        help=f"where to serve /metrics (default {DEFAULT_LISTEN}; port 0: any "
                             "free port, printed at start)")
    parser.add_argument("--netns", default=None, metavar="NAME",
                        help="report this network namespace (a name of `ip netns list`, or a "
                             "path like /proc/PID/ns/net); needs CAP_SYS_ADMIN")
    parser.add_argument("--close-wait-top", type=int, default=10, metavar="K",
                        help="CLOSE_WAIT local ports reported one by one (0..1000, default 10); "
                             "the rest are summed as port=\"other\"")
    parser.add_argument("--no-tcp-info", action="store_true",
                        help="census without tcp_info: about a third cheaper, no suspect counts")
    parser.add_argument("--process", action="store_true",
                        help="also export this process's own engine metrics (normally none)")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")


def _handler(registry: Any, verbose: bool) -> type:
    from prometheus_client.exposition import choose_encoder

    class Handler(BaseHTTPRequestHandler):
        server_version = "fastlive-exporter"

        def do_GET(self) -> None:            # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                encoder, ctype = choose_encoder(self.headers.get("Accept", ""))
                try:
                    body = encoder(registry)
                except Exception as e:      # a collector failed: say so, keep serving
                    self._send(500, "text/plain; charset=utf-8",
                               f"fastlive exporter: scrape failed: {e}\n".encode())
                    return
                self._send(200, ctype, body)
            elif path == "/":
                self._send(200, "text/html; charset=utf-8",
                           b"<html><body><h1>fastlive exporter</h1>"
                           b"<a href=\"/metrics\">/metrics</a></body></html>\n")
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found; try /metrics\n")

        def _send(self, code: int, ctype: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            if verbose:
                super().log_message(format, *args)

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True


def _fail(msg: str, code: int = 1) -> int:
    print(f"fastlive exporter: {msg}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    """Serves /metrics until SIGTERM or Ctrl-C; 0, or 1/2 with a message on
    stderr when it cannot listen, enter the namespace or take a census."""
    try:
        from prometheus_client import CollectorRegistry
    except ImportError:
        return _fail("needs prometheus_client: pip install 'fastlive[prometheus]'")
    from ..metrics.prometheus import FastliveCollector

    try:
        host, port = parse_listen(args.listen)
        if not 0 <= args.close_wait_top <= 1000:
            raise ValueError(f"--close-wait-top must be in 0..1000, got {args.close_wait_top}")
    except ValueError as e:
        return _fail(str(e), 2)
    _Server.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        server = _Server((host, port), _handler(None, args.verbose))
    except OSError as e:
        return _fail(f"cannot listen on {args.listen}: {e.strerror or e}")
    collector: Optional[FastliveCollector] = None
    try:
        if args.netns is not None:
            try:
                enter_netns(args.netns)
            except OSError as e:
                return _fail(e.strerror or str(e), 2)
            except ValueError as e:
                return _fail(str(e), 2)
        collector = FastliveCollector(process=args.process, machine=True,
                                      close_wait_top=args.close_wait_top,
                                      tcp_info=not args.no_tcp_info)
        try:
            collector.probe()                 # fail now, not at the first scrape
        except OSError as e:
            return _fail(f"the kernel refused the sock_diag census: {e}")
        registry = CollectorRegistry(auto_describe=True)
        registry.register(collector)
        server.RequestHandlerClass = _handler(registry, args.verbose)
        bhost, bport = server.server_address[:2]
        bhost = bhost.decode() if isinstance(bhost, bytes) else str(bhost)
        where = f"[{bhost}]" if ":" in bhost else bhost
        ns = f" (network namespace {args.netns})" if args.netns else ""
        print(f"fastlive exporter: serving http://{where}:{bport}/metrics{ns}", flush=True)

        def _stop(signum: int, frame: Optional[FrameType]) -> None:
            threading.Thread(target=server.shutdown, daemon=True).start()

        old = signal.signal(signal.SIGTERM, _stop)
        try:
            server.serve_forever(poll_interval=0.5)
        finally:
            signal.signal(signal.SIGTERM, old)
        return 0
    finally:
        server.server_close()
        if collector is not None:
            collector.close()
