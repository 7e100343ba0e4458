"""The helper process's side: what runs in the child that
:func:`fastlive.testing._spawn.spawn` starts.

Roles (the first argument):

``peer``
    Holds the peer end of TCP connections and does to them, on command
    over a private control socket, what a failing peer does (close, reset,
    close with unread data, half-close, send, echo, drain).  Driven by
    :class:`fastlive.testing.PeerProcess`.
``hold``
    Accepts thousands of loopback connections and closes (FIN/RST),
    half-closes or writes to them by port on command from its stdin.
    Driven by :class:`fastlive.testing.ManyPeers`.
``heartbeat``
    Connects N times and answers heartbeat PINGs (and pings, with
    ``--interval``) with the C engine or the plain-Python peer.  Driven by
    :class:`fastlive.testing.HeartbeatPeerProcess`.

Every role first arranges to die with its owner (:func:`die_with_parent`).
"""
from __future__ import annotations

import argparse
import contextlib
import errno as _errno
import fcntl
import json
import os
import select
import selectors
import signal
import socket
import struct
import sys
import termios
import threading
import time
from typing import Dict, List, Optional, Sequence

__all__ = ["main", "die_with_parent", "DEFAULT_LIFETIME"]

_PR_SET_PDEATHSIG = 1
_SIOCINQ = termios.FIONREAD
_SIOCOUTQ = termios.TIOCOUTQ

#: Seconds a helper process lives at most, whatever happens to its owner.
DEFAULT_LIFETIME = 3600.0


def die_with_parent(ppid: int, lifetime: float) -> None:
    """PR_SET_PDEATHSIG (SIGKILL when the thread that forked us dies), exit
    at once if the owner already died before that, and exit after
    ``lifetime`` seconds in any case."""
    import ctypes
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if ppid and os.getppid() != ppid:
        os._exit(1)
    timer = threading.Timer(lifetime, os._exit, (2,))
    timer.daemon = True
    timer.start()


# --------------------------------------------------------------------------
# role "peer": the fault peer's command server
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
        if c.sock is None:      # dropped by a command earlier in the same select batch
            return
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



def _peer_main(a: argparse.Namespace) -> int:
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
# role "hold": the accepting ends of many loopback connections
# --------------------------------------------------------------------------

def _hold_main(a: argparse.Namespace) -> int:
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(("127.0.0.1", 0))
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


# --------------------------------------------------------------------------
# role "heartbeat": a heartbeat peer (C engine or plain Python)
# --------------------------------------------------------------------------

def _heartbeat_main(args: argparse.Namespace) -> int:
    from fastlive.heartbeat import HeartbeatEngine, PyHeartbeatPeer
    host, _, port = args.connect.rpartition(":")
    socks = [socket.create_connection((host, int(port)), timeout=5)
             for _ in range(args.count)]
    end = time.monotonic() + args.lifetime
    if args.engine == "c":
        eng = HeartbeatEngine(capacity=args.count)
        for s in socks:
            eng.add(s, args.interval or 3600.0, args.misses)
        print("ready", flush=True)
        if args.busy:
            # The application never calls in and holds the GIL: the
            # engine's own thread must answer (and ping) all the same.
            n = 0
            while time.monotonic() < end:
                for _ in range(100000):
                    n += 1
            return 0
        alive = len(socks)
        while alive and time.monotonic() < end:
            alive -= len(eng.wait(0.5))
        return 0
    peer = PyHeartbeatPeer()
    for s in socks:
        peer.add(s, args.interval, args.misses)
    print("ready", flush=True)
    while len(peer) and time.monotonic() < end:
        peer.step(0.1)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastlive.testing._child")
    p.add_argument("--ppid", type=int, default=0, help="owner pid (pdeathsig)")
    sub = p.add_subparsers(dest="role", required=True)
    peer = sub.add_parser("peer")
    peer.add_argument("--ctl", type=int, required=True, help="control socket fd")
    peer.add_argument("--fd", type=int, action="append", default=[],
                      help="an inherited connected socket to hold")
    peer.add_argument("--listen", metavar="HOST:PORT")
    peer.add_argument("--connect", metavar="HOST:PORT")
    peer.add_argument("--lifetime", type=float, default=DEFAULT_LIFETIME)
    hold = sub.add_parser("hold")
    hold.add_argument("--lifetime", type=float, default=900.0)
    hb = sub.add_parser("heartbeat")
    hb.add_argument("--connect", required=True, help="HOST:PORT (loopback)")
    hb.add_argument("--count", type=int, default=1)
    hb.add_argument("--interval", type=float, default=None)
    hb.add_argument("--misses", type=int, default=3)
    hb.add_argument("--engine", choices=("c", "py"), default="py")
    hb.add_argument("--busy", action="store_true",
                    help="(engine c) after ready, spin in Python holding the GIL and never call the engine")
    hb.add_argument("--lifetime", type=float, default=120.0,
                    help="exit after this many seconds in any case")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one role: ``--ppid PID ROLE [role options]`` (see the module
    docstring)."""
    a = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    die_with_parent(a.ppid, a.lifetime + 5.0)
    if a.role == "peer":
        return _peer_main(a)
    if a.role == "hold":
        return _hold_main(a)
    return _heartbeat_main(a)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
