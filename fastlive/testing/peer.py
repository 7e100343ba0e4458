"""Helper processes that hold the peer end of TCP connections (owner side).

:class:`PeerProcess`
    One helper holding one or more connections; on command it closes
    (FIN), resets (RST), closes with unread data (RST), half-closes, sends,
    echoes; from outside it can be SIGKILLed (its kernel closes the
    sockets) or frozen with SIGSTOP (its *kernel* still ACKs data and
    keepalive probes, so no kernel timer ever calls it dead).
:func:`loopback_peer`
    A local socket and a :class:`PeerProcess` holding its peer, on 127.0.0.1.
:class:`ManyPeers`
    One helper holding the accepting ends of thousands of loopback
    connections (one process may hold only RLIMIT_NOFILE fds), closing or
    resetting them by port.
:class:`HeartbeatPeerProcess`
    A helper that connects to a listener and answers heartbeat PINGs.

Every helper is started by :func:`fastlive.testing._spawn.spawn`: it imports
the same fastlive as this process and dies with it.
"""
from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import threading
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ._child import DEFAULT_LIFETIME
from ._spawn import proc_state, spawn

__all__ = ["PeerError", "PeerProcess", "loopback_peer", "ManyPeers", "close_all",
           "HeartbeatPeerProcess", "Address"]

#: The least time a helper gets to start and say "ready" (seconds).
_START_WAIT = 60.0

Address = Tuple[str, int]


class PeerError(RuntimeError):
    """The helper process refused a command, died, or did not answer in time."""


def _fmt(addr: Address) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class PeerProcess:
    """A helper process holding the peer end of TCP connections.

    At least one of ``sock`` (connected sockets to hand over; this process's
    copies are closed, so the helper is their only owner and its death
    closes them), ``listen`` (an address to listen on; it accepts every
    connection that arrives, numbered 0, 1, ... in arrival order) or
    ``connect`` (an address to connect to: connection 0) says where the
    connections come from; :meth:`connect` adds more later.  ``netns`` runs
    the helper inside that network namespace (``ip netns exec``).

    Commands name a connection by number (``conn``, default 0) and wait at
    most ``timeout`` seconds for the helper's answer; a frozen helper
    answers nothing, so thaw it first.

    The helper dies with its owner: ``PR_SET_PDEATHSIG`` sends it SIGKILL
    when the owner process dies (even when it is stopped; helpers are
    started from the main thread or a process-long spawner thread, since
    the kernel ties the signal to the forking *thread*), it exits on end of
    file on its control socket and after ``lifetime`` seconds, and
    :meth:`close` / ``with`` kill it.
    """

    def __init__(self, sock: Optional[socket.socket] | Sequence[socket.socket] = None, *,
                 listen: Optional[Address] = None, connect: Optional[Address] = None,
                 netns: Optional[str] = None, timeout: float = 10.0,
                 lifetime: float = DEFAULT_LIFETIME) -> None:
        socks: List[socket.socket] = []
        if isinstance(sock, socket.socket):
            socks = [sock]
        elif sock is not None:
            socks = list(sock)
        if not socks and listen is None and connect is None:
            raise ValueError("give sock, listen or connect")
        self.timeout = timeout
        self.netns = netns
        self.port = 0
        self.frozen = False
        self._buf = b""
        self._lock = threading.Lock()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._ctl = ours
        args: List[str] = ["--ctl", str(theirs.fileno()), "--lifetime", str(lifetime)]
        fds = [theirs.fileno()]
        for s in socks:
            args += ["--fd", str(s.fileno())]
            fds.append(s.fileno())
        if listen is not None:
            args += ["--listen", _fmt(listen)]
        if connect is not None:
            args += ["--connect", _fmt(connect)]
        try:
            self._proc: subprocess.Popen[bytes] = spawn("peer", args, pass_fds=fds,
                                                        netns=netns)
        finally:
            theirs.close()
        #: The helper's process id (``ip netns exec`` execs, so it is the same).
        self.pid = self._proc.pid
        for s in socks:       # the helper is now the only owner
            s.close()
        try:
            # a Python start: seconds on an emulated CPU under load (seen
            # above 10 s in a TCG machine); a longer wait only when slow
            start = self.timeout if timeout is None else timeout
            ready = self._reply(max(start, _START_WAIT))
            words = ready.split()
            if words[:1] != ["ready"]:
                raise PeerError(f"helper failed to start: {ready}")
            self.port = int(words[2])
        except BaseException:
            self.close()
            raise

    # -- plumbing ----------------------------------------------------------
    def _reply(self, timeout: Optional[float]) -> str:
        end = time.monotonic() + (self.timeout if timeout is None else timeout)
        while b"\n" not in self._buf:
            left = end - time.monotonic()
            if left <= 0:
                raise PeerError(f"helper {self.pid} did not answer in time"
                                + (" (it is frozen)" if self.frozen else ""))
            self._ctl.settimeout(left)
            try:
                chunk = self._ctl.recv(65536)
            except socket.timeout:
                continue
            except OSError as exc:
                raise PeerError(f"helper {self.pid}: control socket: {exc}") from exc
            if not chunk:
                code = self._proc.poll()
                raise PeerError(f"helper {self.pid} exited (status {code})")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def _call(self, *words: object, timeout: Optional[float] = None) -> str:
        if self.frozen:
            raise PeerError("the helper is frozen (SIGSTOP): thaw() it first")
        with self._lock:
            try:
                self._ctl.sendall((" ".join(map(str, words)) + "\n").encode())
            except OSError as exc:
                raise PeerError(f"helper {self.pid}: {exc}") from exc
            reply = self._reply(timeout)
        if reply.startswith("ok"):
            return reply[3:]
        raise PeerError(f"{words[0]}: {reply[4:]}")

    @property
    def running(self) -> bool:
        """Whether the helper process has not exited yet."""
        return self._proc.poll() is None

    @property
    def returncode(self) -> Optional[int]:
        """The helper's exit status, None while it runs."""
        return self._proc.poll()

    # -- connections -------------------------------------------------------
    def ping(self, timeout: Optional[float] = None) -> None:
        """Round trip over the control socket (the helper is responsive)."""
        self._call("ping", timeout=timeout)

    def wait_conns(self, n: int, timeout: Optional[float] = None) -> int:
        """Wait until a listening helper has accepted ``n`` connections."""
        t = self.timeout if timeout is None else timeout
        return int(self._call("wait_conns", n, t, timeout=t + 5))

    def count(self) -> int:
        """Connections the helper has held (closed ones keep their number)."""
        return int(self._call("count"))

    def connect(self, address: Address, timeout: Optional[float] = None) -> int:
        """Open a new connection from the helper to ``address``; returns its number."""
        t = self.timeout if timeout is None else timeout
        return int(self._call("connect", address[0], address[1], t, timeout=t + 5))

    # -- faults ------------------------------------------------------------
    def close_socket(self, conn: int = 0) -> None:
        """close(): the kernel sends FIN (the local side reads end of file)."""
        self._call("close", conn)

    def reset(self, conn: int = 0) -> None:
        """SO_LINGER {on, 0} then close(): the kernel sends RST."""
        self._call("reset", conn)

    def close_unread(self, nbytes: int = 1, conn: int = 0,
                     timeout: Optional[float] = None) -> int:
        """Wait until ``nbytes`` sent by the local side sit unread in the
        helper's receive queue, then close(): unread data makes the kernel
        send RST instead of FIN.  Returns the bytes left unread."""
        t = self.timeout if timeout is None else timeout
        return int(self._call("close_unread", conn, nbytes, t, timeout=t + 5))

    def shutdown_write(self, conn: int = 0) -> None:
        """shutdown(SHUT_WR): FIN in one direction only (half-close).  The
        helper keeps reading and counting what the local side sends."""
        self._call("shutdown_wr", conn)

    def send(self, data: bytes, conn: int = 0) -> int:
        """Send ``data`` to the local side (at most 5 s of blocking)."""
        if not data:
            return 0
        return int(self._call("send", conn, data.hex()))

    def echo(self, on: bool = True, conn: int = 0) -> None:
        """Send back everything received (reads only while on)."""
        self._call("echo", conn, int(on))

    def drain(self, on: bool = True, conn: int = 0) -> None:
        """Read and discard (count) everything received."""
        self._call("drain", conn, int(on))

    def stats(self, conn: int = 0) -> Dict[str, int]:
        """received / sent byte counts, eof, error, open, and the kernel's
        inq (unread) and outq (unacknowledged) byte counts."""
        return dict(json.loads(self._call("stats", conn)))

    def kill(self, sig: int = signal.SIGKILL, timeout: Optional[float] = None) -> int:
        """Send ``sig`` (SIGKILL by default) and wait for the exit.  The
        helper's kernel then closes its sockets: FIN, or RST where data was
        unread - a killed process looks exactly like close() to the peer."""
        if self.running:
            os.kill(self.pid, sig)
        try:
            code = self._proc.wait(self.timeout if timeout is None else timeout)
        except subprocess.TimeoutExpired as exc:
            raise PeerError(f"helper {self.pid} survived signal {sig}") from exc
        self.frozen = False
        return code

    def freeze(self, timeout: Optional[float] = None) -> None:
        """SIGSTOP: the process stops, its kernel does not.  Data is still
        ACKed (until the receive buffer fills) and keepalive probes are
        answered, so no kernel timer on the local side calls it dead."""
        self._signal_state(signal.SIGSTOP, "T", timeout)
        self.frozen = True

    def thaw(self, timeout: Optional[float] = None) -> None:
        """SIGCONT after :meth:`freeze`."""
        self._signal_state(signal.SIGCONT, "RSD", timeout)
        self.frozen = False

    def _signal_state(self, sig: int, states: str, timeout: Optional[float]) -> None:
        if not self.running:
            raise PeerError(f"helper {self.pid} is not running")
        os.kill(self.pid, sig)
        end = time.monotonic() + (self.timeout if timeout is None else timeout)
        while (proc_state(self.pid) or "?") not in states:
            if time.monotonic() >= end:
                raise PeerError(f"helper {self.pid} did not reach state {states}")
            time.sleep(0.002)

    # -- lifetime ----------------------------------------------------------
    def close(self) -> None:
        """Kill the helper (SIGKILL works on a frozen one too), reap it and
        close the control socket.  Safe to call twice."""
        try:
            if self._proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                try:
                    self._proc.wait(10)
                except subprocess.TimeoutExpired:  # pragma: no cover - kernel stuck
                    pass
        finally:
            self._ctl.close()
            self.frozen = False

    def __enter__(self) -> PeerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f" netns={self.netns}" if self.netns else ""
        state = "frozen" if self.frozen else ("running" if self.running else
                                              f"exited {self.returncode}")
        return f"<PeerProcess pid={self.pid}{where} {state}>"


def loopback_peer(host: str = "127.0.0.1", timeout: float = 10.0
                  ) -> Tuple[socket.socket, PeerProcess]:
    """A connected local socket (blocking, no timeout) and a
    :class:`PeerProcess` that holds its peer end (connection 0), on
    loopback.  The caller closes both (``peer.close()``)."""
    if not (host.startswith("127.") or host == "::1"):
        raise ValueError("loopback_peer only uses loopback addresses")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as lst:
        lst.bind((host, 0))
        lst.listen(1)
        lst.settimeout(timeout)
        local = socket.create_connection(lst.getsockname()[:2], timeout=timeout)
        try:
            remote, _ = lst.accept()
        except BaseException:
            local.close()
            raise
    try:
        peer = PeerProcess(remote, timeout=timeout)
    except BaseException:
        local.close()
        remote.close()
        raise
    local.settimeout(None)
    return local, peer



class ManyPeers:
    """A helper process holding the accepting ends of many loopback
    connections (127.0.0.1), for tests and benchmarks of thousands.

    ``connect(n)`` opens n connections from this process and returns the
    local sockets; the peer of a local socket is named by its port.
    """

    def __init__(self, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self.proc: Optional[subprocess.Popen[str]] = spawn(
            "hold", [], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
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
                s.connect(("127.0.0.1", self.port))
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
        """SIGKILL the holder (its kernel closes every peer socket) and close
        the pipes; safe to call twice."""
        if self.proc is None:
            return
        try:
            self.kill()
        finally:
            for f in (self.proc.stdin, self.proc.stdout):
                if f is not None:
                    f.close()
            self.proc = None

    def __enter__(self) -> ManyPeers:
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



class HeartbeatPeerProcess:
    """A heartbeat peer in its own process (so it can be frozen or killed):
    it makes ``count`` connections to ``lst`` (a listening loopback socket
    of this process), answers PINGs with the plain-Python peer (``engine=
    "py"``) or the C engine (``"c"``), and pings too when ``interval`` is
    given.  ``busy=True`` (C engine only): once ready, the helper's Python
    spins holding the GIL and never calls the engine, so only the engine's
    own thread answers.  :attr:`socks` are this side's accepted sockets."""

    def __init__(self, lst: socket.socket, count: int = 1, *, engine: str = "py",
                 interval: Optional[float] = None, misses: int = 3,
                 lifetime: float = 60.0, timeout: float = 10.0, busy: bool = False) -> None:
        if busy and engine != "c":
            raise ValueError("busy=True needs engine='c' (the Python peer cannot answer while busy)")
        host, port = lst.getsockname()[:2]
        args = ["--connect", f"{host}:{port}", "--count", str(count),
                "--lifetime", str(lifetime), "--engine", engine, "--misses", str(misses)]
        if busy:
            args.append("--busy")
        if interval is not None:
            args += ["--interval", str(interval)]
        self.proc: subprocess.Popen[bytes] = spawn("heartbeat", args, stdout=subprocess.PIPE)
        self.pid = self.proc.pid
        self.socks: List[socket.socket] = []
        try:
            lst.settimeout(timeout)
            self.socks = [lst.accept()[0] for _ in range(count)]
            assert self.proc.stdout is not None
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            line = self.proc.stdout.readline().strip() if ready else b""
            if line != b"ready":
                raise PeerError(f"heartbeat peer {self.pid} did not start ({line!r})")
        except BaseException:
            self.close()
            raise

    def freeze(self) -> None:
        """SIGSTOP the peer (it answers nothing; its kernel still ACKs)."""
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT after :meth:`freeze`."""
        os.kill(self.pid, signal.SIGCONT)

    def close(self) -> None:
        """Kill the helper and close this side's sockets."""
        try:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGCONT)
                self.proc.kill()
            self.proc.wait(5)
        finally:
            if self.proc.stdout:
                self.proc.stdout.close()
            for s in self.socks:
                s.close()

    def __enter__(self) -> HeartbeatPeerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
