"""Peer ends of many loopback connections, held by a child process.

Tests and benchmarks of batches need thousands of connections, and one
process may hold only RLIMIT_NOFILE fds; so the accepting ends live in a
child (``python -m fastlive._peerhold``) that the parent drives through a
pipe: close some peers with FIN or RST, half-close them, or kill the whole
process (SIGKILL: the kernel closes every peer socket).

Loopback only (127.0.0.1).  Every wait is bounded.  The child dies with its
parent (PR_SET_PDEATHSIG, and end of file on its stdin) and after
``LIFETIME`` seconds in any case.
"""
from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Dict, Iterable, List, Optional

HOST = "127.0.0.1"


LIFETIME = 900.0   #: seconds a holder lives at most, whatever happens


def _die_with_parent(ppid: int) -> None:  # pragma: no cover - child side
    """SIGKILL this process when its parent dies (PR_SET_PDEATHSIG), and
    exit after LIFETIME seconds in any case."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, 9, 0, 0, 0)          # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass
    if os.getppid() != ppid:               # the parent died before prctl
        os._exit(1)
    timer = threading.Timer(LIFETIME, os._exit, (2,))
    timer.daemon = True
    timer.start()


def _child() -> None:  # pragma: no cover - runs in the child process
    _die_with_parent(int(sys.argv[1]) if len(sys.argv) > 1 else os.getppid())
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind((HOST, 0))
    lst.listen(4096)
    peers: Dict[int, socket.socket] = {}
    accepted = [0]
    lock = threading.Lock()

    def accept_loop() -> None:
        while True:
            try:
                s, addr = lst.accept()
            except OSError:
                return
            with lock:
                peers[addr[1]] = s
                accepted[0] += 1

    threading.Thread(target=accept_loop, daemon=True).start()
    out = sys.stdout
    out.write(f"{lst.getsockname()[1]}\n")
    out.flush()
    for line in sys.stdin:
        cmd, *args = line.split()
        ports = [int(a) for a in args]
        reply = "ok"
        if cmd == "wait":              # wait N: until N accepted in all (<= 30 s)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with lock:
                    if accepted[0] >= ports[0]:
                        break
                time.sleep(0.002)
            with lock:
                reply = f"ok {accepted[0]}"
        elif cmd in ("fin", "rst", "shutwr", "send"):
            with lock:
                for p in ports:
                    s = peers.get(p)
                    if s is None:
                        continue
                    if cmd == "shutwr":
                        s.shutdown(socket.SHUT_WR)
                    elif cmd == "send":
                        s.send(b"x")
                    else:
                        if cmd == "rst":
                            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                         struct.pack("ii", 1, 0))
                        del peers[p]
                        s.close()
        elif cmd == "exit":
            break
        out.write(reply + "\n")
        out.flush()
    os._exit(0)


class PeerHolder:
    """A child process holding the accepting ends of loopback connections.

    ``connect(n)`` opens n connections from this process and returns the
    local sockets; the peer of a local socket is named by its port.
    """

    def __init__(self, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self.proc: Optional[subprocess.Popen[str]] = subprocess.Popen(
            [sys.executable, "-m", "fastlive._peerhold", str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.port = int(self._read())
        self.count = 0

    def _read(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        r, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        if not r:
            raise TimeoutError("peer holder did not answer")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("peer holder exited")
        return str(line).strip()

    def _cmd(self, line: str) -> str:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._read()

    def connect(self, n: int) -> List[socket.socket]:
        """n new connections; returns this side's sockets (blocking,
        connected, with the peer accepted)."""
        socks = []
        try:
            for _ in range(n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.settimeout(self.timeout)
                s.connect((HOST, self.port))
                s.settimeout(None)
        except BaseException:
            for s in socks:
                s.close()
            raise
        self.count += n
        got = int(self._cmd(f"wait {self.count}").split()[1])
        if got < self.count:
            raise TimeoutError(f"peer holder accepted {got} of {self.count}")
        return socks

    @staticmethod
    def _ports(socks: Iterable[socket.socket]) -> str:
        return " ".join(str(s.getsockname()[1]) for s in socks)

    def fin(self, socks: Iterable[socket.socket]) -> None:
        """Close these sockets' peers normally (FIN)."""
        self._cmd("fin " + self._ports(socks))

    def rst(self, socks: Iterable[socket.socket]) -> None:
        """Close these sockets' peers with SO_LINGER 0 (RST)."""
        self._cmd("rst " + self._ports(socks))

    def shutwr(self, socks: Iterable[socket.socket]) -> None:
        """Half-close: the peers send FIN but keep reading."""
        self._cmd("shutwr " + self._ports(socks))

    def send(self, socks: Iterable[socket.socket]) -> None:
        """The peers send one byte each."""
        self._cmd("send " + self._ports(socks))

    def kill(self) -> None:
        """SIGKILL the holder: the kernel closes every peer socket."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(self.timeout)

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            self.kill()
        finally:
            for f in (self.proc.stdin, self.proc.stdout):
                if f is not None:
                    f.close()
            self.proc = None

    def __enter__(self) -> PeerHolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def close_all(socks: Iterable[socket.socket]) -> None:
    """Close local sockets with RST (SO_LINGER 0): no TIME_WAIT left behind."""
    linger = struct.pack("ii", 1, 0)
    for s in socks:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        except OSError:
            pass
        s.close()


if __name__ == "__main__":  # pragma: no cover
    _child()
