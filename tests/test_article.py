"""The article's programs: the reconstructed originals (tests/orig/*.c, built
here with gcc into a temporary directory) against the C ports
(``fastlive client`` / ``fastlive server --method ...``).

- Interop both ways: the port's client against the original server, the
  original client against the port's server.
- Transcripts: for the same scripted events (peer closes, peer resets, peer
  SIGKILLed, peer quiet, server stopped / killed, connection refused) the
  port prints exactly the bytes the original prints.
- Stop mode and bounded mode of the port; fds beyond FD_SETSIZE; a
  silently dead peer in a network namespace (root only).

How the runs are made comparable:
- stdout of the originals is fully buffered when it is a pipe, so they run
  under ``stdbuf -oL`` (line-buffered stdio, inherited by the forked
  children); the port is run WITHOUT it: it flushes each line itself, and
  the tests wait for its lines live, so a port that did not flush fails.
- Every loop sleeps 1 s per pass.  Each run is timed from its own first
  line (t0): events are made right after a reply (the program is then in
  its sleep(1)) or half-way between two passes, and the server is stopped
  with SIGINT to its process group half-way between two passes, so the
  original and the port go through the same passes.
- Two races are taken out, because they are races, not differences: the
  server's group is SIGSTOPped until the peer's first message is queued on
  the not yet accepted connection (else select's 10 ms look may come first),
  and select's peer answers each reply at once (the original client sleeps
  1 s, as the server does, and may miss the 10 ms window under load).
- All runs happen at once in a thread pool (session fixture), so the file
  takes about as long as its longest run (~13 s: SO_RCVTIMEO is 10.2 s).
- Every program runs in its own session (process group), on a port that was
  free a moment before (bind to port 0), with timeouts everywhere, and its
  group is SIGKILLed in a finally.  Traffic stays on 127.0.0.1.
"""
from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pytest

from fastlive.tools import article
from fastlive.testing import NetnsPair, netns_unavailable

ROOT = Path(__file__).resolve().parent.parent
ORIG = ROOT / "tests" / "orig"
HOST = "127.0.0.1"
MSG = b"I am client\0"
REPLY = b"I am server\0"
EXIT = b"Catch a exit signal\n"
# Subprocesses import the same fastlive as this test (source tree or install).
PKG_PARENT = str(Path(article.__file__).resolve().parent.parent)
ENV = dict(os.environ, PYTHONPATH=PKG_PARENT + os.pathsep + os.environ.get("PYTHONPATH", ""))
# PYTHONUNBUFFERED makes Python set the C stdout unbuffered too; without it
# the C stdout on a pipe is fully buffered, so the port must flush itself.
ENV.pop("PYTHONUNBUFFERED", None)

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only"),
    # timed against the native originals (1 s passes, events half-way), all
    # runs at once: emulated ports miss those windows on a 2-core host
    pytest.mark.timed("transcripts are timed against the native C originals; "
                      "emulated processes miss the 1 s windows"),
]


# ---- processes -----------------------------------------------------------

class Proc:
    """A program in its own process group; its stdout lines with arrival times."""

    def __init__(self, argv: List[str]):
        self.argv = argv
        self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, start_new_session=True,
                                  cwd=str(ROOT), env=ENV)
        self.lines: List[Tuple[float, bytes]] = []
        self.eof = False
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in iter(self.p.stdout.readline, b""):
            with self.cond:
                self.lines.append((time.monotonic(), line))
                self.cond.notify_all()
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    @property
    def output(self) -> bytes:
        with self.cond:
            return b"".join(line for _, line in self.lines)

    def wait_line(self, needle: bytes = b"", n: int = 1, timeout: float = 20.0) -> float:
        """Arrival time of the n-th line containing needle."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                hits = [t for t, line in self.lines if needle in line]
                if len(hits) >= n:
                    return hits[n - 1]
                left = deadline - time.monotonic()
                if left <= 0 or self.eof:
                    raise AssertionError(
                        f"{self.argv}: no {n}x {needle!r} within {timeout} s; got {self.output!r}")
                self.cond.wait(left)

    def send_signal(self, sig: int) -> None:
        try:
            os.killpg(self.p.pid, sig)
        except ProcessLookupError:
            pass

    def finish(self, sig: Optional[int] = signal.SIGINT, timeout: float = 5.0) -> bytes:
        """Send sig to the group (None: just wait), wait for exit and EOF."""
        if sig is not None:
            self.send_signal(sig)
        self.p.wait(timeout=timeout)
        self.reader.join(timeout=timeout)
        return self.output

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
        try:
            self.p.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass
        self.reader.join(timeout=2)
        self.p.stdout.close()


def free_ports(n: int) -> List[int]:
    """n distinct ports that were free just now (all bound at once, then closed)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _server_side_rows(port: int) -> List[Tuple[str, int]]:
    """(state, recv-queue bytes) of the sockets whose local port is port.

    Asks the kernel through ss's filter (sock_diag): /proc/net/tcp can hold
    tens of thousands of rows when other tests run, too slow to poll."""
    if shutil.which("ss"):
        args = ["ss", "-tanH", f"( sport = :{port} )"]
        out = subprocess.run(args, capture_output=True, text=True, timeout=10).stdout
        rows = []
        for line in out.splitlines():
            f = line.split()
            if len(f) >= 2 and f[1].isdigit():
                rows.append((f[0], int(f[1])))
        return rows
    want = f":{port:04X} "
    rows = []
    with open("/proc/net/tcp") as f:
        for row in f.readlines()[1:]:
            fields = row.split()
            if (fields[1] + " ").endswith(want):
                state = {"0A": "LISTEN", "01": "ESTAB"}.get(fields[3], fields[3])
                rows.append((state, int(fields[4].split(":")[1], 16)))
    return rows


def wait_listening(port: int, timeout: float = 20.0, proc: Optional[Proc] = None) -> None:
    """Until something LISTENs on port (asked of the kernel: a probe
    connection would start a session on the server); fails at once if proc,
    the server, has exited (e.g. "bind error")."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(state == "LISTEN" for state, _ in _server_side_rows(port)):
            return
        if proc is not None and proc.p.poll() is not None:
            raise AssertionError(f"{proc.argv} exited with {proc.p.returncode}: {proc.output!r}")
        time.sleep(0.02)
    raise AssertionError(f"nothing listens on {port} after {timeout} s")


def wait_queued(port: int, nbytes: int, timeout: float = 20.0) -> None:
    """Until a connection to port (server side) holds nbytes unread."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(state == "ESTAB" and q >= nbytes for state, q in _server_side_rows(port)):
            return
        time.sleep(0.01)
    raise AssertionError(f"no connection to {port} with {nbytes} bytes queued")


def first_message_while_stopped(srv: Proc, port: int, start: Callable[[], object]) -> object:
    """Stop the server's group, start the peer, let its first message land in
    the not yet accepted connection, continue.  Without this the select loop
    (10 ms timeout) may look before the message arrives and print one more
    "select error" line: a race, not a difference between the programs."""
    srv.send_signal(signal.SIGSTOP)
    try:
        peer = start()
        wait_queued(port, len(MSG))
    finally:
        srv.send_signal(signal.SIGCONT)
    return peer


def _scripted_peer(port: int) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=20)
    sock.sendall(MSG)
    return sock


def sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def collapse(out: bytes) -> List[bytes]:
    """Lines with runs of identical lines folded to one."""
    lines = out.splitlines(keepends=True)
    return [line for i, line in enumerate(lines) if i == 0 or line != lines[i - 1]]


# ---- the programs ----------------------------------------------------------

ORIG_SERVER = {"rw": "server_tcp", "select": "server_select",
               "tcpinfo": "server_tcpinfo", "rcvtimeo": "server_rcvtimeo"}


def orig(bins: Dict[str, str], name: str, port: int) -> List[str]:
    return ["stdbuf", "-oL", bins[name], HOST, str(port)]


def port_server(method: str, port: int, *extra: str) -> List[str]:
    return [sys.executable, "-m", "fastlive", "server", "--method", method,
            "--port", str(port), *extra]


def port_client(port: int, *extra: str) -> List[str]:
    return [sys.executable, "-m", "fastlive", "client", "--port", str(port), *extra]


# ---- scenarios ---------------------------------------------------------------

def peer_event(event: str, sock: Optional[socket.socket], peer: Optional[Proc]) -> None:
    if event == "close":
        sock.close()
    elif event == "reset":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    elif event == "kill":
        peer.send_signal(signal.SIGKILL)
    elif event != "quiet":
        raise ValueError(event)


#: A peer process for "kill": sends, and sends again as soon as each reply
#: is in; prints like the original client; then waits to be killed.
SCRIPTED_PEER = f"""
import socket, sys, time
s = socket.create_connection(({HOST!r}, int(sys.argv[1])), timeout=20)
s.sendall({MSG!r})
for i in range(2):
    got = b""
    while len(got) < {len(REPLY)}:
        chunk = s.recv({len(REPLY)} - len(got))
        if not chunk:
            sys.exit(1)
        got += chunk
    if i == 0:
        s.sendall({MSG!r})
    print("recv Data: " + got.rstrip(b"\\0").decode(), flush=True)
time.sleep(60)
"""


def server_run(argv: List[str], method: str, event: str, port: int,
               bins: Dict[str, str], stop_after: Optional[float] = None) -> Dict[str, object]:
    """One server, one peer, one event; the server's full transcript.

    Peer: the original client for "kill" (SIGKILLed), else a scripted
    socket that sends "I am client\\0" and waits for each reply.
    """
    procs: List[Proc] = []
    sock = None
    res: Dict[str, object] = {}
    try:
        srv = Proc(argv)
        procs.append(srv)
        wait_listening(port, proc=srv)
        peer = None
        if event == "kill":
            # The original client sleeps 1 s between writes, as the server
            # does: against select's 10 ms window that is a race, so select's
            # peer is a scripted process that answers each reply at once.
            peer_argv = (orig(bins, "client_tcp", port) if method != "select"
                         else [sys.executable, "-c", SCRIPTED_PEER, str(port)])
            peer = first_message_while_stopped(
                srv, port, lambda: procs.append(Proc(peer_argv)) or procs[-1])
        else:
            sock = first_message_while_stopped(srv, port, lambda: _scripted_peer(port))
        t0 = srv.wait_line()
        replies = []
        if method == "tcpinfo":  # never replies: event half-way between passes
            sleep_until(t0 + 1.5)
            peer_event(event, sock, peer)
            stop = t0 + 3.5
        else:
            exchanges = 1 if event == "quiet" else 2
            if sock is not None:
                for i in range(exchanges):
                    replies.append(recv_exact(sock, len(REPLY)))
                    if i + 1 < exchanges:
                        sock.sendall(MSG)
            else:
                peer.wait_line(b"recv Data", exchanges)
            peer_event(event, sock, peer)  # the server sleeps until t0 + exchanges
            stop = t0 + (exchanges + 2.5 if event != "quiet" else 2.5)
        if stop_after is not None:
            stop = t0 + stop_after
        sleep_until(stop)
        res["out"] = srv.finish(signal.SIGINT)
        res["rc"] = srv.p.returncode
        res["replies"] = replies
        if peer is not None:
            res["peer_out"] = peer.output
        return res
    finally:
        if sock is not None:
            sock.close()
        for p in procs:
            p.kill()


def client_run(argv: List[str], event: str, port: int,
               bins: Dict[str, str]) -> Dict[str, object]:
    """One client against the original server_tcp, which is then stopped
    (SIGINT to its group), killed (SIGKILL), or never started (refused)."""
    procs: List[Proc] = []
    res: Dict[str, object] = {}
    try:
        srv = None
        if event != "refused":
            srv = Proc(orig(bins, "server_tcp", port))
            procs.append(srv)
            wait_listening(port, proc=srv)
        cli = Proc(argv)
        procs.append(cli)
        t0 = cli.wait_line()
        if srv is not None:
            cli.wait_line(b"recv Data", 2)  # the client sleeps until t0 + 2
            res["server_out"] = srv.finish(signal.SIGINT if event == "stopped" else signal.SIGKILL)
            stop = t0 + 4.5
        else:
            stop = t0 + 2.5
        sleep_until(stop)
        res["out"] = cli.finish(signal.SIGINT)
        res["rc"] = cli.p.returncode
        return res
    finally:
        for p in procs:
            p.kill()


def stop_run(argv: List[str], method: str, event: str, port: int,
             wait_for: bytes) -> Dict[str, object]:
    """Port server in stop mode: scripted peer, one exchange (none for
    tcpinfo), the event, then wait for the stop line."""
    procs: List[Proc] = []
    sock = None
    try:
        srv = Proc(argv)
        procs.append(srv)
        wait_listening(port, proc=srv)
        sock = first_message_while_stopped(srv, port, lambda: _scripted_peer(port))
        t0 = srv.wait_line()
        if method == "tcpinfo":
            sleep_until(t0 + 0.5)
        else:
            recv_exact(sock, len(REPLY))
        peer_event(event, sock, None)
        t_stop = srv.wait_line(wait_for, timeout=8)
        sleep_until(t_stop + 1.5)  # would the child go on?
        out = srv.finish(signal.SIGINT)
        return {"out": out, "rc": srv.p.returncode}
    finally:
        if sock is not None:
            sock.close()
        for p in procs:
            p.kill()


def client_stop_run(bins: Dict[str, str], port: int) -> Dict[str, object]:
    """Port client in stop mode; the original server is SIGKILLed."""
    procs: List[Proc] = []
    try:
        srv = Proc(orig(bins, "server_tcp", port))
        procs.append(srv)
        wait_listening(port, proc=srv)
        cli = Proc(port_client(port, "--stop-on-death"))
        procs.append(cli)
        cli.wait_line(b"recv Data", 2)
        srv.finish(signal.SIGKILL)
        out = cli.finish(None, timeout=10)  # returns by itself
        return {"out": out, "rc": cli.p.returncode}
    finally:
        for p in procs:
            p.kill()


def bounded_run(bins: Dict[str, str], port: int) -> Dict[str, object]:
    """run_server() in bounded mode returns by itself; the original client
    is the peer."""
    code = ("import sys; from fastlive.tools.article import run_server; "
            f"rc = run_server('rw', '{HOST}', {port}, connections=1, iterations=2); "
            "print('returned', rc, flush=True)")
    procs: List[Proc] = []
    try:
        srv = Proc([sys.executable, "-c", code])
        procs.append(srv)
        wait_listening(port, proc=srv)
        cli = Proc(orig(bins, "client_tcp", port))
        procs.append(cli)
        out = srv.finish(None, timeout=8)
        return {"out": out, "rc": srv.p.returncode, "peer_out": cli.output}
    finally:
        for p in procs:
            p.kill()


def wire_run(port: int) -> Dict[str, object]:
    """The port's client against a scripted server: the bytes and their pace."""
    procs: List[Proc] = []
    with socket.create_server((HOST, port)) as lst:
        lst.settimeout(20)  # as wait_listening: many interpreters start at once
        try:
            cli = Proc(port_client(port))
            procs.append(cli)
            conn, _ = lst.accept()
            with conn:
                conn.settimeout(10)
                got, times = [], []
                for _ in range(3):
                    got.append(recv_exact(conn, len(MSG)))
                    times.append(time.monotonic())
                    conn.sendall(REPLY)
                extra = b""
                conn.setblocking(False)
                try:
                    extra = conn.recv(100)
                except BlockingIOError:
                    pass
                out = cli.finish(signal.SIGINT)
            return {"got": got, "times": times, "extra": extra, "out": out,
                    "rc": cli.p.returncode}
        finally:
            for p in procs:
                p.kill()


def highfd_run(port: int) -> Dict[str, object]:
    """The port's select and heartbeat loops on a connection whose fd is
    above FD_SETSIZE (where the original's FD_SET writes out of bounds):
    bounded mode, a scripted peer paced by the replies."""
    code = ("import os, sys; from fastlive.tools.article import run_server\n"
            "hold = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]\n"
            "probe = os.dup(0); os.close(probe)\n"
            "print('lowest free fd', probe, flush=True)\n"
            "method = sys.argv[1]\n"
            f"rc = run_server(method, '{HOST}', {port}, connections=1, iterations=3)\n"
            "print('returned', rc, flush=True)\n")
    res: Dict[str, object] = {}
    for method in ("select", "heartbeat"):
        procs: List[Proc] = []
        sock = None
        try:
            srv = Proc([sys.executable, "-c", code, method])
            procs.append(srv)
            wait_listening(port, proc=srv)
            sock = first_message_while_stopped(srv, port, lambda: _scripted_peer(port))
            for i in range(3):
                assert recv_exact(sock, len(REPLY)) == REPLY
                if i < 2:
                    sock.sendall(MSG)
            res[method] = srv.finish(None, timeout=8)
            res[method + "_rc"] = srv.p.returncode
        finally:
            if sock is not None:
                sock.close()
            for p in procs:
                p.kill()
    return res


def stdout_closed_run(port: int) -> Dict[str, object]:
    """The port's client (connection refused: a line every second) whose
    stdout reader goes away: it must neither die nor spin in its SIGPIPE
    handler (the line-buffered original spins).  Both stdio set-ups: C
    stdout fully buffered, and unbuffered (PYTHONUNBUFFERED)."""
    res: Dict[str, object] = {}
    for unbuffered in (False, True):
        env = dict(ENV)
        if unbuffered:
            env["PYTHONUNBUFFERED"] = "1"
        p = subprocess.Popen(port_client(port), stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             start_new_session=True, cwd=str(ROOT), env=env)
        try:
            import select as _select
            ready, _, _ = _select.select([p.stdout], [], [], 20)
            first = p.stdout.readline() if ready else b""
            p.stdout.close()
            time.sleep(1.5)  # the next pass prints into the closed pipe
            states = []
            for _ in range(20):
                with open(f"/proc/{p.pid}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
                time.sleep(0.05)
            alive = p.poll() is None
            os.killpg(p.pid, signal.SIGINT)
            rc = p.wait(timeout=10)
            res[unbuffered] = {"first": first, "states": "".join(states),
                               "alive": alive, "rc": rc}
        finally:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=10)
    return res


def _group_members(pgid: int) -> List[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":  # pgrp, not a zombie
                pids.append(int(entry))
    return pids


def process_run(port: int) -> Dict[str, object]:
    """The port server's process model: backlog 2 (ss shows it as the
    listener's Send-Q), one child per connection, and SO_REUSEADDR (a second
    server binds while the first one's connection sits in TIME_WAIT)."""
    res: Dict[str, object] = {}
    procs: List[Proc] = []
    socks: List[socket.socket] = []
    try:
        srv = Proc(port_server("rw", port))
        procs.append(srv)
        wait_listening(port, proc=srv)
        out = subprocess.run(["ss", "-ltnH", f"( sport = :{port} )"], capture_output=True,
                             text=True, timeout=10).stdout if shutil.which("ss") else ""
        res["backlog"] = int(out.split()[2]) if out.split() else None
        for _ in range(2):
            socks.append(first_message_while_stopped(srv, port, lambda: _scripted_peer(port)))
        for sock in socks:
            res.setdefault("replies", []).append(recv_exact(sock, len(REPLY)))
        res["group"] = len(_group_members(srv.p.pid))  # parent + one child each
        srv.finish(signal.SIGINT)  # the server closes first ...
        for sock in socks:
            sock.close()  # ... then the peer: the server's side goes TIME_WAIT
        socks.clear()
        res["time_wait"] = 0
        deadline = time.monotonic() + 5
        while shutil.which("ss") and not res["time_wait"] and time.monotonic() < deadline:
            rows = subprocess.run(["ss", "-tanH", "state", "time-wait", f"( sport = :{port} )"],
                                  capture_output=True, text=True, timeout=10).stdout
            res["time_wait"] = len(rows.splitlines())
            time.sleep(0.02)
        again = Proc(port_server("rw", port))
        procs.append(again)
        wait_listening(port, proc=again)
        res["rebind_out"] = again.finish(signal.SIGINT)
        res["rebind_rc"] = again.p.returncode
        return res
    finally:
        for sock in socks:
            sock.close()
        for p in procs:
            p.kill()


def _listening_in(pid: int, port: int, timeout: float = 10.0) -> None:
    """wait_listening, in the network namespace of process pid."""
    want = f":{port:04X} "
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/net/tcp") as f:
                rows = f.readlines()[1:]
        except OSError:
            rows = []
        for row in rows:
            fields = row.split()
            if (fields[1] + " ").endswith(want) and fields[3] == "0A":
                return
        time.sleep(0.02)
    raise AssertionError(f"nothing listens on {port} in the netns of {pid}")


def netns_run(bins: Dict[str, str], ports: List[int]) -> Dict[str, object]:
    """A silently dead peer: servers in namespace A, the peer in namespace B
    (fastlive.testing.NetnsPair: a veth pair between namespaces made here);
    the peer's link is set down while the peer process lives on.  Runs the
    original and the port of section 3 (TCP_INFO) and the port of section 4
    (keepalive 1 s / 1 s / 2, stop mode).
    """
    reason = netns_unavailable()
    if reason:
        return {"skip": f"needs network namespaces for a silently dead peer: {reason}"}
    procs: List[Proc] = []
    with NetnsPair() as pair:
        try:
            ns_a, ns_b = pair.ns_a, pair.ns_b
            ns_server = pair.addr_a
            in_a = ["ip", "netns", "exec", ns_a]
            p_orig, p_port, p_ka = ports[:3]
            servers = {
                "tcpinfo-orig": (Proc(in_a + ["stdbuf", "-oL", bins["server_tcpinfo"],
                                              ns_server, str(p_orig)]), p_orig),
                "tcpinfo-port": (Proc(in_a + [sys.executable, "-m", "fastlive", "server",
                                              "--method", "tcpinfo", "--host", ns_server,
                                              "--port", str(p_port)]), p_port),
                "keepalive-port": (Proc(in_a + [sys.executable, "-m", "fastlive", "server",
                                                "--method", "keepalive", "--keepalive", "1", "1", "2",
                                                "--stop-on-death", "--host", ns_server,
                                                "--port", str(p_ka)]), p_ka),
            }
            procs += [proc for proc, _ in servers.values()]
            for proc, port in servers.values():
                _listening_in(proc.p.pid, port)
            peer_code = (
                "import socket, sys, time\n"
                f"socks = [socket.create_connection(('{ns_server}', p), timeout=5) "
                f"for p in ({p_orig}, {p_port}, {p_ka})]\n"
                "for s in socks: s.sendall(b'I am client\\0')\n"
                "assert socks[2].recv(12) == b'I am server\\0'\n"
                "print('ready', flush=True)\n"
                "time.sleep(60)\n")
            peer = Proc(["ip", "netns", "exec", ns_b, sys.executable, "-c", peer_code])
            procs.append(peer)
            peer.wait_line(b"ready")
            t0 = {name: proc.wait_line() for name, (proc, _) in servers.items()}
            sleep_until(max(t0.values()) + 1.3)
            t_down = time.monotonic()
            pair.link_down()                                # the peer goes silent
            ka = servers["keepalive-port"][0]
            t_seen = ka.wait_line(b"read size = -1", timeout=15)
            res: Dict[str, object] = {"keepalive_after_down": t_seen - t_down}
            ka.wait_line(b"stop: ")
            for name in ("tcpinfo-orig", "tcpinfo-port"):
                proc = servers[name][0]
                sleep_until(max(t0[name] + 5.5, t_down + 3.5))
                res[name] = proc.finish(signal.SIGINT)
            res["keepalive-port"] = ka.finish(signal.SIGINT)
            res["peer_alive"] = peer.p.poll() is None
            return res
        finally:
            for proc in procs:
                proc.kill()


# ---- the session: build, then every run at once -------------------------------

SERVER_CASES = [("rw", "close"), ("rw", "reset"), ("rw", "kill"),
                ("select", "close"), ("select", "reset"), ("select", "kill"),
                ("select", "quiet"),
                ("tcpinfo", "close"), ("tcpinfo", "reset"), ("tcpinfo", "kill"),
                ("rcvtimeo", "quiet"), ("rcvtimeo", "close")]
CLIENT_CASES = ["stopped", "killed", "refused"]
# Sections 4 and 6 have no original: on these events their loops must print
# what section 1's original prints.
SAME_AS_RW = [("keepalive", "close"), ("heartbeat", "close"), ("keepalive", "kill")]


@pytest.fixture(scope="session")
def bins(tmp_path_factory) -> Dict[str, str]:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler (gcc) to build the article's programs")
    if shutil.which("stdbuf") is None:
        pytest.skip("stdbuf (coreutils) is needed to line-buffer the originals")
    out = tmp_path_factory.mktemp("orig")
    built = {}
    for src in sorted(ORIG.glob("*.c")):
        exe = out / src.stem
        # -w: the originals warn (int vs size_t, int* for socklen_t*): kept as written.
        subprocess.run([gcc, "-O2", "-w", "-o", str(exe), str(src)], check=True,
                       timeout=60, capture_output=True)
        built[src.stem] = str(exe)
    return built


@pytest.fixture(scope="session")
def runs(bins) -> Dict[tuple, Dict[str, object]]:
    """Every run of this file, all at once (they mostly sleep)."""
    jobs: List[Tuple[tuple, Callable[[int], Dict[str, object]]]] = []

    def server_job(method, event, kind, stop_after=None):
        def job(port):
            argv = (orig(bins, ORIG_SERVER[method], port) if kind == "orig"
                    else port_server(method, port))
            return server_run(argv, method, event, port, bins, stop_after)
        return job

    def client_job(event, kind):
        def job(port):
            argv = orig(bins, "client_tcp", port) if kind == "orig" else port_client(port)
            return client_run(argv, event, port, bins)
        return job

    def stop_job(method, event, *extra):
        def job(port):
            return stop_run(port_server(method, port, "--stop-on-death", *extra),
                            method, event, port, b"stop: ")
        return job

    # longest first (SO_RCVTIMEO is 10.2 s)
    for method, event in sorted(SERVER_CASES, key=lambda c: c != ("rcvtimeo", "quiet")):
        stop_after = 11.7 if (method, event) == ("rcvtimeo", "quiet") else None
        for kind in ("orig", "port"):
            jobs.append((("server", method, event, kind), server_job(method, event, kind, stop_after)))
    for method, event in SAME_AS_RW:
        jobs.append((("server", method, event, "port"), server_job(method, event, "port")))
    for event in CLIENT_CASES:
        for kind in ("orig", "port"):
            jobs.append((("client", event, kind), client_job(event, kind)))
    jobs.append((("stop", "rw", "close"), stop_job("rw", "close")))
    jobs.append((("stop", "select", "reset"), stop_job("select", "reset")))
    jobs.append((("stop", "tcpinfo", "reset"), stop_job("tcpinfo", "reset")))
    jobs.append((("stop", "heartbeat", "quiet"), stop_job("heartbeat", "quiet", "--heartbeat", "1")))
    jobs.append((("stop", "client"), lambda port: client_stop_run(bins, port)))
    jobs.append((("bounded",), lambda port: bounded_run(bins, port)))
    jobs.append((("wire",), wire_run))
    jobs.append((("highfd",), highfd_run))
    jobs.append((("stdout-closed",), stdout_closed_run))
    jobs.append((("process",), process_run))
    jobs.append((("matrix",), lambda _port: {"rows": article.stop_matrix(
        methods=("rw", "heartbeat"), events=("reset", "quiet"), wait=3.5)}))
    jobs.append((("netns",), None))

    def guarded(job, port):
        try:
            return job(port)
        except Exception as exc:  # reported by the test that reads it
            return {"error": repr(exc)}

    ports = free_ports(len(jobs) + 2)
    ns_ports = ports[-3:]  # the netns job's servers live in their own namespace
    jobs[-1] = (("netns",), lambda _port: netns_run(bins, ns_ports))
    results: Dict[tuple, Dict[str, object]] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {}
        for (key, job), port in zip(jobs, ports):
            futures[key] = pool.submit(guarded, job, port)
            time.sleep(0.05)  # spread the interpreters' start-up a little
        for key, fut in futures.items():
            results[key] = fut.result(timeout=60)
    return results


def result(runs, *key) -> Dict[str, object]:
    res = runs[tuple(key)]
    assert "error" not in res, f"{key}: {res['error']}"
    return res


# ---- transcripts: the port prints what the original prints ----------------

#: Lines each transcript must hold (so equal-but-empty cannot pass).
SERVER_EXPECT = {
    ("rw", "close"): [b"recv data:I am client \n" * 2 + b"read size = 0, error 0 \n",
                      b"Catch a SIGPIPE signal\nwrite data error size = -1, errno=32\n"],
    ("rw", "reset"): [b"recv data:I am client \n" * 2 + b"read size = -1, error 104 \n",
                      b"Catch a SIGPIPE signal\nwrite data error size = -1, errno=32\n"],
    ("rw", "kill"): [b"recv data:I am client \n" * 2 + b"read size = 0, error 0 \n",
                     b"Catch a SIGPIPE signal\nwrite data error size = -1, errno=32\n"],
    ("select", "close"): [b"l_s32Ret = 1 \nrecv data:I am client \n" * 2
                          + b"l_s32Ret = 1 \nread size = 0, error 0 \n"],
    ("select", "reset"): [b"l_s32Ret = 1 \nrecv data:I am client \n" * 2
                          + b"l_s32Ret = 1 \nread size = -1, error 104 \n"],
    ("select", "kill"): [b"l_s32Ret = 1 \nrecv data:I am client \n" * 2
                         + b"l_s32Ret = 1 \nread size = 0, error 0 \n"],
    ("select", "quiet"): [b"l_s32Ret = 1 \nrecv data:I am client \n"
                          b"select error l_s32Ret=0 errno=0\n"],
    ("tcpinfo", "close"): [b"info.tcpi_state = 1\nconnect ok \r\nconnect error\r\n\n\n",
                           b"info.tcpi_state = 8\nconnect error\r\n"],
    ("tcpinfo", "reset"): [b"info.tcpi_state = 1\nconnect ok \r\nconnect error\r\n\n\n",
                           b"info.tcpi_state = 7\nconnect error\r\n"],
    ("tcpinfo", "kill"): [b"info.tcpi_state = 1\nconnect ok \r\nconnect error\r\n\n\n",
                          b"info.tcpi_state = 8\nconnect error\r\n"],
    ("rcvtimeo", "quiet"): [b"recv data:I am client \nread size = -1, error 11 \n"],
    ("rcvtimeo", "close"): [b"recv data:I am client \n" * 2 + b"read size = 0, error 0 \n"],
}


@pytest.mark.parametrize("method,event", SERVER_CASES, ids=[f"{m}-{e}" for m, e in SERVER_CASES])
def test_server_transcript_equals_original(runs, method, event):
    o = result(runs, "server", method, event, "orig")
    p = result(runs, "server", method, event, "port")
    if event == "quiet" and method == "select":
        # ~9 "select error" lines a second: their count depends on timing,
        # so runs of identical lines are folded before comparing.
        assert collapse(p["out"]) == collapse(o["out"])
    else:
        assert p["out"].splitlines(keepends=True) == o["out"].splitlines(keepends=True)
    for chunk in SERVER_EXPECT[(method, event)]:
        assert chunk in o["out"], (chunk, o["out"])
    # SIGINT to the group: parent and child each print it and exit 0.
    assert o["out"].endswith(EXIT * 2) and o["rc"] == p["rc"] == 0
    # the bytes on the wire: the scripted peer got "I am server\0" from both
    assert o["replies"] == p["replies"]
    assert all(r == REPLY for r in o["replies"])


@pytest.mark.parametrize("method,event", SAME_AS_RW, ids=[f"{m}-{e}" for m, e in SAME_AS_RW])
def test_sections_4_and_6_loop_like_section_1(runs, method, event):
    """keepalive and heartbeat (no code in the article) run the section-1
    loop: on these events they print what the original server_tcp prints."""
    o = result(runs, "server", "rw", event, "orig")
    p = result(runs, "server", method, event, "port")
    assert p["out"].splitlines(keepends=True) == o["out"].splitlines(keepends=True)


CLIENT_EXPECT = {
    "stopped": [b"recv Data: I am server\n" * 2 + b"read data error size=0 errno=0 \n",
                b"Catch a SIGPIPE signal\nwrite data error size=-1 errno=32 \n"],
    "killed": [b"recv Data: I am server\n" * 2 + b"read data error size=0 errno=0 \n",
               b"Catch a SIGPIPE signal\nwrite data error size=-1 errno=32 \n"],
    "refused": [b"Catch a SIGPIPE signal\nwrite data error size=-1 errno=32 \n"
                b"read data error size=-1 errno=107 \n"],
}


@pytest.mark.parametrize("event", CLIENT_CASES)
def test_client_transcript_equals_original(runs, event):
    o = result(runs, "client", event, "orig")
    p = result(runs, "client", event, "port")
    assert p["out"].splitlines(keepends=True) == o["out"].splitlines(keepends=True)
    for chunk in CLIENT_EXPECT[event]:
        assert chunk in o["out"], (chunk, o["out"])
    assert o["out"].endswith(EXIT) and o["rc"] == p["rc"] == 0


# ---- interop both ways --------------------------------------------------------

def test_port_client_against_original_server(runs):
    res = result(runs, "client", "stopped", "port")
    assert res["out"].startswith(b"recv Data: I am server\n" * 2)
    assert res["server_out"].startswith(b"recv data:I am client \n" * 2)
    assert res["server_out"].endswith(EXIT * 2)


def test_original_client_against_port_server(runs):
    res = result(runs, "server", "rw", "kill", "port")
    assert res["peer_out"].startswith(b"recv Data: I am server\n" * 2)
    assert res["out"].startswith(b"recv data:I am client \n" * 2)


def test_port_client_bytes_and_pace(runs):
    res = result(runs, "wire")
    assert res["got"] == [MSG] * 3 and res["extra"] == b""
    gaps = [b - a for a, b in zip(res["times"], res["times"][1:])]
    assert all(g >= 0.9 for g in gaps), gaps  # sleep(1) between writes
    assert res["out"].startswith(b"recv Data: I am server\n" * 2) and res["rc"] == 0


# ---- beyond the original: stop mode, bounded mode -----------------------------

def _stop_lines(out: bytes) -> List[bytes]:
    return [line for line in out.splitlines() if line.startswith(b"stop: ")]


@pytest.mark.parametrize("method,event,before,noticed", [
    ("rw", "close", b"read size = 0, error 0 \n",
     b"stop: rw (read/write) noticed read() returned 0: the peer closed (FIN) after "),
    ("select", "reset", b"l_s32Ret = 1 \nread size = -1, error 104 \n",
     b"stop: select noticed read() failed (errno 104, Connection reset by peer) after "),
    ("tcpinfo", "reset", b"info.tcpi_state = 7\nconnect error\r\n",
     b"stop: tcpinfo (TCP_INFO) noticed tcpi_state = 7 (CLOSE) after "),
    ("heartbeat", "quiet", b"heartbeat timeout 1 s\n",
     b"stop: heartbeat noticed no heartbeat within the timeout after "),
])
def test_stop_mode_says_who_noticed_what(runs, method, event, before, noticed):
    res = result(runs, "stop", method, event)
    out = res["out"]
    (line,) = _stop_lines(out)
    assert line.startswith(noticed), line
    assert (before + line + b"\n") in out
    # the child returned: nothing after its stop line but the parent's SIGINT line
    assert out.endswith(line + b"\n" + EXIT) and res["rc"] == 0
    seconds = float(line.split(b" after ")[1].split()[0])
    assert 0 <= seconds < 10


def test_stop_mode_client_returns(runs):
    res = result(runs, "stop", "client")
    out = res["out"]
    assert res["rc"] == 0 and EXIT not in out  # returned by itself
    assert out.startswith(b"recv Data: I am server\n" * 2)
    (line,) = _stop_lines(out)
    assert out.endswith(b"read data error size=0 errno=0 \n" + line + b"\n")
    assert line.startswith(b"stop: client (read/write) noticed read() returned 0")


def test_bounded_run_server_returns(runs):
    res = result(runs, "bounded")
    assert res["rc"] == 0
    assert res["out"] == b"recv data:I am client \n" * 2 + b"returned 0\n"
    assert res["peer_out"].startswith(b"recv Data: I am server\n" * 2)


# ---- arguments (checked before anything takes the process over) -------------

def test_bad_arguments_raise_before_taking_over():
    with pytest.raises(ValueError):
        article.run_client("localhost", 8888)
    with pytest.raises(ValueError):
        article.run_client(HOST, 0)
    with pytest.raises(ValueError):
        article.run_server("nope", HOST, 8888)
    with pytest.raises(ValueError):
        article.run_server("rw", HOST, 8888, iterations=-1)


def test_cli_rows_and_defaults():
    from fastlive.tools import cli
    parser = cli.build_parser()
    a = parser.parse_args(["server", "--method", "tcpinfo"])
    assert (a.host, a.port, a.method, a.stop_on_death) == ("127.0.0.1", 8888, "tcpinfo", False)
    a = parser.parse_args(["client"])
    assert (a.host, a.port, a.iterations) == ("127.0.0.1", 8888, 0)
    with pytest.raises(SystemExit):
        parser.parse_args(["client", "--method", "rw"])


def test_silently_dead_peer(runs):
    """The peer's link goes down, the peer process lives on: TCP_INFO keeps
    saying ESTABLISHED (original and port alike); keepalive ends the read
    with ETIMEDOUT after idle + intvl * cnt of silence."""
    res = runs[("netns",)]
    if "skip" in res:
        pytest.skip(res["skip"])
    res = result(runs, "netns")
    o, p = res["tcpinfo-orig"], res["tcpinfo-port"]
    assert p.splitlines(keepends=True) == o.splitlines(keepends=True)
    assert o.count(b"alive s32SocketFd = ") >= 5
    assert o.count(b"info.tcpi_state = 1\nconnect ok \r\n") == o.count(b"alive s32SocketFd")
    assert o.endswith(EXIT * 2)
    ka = res["keepalive-port"]
    assert ka.startswith(b"recv data:I am client \nread size = -1, error 110 \n"
                         b"stop: keepalive (SO_KEEPALIVE) noticed read() failed "
                         b"(errno 110, Connection timed out) after "), ka
    print(f"keepalive 1/1/2 noticed the dead peer {res['keepalive_after_down']:.2f} s "
          f"after its link went down")
    assert res["peer_alive"]


def test_select_loops_beyond_fd_setsize(runs):
    """Connection fd > 1024: the port's select/heartbeat loops still work
    (poll() stands in for select(), same return values)."""
    res = result(runs, "highfd")
    for method in ("select", "heartbeat"):
        first, rest = res[method].split(b"\n", 1)
        assert int(first.split()[-1]) > 1024  # listening fd; the connection's is next
        res[method] = rest
    assert res["select"] == b"l_s32Ret = 1 \nrecv data:I am client \n" * 3 + b"returned 0\n"
    assert res["heartbeat"] == b"recv data:I am client \n" * 3 + b"returned 0\n"
    assert res["select_rc"] == res["heartbeat_rc"] == 0


def test_port_survives_its_stdout_reader_going_away(runs):
    res = result(runs, "stdout-closed")
    for unbuffered, r in res.items():
        assert r["first"] == b"Catch a SIGPIPE signal\n", (unbuffered, r)
        assert r["alive"] and r["rc"] == 0, (unbuffered, r)
        # sleeping in its loop, not spinning through SIGPIPE handlers
        assert r["states"].count("R") <= 3, (unbuffered, r)


def test_stop_matrix_runs_servers_in_their_own_processes(runs):
    rows = {(r.method, r.event): r for r in result(runs, "matrix")["rows"]}
    assert set(rows) == {("rw", "reset"), ("rw", "quiet"), ("heartbeat", "reset"),
                         ("heartbeat", "quiet")}
    assert rows["rw", "reset"].noticed == "read() failed (errno 104, Connection reset by peer)"
    assert rows["heartbeat", "reset"].noticed == rows["rw", "reset"].noticed
    assert rows["rw", "quiet"].noticed is None and rows["rw", "quiet"].after_s is None
    assert rows["heartbeat", "quiet"].noticed == "no heartbeat within the timeout"
    assert 0 < rows["heartbeat", "quiet"].after_s < 3.5
    assert "heartbeat timeout 1 s" in rows["heartbeat", "quiet"].transcript


# ---- the reconstruction itself ---------------------------------------------------

SEED = Path("/work/shared/seed/000_0abc6b9d752d3a8f.txt")


def _printf_formats(text: str) -> List[str]:
    import re
    return re.findall(r'printf\("((?:[^"\\]|\\.)*)"', text)


def test_port_keeps_every_printf_of_the_originals():
    port = (ROOT / "csrc" / "article.c").read_text(encoding="utf-8")
    formats = {f for src in ORIG.glob("*.c") for f in _printf_formats(src.read_text("utf-8"))}
    assert len(formats) >= 20
    missing = [f for f in formats if f'"{f}"' not in port]
    assert not missing


@pytest.mark.skipif(not SEED.exists(), reason="the source article is not on this machine")
def test_originals_add_nothing_but_braces_and_the_marked_change():
    """Every line of tests/orig/*.c, except braces, blank lines, the fastlive
    header comment and the lines marked for the address change, is a line
    of the article; and every printf of the article is in the originals."""
    article_text = SEED.read_text(encoding="utf-8")
    article_lines = {line.strip() for line in article_text.splitlines()}
    marked = ("fastlive", "l_pcHost", "l_pcPort")
    for src in sorted(ORIG.glob("*.c")):
        text = src.read_text(encoding="utf-8")
        body = text.split("*/\n", 1)[1]  # after the fastlive header comment
        extra = [line.strip() for line in body.splitlines()
                 if line.strip() and line.strip().strip("{}").strip() != ""
                 and not any(m in line for m in marked)
                 and line.strip() not in article_lines]
        assert not extra, (src.name, extra)
    orig_formats = {f for src in ORIG.glob("*.c") for f in _printf_formats(src.read_text("utf-8"))}
    assert set(_printf_formats(article_text)) <= orig_formats


def test_port_server_process_model(runs):
    res = result(runs, "process")
    if shutil.which("ss"):
        assert res["backlog"] == 2
        assert res["time_wait"] >= 1  # so the second bind needed SO_REUSEADDR
    assert res["replies"] == [REPLY, REPLY]
    assert res["group"] == 3  # fork per connection
    assert res["rebind_out"] == EXIT and res["rebind_rc"] == 0  # no "bind error"
