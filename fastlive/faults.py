"""Fault injection: peers that die in every way a TCP peer can.

Nothing here imports pytest; :mod:`fastlive.testing` wraps it as fixtures
and ``fastlive demo`` uses it directly.

:class:`PeerProcess`
    A helper process (``python -m fastlive.faults peer``) that holds the
    peer end of one or more TCP connections and does to them, on command
    over a private control socket, what a failing peer does: close (FIN),
    reset (RST), close with unread data (RST), half-close, send, echo, and
    - from outside - SIGKILL (its kernel closes the sockets: FIN, or RST when
    data was unread) and SIGSTOP (frozen: its *kernel* still ACKs data and
    keepalive probes, so no kernel timer ever calls it dead).  It dies with
    its owner: ``PR_SET_PDEATHSIG`` (SIGKILL) in the child, end of file on
    the control socket, :meth:`PeerProcess.close` and a maximum lifetime.

:func:`loopback_peer`
    A local socket and a :class:`PeerProcess` holding its peer, on 127.0.0.1.

:class:`NetnsPair`
    Two network namespaces joined by a veth pair, for the faults loopback
    cannot produce: the *silent* deaths, where nothing (no FIN, no RST, no
    ICMP, no ARP failure) reaches the local side and only a timer can tell.
    :meth:`NetnsPair.link_down` and :meth:`NetnsPair.blackhole` cut the
    peer; :meth:`NetnsPair.drop` does it with a firewall rule when nft or
    iptables is installed.  Needs root (see :func:`netns_unavailable`).

Network rules: loopback only, or the 10.77.x.y/24 addresses this module
gives the veth ends *inside* the namespaces it creates; no other address is
ever used.  Every wait is bounded (``timeout`` arguments, in seconds).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno as _errno
import fcntl
import functools
import itertools
import json
import os
import queue
import re
import select
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

__all__ = [
    "PeerProcess", "PeerError", "loopback_peer", "NetnsPair", "in_netns",
    "netns_available", "netns_unavailable", "sweep_stale_netns",
    "firewall_tool",
]

Address = Tuple[str, int]

#: Seconds a helper process lives at most, whatever happens to its owner.
DEFAULT_LIFETIME = 3600.0
_PR_SET_PDEATHSIG = 1
_CLONE_NEWNET = 0x40000000
_SIOCINQ = termios.FIONREAD
_SIOCOUTQ = termios.TIOCOUTQ


class PeerError(RuntimeError):
    """The helper process refused a command, died, or did not answer in time."""


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


class _Spawner:
    """Starts helper processes from one thread that lives as long as the
    process (the main thread, or a daemon thread for calls from any other
    thread).  PR_SET_PDEATHSIG fires when the *thread* that forked a child
    exits, so a helper started straight from a short-lived worker thread
    would die with that thread instead of with the process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.Queue[Tuple[Callable[[], Any], queue.Queue[Any]]] = queue.Queue()
        self._thread: Optional[threading.Thread] = None

    def _loop(self) -> None:
        while True:
            fn, box = self._jobs.get()
            try:
                box.put((True, fn()))
            except BaseException as exc:  # handed back to the caller
                box.put((False, exc))

    def run(self, fn: Callable[[], Any], timeout: float = 60.0) -> Any:
        if threading.current_thread() is threading.main_thread():
            return fn()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                 name="fastlive-faults-spawner")
                self._thread.start()
        box: queue.Queue[Any] = queue.Queue()
        self._jobs.put((fn, box))
        ok, value = box.get(timeout=timeout)
        if not ok:
            raise value
        return value


_spawner = _Spawner()


def _proc_state(pid: int) -> Optional[str]:
    """The one-letter state of /proc/PID/stat (R, S, T, Z...), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm may hold spaces and parens: the state follows the last ')'.
    return data[data.rfind(b")") + 2:][:1].decode() or None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------
# The helper process (child side)
# --------------------------------------------------------------------------

class _Conn:
    """One TCP connection held by the helper."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock: Optional[socket.socket] = sock
        self.echo = False
        self.drain = False
        self.received = 0
        self.sent = 0
        self.eof = False
        self.error = 0


class _Peer:
    """The helper's state and command loop (runs in the child process)."""

    def __init__(self, ctl: socket.socket, lifetime: float) -> None:
        self.ctl = ctl
        self.deadline = time.monotonic() + lifetime
        self.sel = selectors.DefaultSelector()
        self.sel.register(ctl, selectors.EVENT_READ, "ctl")
        self.listener: Optional[socket.socket] = None
        self.conns: List[_Conn] = []
        self.buf = b""

    # -- connections -------------------------------------------------------
    def add(self, sock: socket.socket) -> int:
        sock.setblocking(True)
        self.conns.append(_Conn(sock))
        return len(self.conns) - 1

    def listen(self, host: str, port: int) -> int:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        lst = socket.socket(family, socket.SOCK_STREAM)
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind((host, port))
        lst.listen(128)
        lst.setblocking(False)
        self.listener = lst
        self.sel.register(lst, selectors.EVENT_READ, "listener")
        return int(lst.getsockname()[1])

    def accept_ready(self) -> None:
        assert self.listener is not None
        for _ in range(64):     # bounded: at most 64 per wakeup
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            self.add(sock)

    def conn(self, cid: str) -> _Conn:
        try:
            c = self.conns[int(cid)]
        except (ValueError, IndexError):
            raise ValueError(f"no connection {cid}") from None
        if c.sock is None:
            raise ValueError(f"connection {cid} is closed")
        return c

    def watch(self, c: _Conn) -> None:
        """Read from c (echo or drain) only while asked to."""
        assert c.sock is not None
        want = (c.echo or c.drain) and not c.eof
        try:
            self.sel.get_key(c.sock)
            have = True
        except KeyError:
            have = False
        if want and not have:
            self.sel.register(c.sock, selectors.EVENT_READ, c)
        elif have and not want:
            self.sel.unregister(c.sock)

    def drop(self, c: _Conn) -> None:
        if c.sock is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(c.sock)
        c.sock.close()
        c.sock = None

    def readable(self, c: _Conn) -> None:
        assert c.sock is not None
        try:
            data = c.sock.recv(65536, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            c.error = exc.errno or 0
            c.eof = True
            self.watch(c)
            return
        if not data:
            c.eof = True
            self.watch(c)
            return
        c.received += len(data)
        if c.echo:
            try:
                c.sock.settimeout(5.0)
                c.sock.sendall(data)
                c.sent += len(data)
            except OSError as exc:
                c.error = exc.errno or _errno.ETIMEDOUT
            finally:
                c.sock.settimeout(None)

    # -- commands ----------------------------------------------------------
    def command(self, line: str) -> str:
        words = line.split()
        if not words:
            return "err empty command"
        verb, args = words[0], words[1:]
        fn = getattr(self, "cmd_" + verb, None)
        if fn is None:
            return f"err unknown command {verb}"
        try:
            return "ok " + str(fn(*args))
        except (OSError, ValueError, TypeError, TimeoutError) as exc:
            return f"err {type(exc).__name__}: {exc}"

    def cmd_ping(self) -> str:
        return "pong"

    def cmd_count(self) -> int:
        return len(self.conns)

    def cmd_wait_conns(self, n: str, timeout: str) -> int:
        end = time.monotonic() + float(timeout)
        while len(self.conns) < int(n):
            left = end - time.monotonic()
            if self.listener is None or left <= 0:
                raise TimeoutError(f"{len(self.conns)} of {n} connections")
            r, _w, _x = select.select([self.listener], [], [], min(left, 0.5))
            if r:
                self.accept_ready()
        return len(self.conns)

    def cmd_connect(self, host: str, port: str, timeout: str) -> int:
        sock = socket.create_connection((host, int(port)), timeout=float(timeout))
        return self.add(sock)

    def cmd_close(self, cid: str) -> str:
        self.drop(self.conn(cid))
        return "closed"

    def cmd_reset(self, cid: str) -> str:
        c = self.conn(cid)
        assert c.sock is not None
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.drop(c)
        return "reset"

    def cmd_close_unread(self, cid: str, n: str, timeout: str) -> int:
        """Wait until at least n bytes sit unread in the receive queue, then
        close(): the kernel answers unread data with RST, not FIN."""
        c = self.conn(cid)
        assert c.sock is not None
        c.echo = c.drain = False
        self.watch(c)
        end = time.monotonic() + float(timeout)
        while True:
            inq = _ioctl_int(c.sock, _SIOCINQ)
            if inq >= int(n):
                break
            if time.monotonic() >= end:
                raise TimeoutError(f"only {inq} of {n} bytes arrived")
            time.sleep(0.005)
        self.drop(c)
        return inq

    def cmd_shutdown_wr(self, cid: str) -> str:
        c = self.conn(cid)
        assert c.sock is not None
        c.sock.shutdown(socket.SHUT_WR)
        c.drain = True       # half-closed: keep reading what the other side sends
        self.watch(c)
        return "shut"

    def cmd_send(self, cid: str, hexdata: str) -> int:
        c = self.conn(cid)
        assert c.sock is not None
        data = bytes.fromhex(hexdata)
        c.sock.settimeout(5.0)
        try:
            c.sock.sendall(data)
        finally:
            c.sock.settimeout(None)
        c.sent += len(data)
        return len(data)

    def cmd_echo(self, cid: str, on: str) -> int:
        c = self.conn(cid)
        c.echo = on == "1"
        self.watch(c)
        return int(c.echo)

    def cmd_drain(self, cid: str, on: str) -> int:
        c = self.conn(cid)
        c.drain = on == "1"
        self.watch(c)
        return int(c.drain)

    def cmd_stats(self, cid: str) -> str:
        try:
            c = self.conns[int(cid)]
        except (ValueError, IndexError):
            raise ValueError(f"no connection {cid}") from None
        st = {"received": c.received, "sent": c.sent, "eof": c.eof,
              "error": c.error, "open": c.sock is not None, "inq": 0, "outq": 0}
        if c.sock is not None:
            st["inq"] = _ioctl_int(c.sock, _SIOCINQ)
            st["outq"] = _ioctl_int(c.sock, _SIOCOUTQ)
        return json.dumps(st, separators=(",", ":"))

    def cmd_exit(self) -> str:
        raise SystemExit(0)

    # -- loop --------------------------------------------------------------
    def serve(self) -> int:
        while time.monotonic() < self.deadline:
            timeout = min(1.0, self.deadline - time.monotonic())
            for key, _ev in self.sel.select(max(timeout, 0.0)):
                if key.data == "ctl":
                    try:
                        chunk = self.ctl.recv(65536)
                    except InterruptedError:
                        continue
                    except OSError:
                        chunk = b""
                    if not chunk:
                        return 0            # owner gone: die with it
                    self.buf += chunk
                    while b"\n" in self.buf:
                        line, self.buf = self.buf.split(b"\n", 1)
                        try:
                            reply = self.command(line.decode(errors="replace"))
                        except SystemExit:
                            reply = "ok bye"
                        try:
                            self.ctl.sendall(reply.encode() + b"\n")
                        except OSError:
                            return 0        # owner gone mid-answer
                        if reply == "ok bye":
                            return 0
                elif key.data == "listener":
                    self.accept_ready()
                else:
                    self.readable(key.data)
        return 0


def _ioctl_int(sock: socket.socket, req: int) -> int:
    buf = fcntl.ioctl(sock.fileno(), req, b"\0\0\0\0")
    return int(struct.unpack("i", buf)[0])


def _die_with_parent(ppid: int) -> None:
    """PR_SET_PDEATHSIG: SIGKILL when the thread that forked us dies.  If the
    owner already died before this ran, go now."""
    try:
        _libc().prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if os.getppid() != ppid:
        os._exit(1)


def _peer_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m fastlive.faults peer")
    p.add_argument("--ctl", type=int, required=True, help="control socket fd")
    p.add_argument("--ppid", type=int, default=0, help="owner pid (pdeathsig)")
    p.add_argument("--fd", type=int, action="append", default=[],
                   help="an inherited connected socket to hold")
    p.add_argument("--listen", metavar="HOST:PORT")
    p.add_argument("--connect", metavar="HOST:PORT")
    p.add_argument("--lifetime", type=float, default=DEFAULT_LIFETIME)
    a = p.parse_args(argv)
    if a.ppid:
        _die_with_parent(a.ppid)
    # The owner may SIGSTOP/SIGKILL us; nothing else should stop us early.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    ctl = socket.socket(fileno=a.ctl)
    peer = _Peer(ctl, a.lifetime)
    port = 0
    try:
        for fd in a.fd:
            peer.add(socket.socket(fileno=fd))
        if a.listen:
            host, _, sport = a.listen.rpartition(":")
            port = peer.listen(host.strip("[]"), int(sport))
        if a.connect:
            host, _, sport = a.connect.rpartition(":")
            peer.add(socket.create_connection((host.strip("[]"), int(sport)), timeout=10))
    except OSError as exc:
        ctl.sendall(f"err {type(exc).__name__}: {exc}\n".encode())
        return 1
    ctl.sendall(f"ready {os.getpid()} {port}\n".encode())
    return peer.serve()


# --------------------------------------------------------------------------
# The helper process (owner side)
# --------------------------------------------------------------------------

def _package_parent() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
        cmd: List[str] = [sys.executable, "-m", "fastlive.faults", "peer",
                          "--ctl", str(theirs.fileno()), "--lifetime", str(lifetime),
                          "--ppid", str(os.getpid())]
        fds = [theirs.fileno()]
        for s in socks:
            cmd += ["--fd", str(s.fileno())]
            fds.append(s.fileno())
        if listen is not None:
            cmd += ["--listen", _fmt(listen)]
        if connect is not None:
            cmd += ["--connect", _fmt(connect)]
        if netns is not None:
            cmd = [_ip(), "netns", "exec", netns] + cmd
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_package_parent(), env.get("PYTHONPATH", "")) if p)
        try:
            self._proc: subprocess.Popen[bytes] = _spawner.run(
                lambda: subprocess.Popen(cmd, pass_fds=fds, env=env,
                                         stdin=subprocess.DEVNULL))
        finally:
            theirs.close()
        #: The helper's process id (``ip netns exec`` execs, so it is the same).
        self.pid = self._proc.pid
        for s in socks:       # the helper is now the only owner
            s.close()
        try:
            ready = self._reply(timeout)
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
        return self._proc.poll() is None

    @property
    def returncode(self) -> Optional[int]:
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
        while (_proc_state(self.pid) or "?") not in states:
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


# --------------------------------------------------------------------------
# Network namespaces
# --------------------------------------------------------------------------

def _ip() -> str:
    path = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin:/bin")
    if not path:
        raise FileNotFoundError("the 'ip' command (iproute2) is not installed")
    return path


def _run(*args: str, check: bool = True, timeout: float = 10.0) -> str:
    out = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise OSError(f"{' '.join(args)}: {out.stderr.strip() or out.returncode}")
    return out.stdout


def _netns_path(name: str) -> str:
    for base in ("/run/netns", "/var/run/netns"):
        path = os.path.join(base, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"no network namespace named {name!r}")


def _setns(fd: int) -> None:
    if _libc().setns(fd, _CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the block with the *calling thread* inside network namespace
    ``name`` (setns(2)), then switch back.

    A socket belongs to the namespace it was created in, for its whole life:
    sockets created in the block stay in ``name`` after it, and work from
    any thread.  Threads started in the block inherit the namespace; other
    threads of the process are not affected.  Needs CAP_SYS_ADMIN.
    """
    target = os.open(_netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except BaseException:
        os.close(target)
        raise
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


_NAME_RE = re.compile(r"fl-(\d+)-(\d+)-[ab]")
_counter = itertools.count(1)
_counter_lock = threading.Lock()


def list_netns() -> List[str]:
    """Names of the named network namespaces (``ip netns list``)."""
    try:
        out = _run(_ip(), "netns", "list", check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def sweep_stale_netns() -> List[str]:
    """Delete namespaces named ``fl-<pid>-<n>-a|b`` whose creating process
    is gone (left by a killed test run), after killing the helper processes
    still inside them.  Returns the names deleted."""
    gone = []
    for name in list_netns():
        m = _NAME_RE.fullmatch(name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            for pid in _run(_ip(), "netns", "pids", name, check=False).split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            _run(_ip(), "netns", "del", name, check=False)
            gone.append(name)
    return gone


_probe_result: Optional[str] = None
_probe_lock = threading.Lock()


def netns_unavailable() -> Optional[str]:
    """Why :class:`NetnsPair` cannot run here, or None when it can.

    Needs root, the ``ip`` command and a kernel with network namespaces and
    veth; checked once by really creating (and deleting) a pair."""
    global _probe_result
    with _probe_lock:
        if _probe_result is None:
            _probe_result = _probe()
        return _probe_result or None


def netns_available() -> bool:
    return netns_unavailable() is None


def _probe() -> str:
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_SYS_ADMIN, CAP_NET_ADMIN)"
    try:
        ip = _ip()
    except FileNotFoundError as exc:
        return str(exc)
    if not os.path.exists("/proc/self/ns/net"):
        return "this kernel has no network namespaces (/proc/self/ns/net)"
    n = next(_counter)
    a, b = f"fl-{os.getpid()}-{n}-a", f"fl-{os.getpid()}-{n}-b"
    try:
        _run(ip, "netns", "add", a)
        _run(ip, "netns", "add", b)
        _run(ip, "link", "add", "p0", "netns", a, "type", "veth",
             "peer", "name", "p1", "netns", b)
        with in_netns(a):
            pass
        _run(ip, "netns", "exec", b, sys.executable, "-c", "pass", timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot create a netns/veth pair: {exc}"
    finally:
        for ns in (a, b):
            _run(ip, "netns", "del", ns, check=False)
    return ""


def firewall_tool() -> Optional[str]:
    """'nft' or 'iptables' when installed (for :meth:`NetnsPair.drop`)."""
    for tool in ("nft", "iptables"):
        if shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin"):
            return tool
    return None


class NetnsPair:
    """Two fresh network namespaces, A (local) and B (peer), joined by a veth
    pair: ``veth-a`` 10.77.X.1/24 in A, ``veth-b`` 10.77.X.2/24 in B.

    On entry it starts a :class:`PeerProcess` listening in B (``peer``) and
    connects ``local`` to it from a socket this process creates inside A
    (:func:`in_netns`: a socket stays in the namespace it was created in, so
    ``local`` is used from here like any other socket).  :meth:`connect`
    makes more connections, each accepted by the same helper (its
    connection numbers follow the order of the calls).

    Silent deaths (nothing reaches A: no FIN, RST, ICMP or ARP failure):

    - :meth:`link_down`: B's end of the veth goes down (the peer's cable
      pulled); A's end loses carrier and drops what it sends.
    - :meth:`blackhole`: the peer's address disappears from B while A keeps
      a PERMANENT neighbour entry for it with B's MAC, so A keeps sending
      frames that B silently discards (B does not forward).
    - :meth:`drop`: a firewall rule in B drops A's packets (needs nft or
      iptables).
    - ``peer.freeze()``: the peer process stops but its kernel still
      answers - not a death at all to any kernel timer.

    On exit (also after an error) the local sockets are closed, the helper
    is killed and both namespaces are deleted.  Stale ``fl-<pid>-*``
    namespaces of dead processes are swept on entry.
    """

    def __init__(self, *, subnet: Optional[int] = None, timeout: float = 10.0) -> None:
        with _counter_lock:
            self.n = next(_counter)
        pid = os.getpid()
        self.ns_a = f"fl-{pid}-{self.n}-a"
        self.ns_b = f"fl-{pid}-{self.n}-b"
        x = subnet if subnet is not None else 1 + (self.n - 1) % 254
        if not 0 <= x <= 255:
            raise ValueError("subnet must be 0..255")
        self.addr_a = f"10.77.{x}.1"
        self.addr_b = f"10.77.{x}.2"
        self.dev_a = "veth-a"
        self.dev_b = "veth-b"
        self.timeout = timeout
        self.mac_a = ""
        self.mac_b = ""
        self.peer: Optional[PeerProcess] = None
        self.local: Optional[socket.socket] = None
        self.sockets: List[socket.socket] = []
        self._numbers: Dict[int, int] = {}
        self.faults: List[str] = []
        self._created: List[str] = []
        self._fw: Optional[str] = None

    @staticmethod
    def available() -> bool:
        """Whether a pair can be made here (root, ``ip``, netns, veth)."""
        return netns_available()

    @staticmethod
    def unavailable_reason() -> Optional[str]:
        """Why not, or None (see :func:`netns_unavailable`)."""
        return netns_unavailable()

    # -- set-up / tear-down -------------------------------------------------
    def __enter__(self) -> NetnsPair:
        reason = netns_unavailable()
        if reason:
            raise OSError(_errno.EPERM, reason)
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ipn(self, ns: str, *args: str) -> str:
        return _run(_ip(), "-n", ns, *args, timeout=self.timeout)

    def _setup(self) -> None:
        ip = _ip()
        sweep_stale_netns()
        for ns in (self.ns_a, self.ns_b):
            _run(ip, "netns", "del", ns, check=False)   # a leftover of a reused pid
            _run(ip, "netns", "add", ns)
            self._created.append(ns)
        _run(ip, "link", "add", self.dev_a, "netns", self.ns_a, "type", "veth",
             "peer", "name", self.dev_b, "netns", self.ns_b)
        for ns, dev, addr in ((self.ns_a, self.dev_a, self.addr_a),
                              (self.ns_b, self.dev_b, self.addr_b)):
            self._ipn(ns, "link", "set", "lo", "up")
            self._ipn(ns, "addr", "add", f"{addr}/24", "dev", dev)
            self._ipn(ns, "link", "set", dev, "up")
        self.mac_a = self._mac(self.ns_a, self.dev_a)
        self.mac_b = self._mac(self.ns_b, self.dev_b)
        self.peer = PeerProcess(listen=(self.addr_b, 0), netns=self.ns_b,
                                timeout=self.timeout)
        self.local = self.connect()

    def _mac(self, ns: str, dev: str) -> str:
        info = json.loads(self._ipn(ns, "-j", "link", "show", dev))
        return str(info[0]["address"])

    def close(self) -> None:
        """Close the local sockets, kill the helper, delete both namespaces.
        Safe to call twice; never raises for what is already gone."""
        for s in self.sockets:
            s.close()
        self.sockets.clear()
        if self.peer is not None:
            self.peer.close()
        for ns in self._created:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                _run(_ip(), "netns", "del", ns, check=False)
        self._created.clear()

    # -- sockets -----------------------------------------------------------
    def new_socket(self, family: int = socket.AF_INET,
               type: int = socket.SOCK_STREAM) -> socket.socket:
        """A new socket inside A (closed by :meth:`close`)."""
        with in_netns(self.ns_a):
            s = socket.socket(family, type)
        self.sockets.append(s)
        return s

    def connect(self, timeout: Optional[float] = None) -> socket.socket:
        """A new local socket in A connected to the helper in B; returns it
        once the helper has accepted it (blocking, no timeout).  The
        helper's number for it is :meth:`number` (``local`` is 0)."""
        assert self.peer is not None, "use NetnsPair as a context manager"
        before = self.peer.count()
        s = self.new_socket()
        t = self.timeout if timeout is None else timeout
        s.settimeout(t)
        s.connect((self.addr_b, self.peer.port))
        s.settimeout(None)
        self.peer.wait_conns(before + 1, t)
        self._numbers[s.fileno()] = before
        return s

    def number(self, sock: socket.socket) -> int:
        """The helper's connection number (``conn=``) for a socket made by
        :meth:`connect`."""
        return self._numbers[sock.fileno()]

    def inside_a(self) -> contextlib.AbstractContextManager[None]:
        """``with pair.inside_a(): ...`` - create your own sockets (e.g. a
        server under test, listening on ``addr_a``) in namespace A."""
        return in_netns(self.ns_a)

    # -- faults ------------------------------------------------------------
    def link_down(self) -> None:
        """Silent death 1: B's veth end goes down, A's end loses carrier.
        A's neighbour entry for the peer is pinned first, so no ARP failure
        (and its local "host unreachable") gives the death away."""
        self._pin_neighbour()
        self._ipn(self.ns_b, "link", "set", self.dev_b, "down")
        self.faults.append("link_down")

    def link_up(self) -> None:
        """Undo :meth:`link_down`."""
        self._ipn(self.ns_b, "link", "set", self.dev_b, "up")
        self.faults.append("link_up")

    def blackhole(self) -> None:
        """Silent death 2: delete the peer's address in B and pin a PERMANENT
        neighbour entry for it in A with B's MAC.  A keeps sending frames
        to B, which drops them (not its address, no forwarding, no ICMP);
        nothing ever comes back."""
        self._pin_neighbour()
        self._ipn(self.ns_b, "addr", "del", f"{self.addr_b}/24", "dev", self.dev_b)
        self.faults.append("blackhole")

    def drop(self) -> None:
        """Silent death 3: a firewall rule in B drops everything from A
        (nft, or iptables).  OSError when neither tool is installed."""
        tool = firewall_tool()
        if tool is None:
            raise OSError(_errno.ENOENT, "neither nft nor iptables is installed")
        self._pin_neighbour()
        exe = [_ip(), "netns", "exec", self.ns_b]
        if tool == "nft":
            rules = ("add table inet fastlive\n"
                     "add chain inet fastlive input { type filter hook input priority 0 ; }\n"
                     f"add rule inet fastlive input ip saddr {self.addr_a} drop\n")
            out = subprocess.run(exe + ["nft", "-f", "-"], input=rules, text=True,
                                 capture_output=True, timeout=self.timeout)
            if out.returncode != 0:
                raise OSError(f"nft: {out.stderr.strip()}")
        else:
            _run(*exe, "iptables", "-I", "INPUT", "-s", self.addr_a, "-j", "DROP",
                 timeout=self.timeout)
        self._fw = tool
        self.faults.append("drop")

    def _pin_neighbour(self) -> None:
        self._ipn(self.ns_a, "neigh", "replace", self.addr_b, "lladdr", self.mac_b,
                  "dev", self.dev_a, "nud", "permanent")

    def neighbour(self) -> str:
        """A's neighbour entry for the peer (``ip neigh show``), e.g.
        ``10.77.1.2 dev veth-a lladdr ... PERMANENT``."""
        return self._ipn(self.ns_a, "neigh", "show", self.addr_b).strip()

    def link_state(self, side: str = "b") -> str:
        """operstate of a veth end ('UP', 'DOWN', 'LOWERLAYERDOWN')."""
        ns, dev = (self.ns_a, self.dev_a) if side == "a" else (self.ns_b, self.dev_b)
        return str(json.loads(self._ipn(ns, "-j", "link", "show", dev))[0]["operstate"])

    def addresses(self, side: str = "b") -> List[str]:
        """IPv4 addresses on a veth end."""
        ns, dev = (self.ns_a, self.dev_a) if side == "a" else (self.ns_b, self.dev_b)
        info = json.loads(self._ipn(ns, "-j", "-4", "addr", "show", "dev", dev))
        return [a["local"] for i in info for a in i.get("addr_info", [])]

    def __repr__(self) -> str:
        return (f"<NetnsPair {self.ns_a} {self.addr_a} <-> {self.ns_b} {self.addr_b}"
                f" faults={self.faults}>")


# --------------------------------------------------------------------------
# ``fastlive netns-sweep`` (a row of fastlive.cli.COMMANDS)

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--list", action="store_true",
                        help="only list fastlive's namespaces, delete nothing")


def run(args: argparse.Namespace) -> int:
    if args.list:
        for name in list_netns():
            m = _NAME_RE.fullmatch(name)
            if m:
                owner = "alive" if _pid_alive(int(m.group(1))) else "stale"
                print(f"{name}  owner {m.group(1)} {owner}")
        return 0
    if os.geteuid() != 0:
        print("netns-sweep needs root", file=sys.stderr)
        return 1
    for name in sweep_stale_netns():
        print(f"deleted {name}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["peer"]:
        return _peer_main(args[1:])
    if args[:1] == ["sweep"]:
        for name in sweep_stale_netns():
            print(f"deleted {name}")
        return 0
    print("usage: python -m fastlive.faults peer ... | sweep", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
