"""The heartbeat in plain Python (:class:`PyHeartbeatPeer`): the same wire
format and rules as the C engine, for interop checks and small peers."""
from __future__ import annotations

import errno as _errno
import selectors
import socket
import threading
import time
from typing import Dict, List, Optional

from .._lib import lib, seconds
from ..verdict import Method, Seen, Status, Verdict, decide
from .engine import HeartbeatDeath, _check_schedule
from .wire import Decoder, FrameError, FrameType, ping, pong_for

__all__ = ["PyHeartbeatPeer"]

class _PeerConn:
    __slots__ = ("sock", "fd", "interval", "misses", "last_heard", "quiet_since",
                 "ping_due", "seq", "decoder")

    def __init__(self, sock: socket.socket, interval: Optional[float], misses: int,
                 now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.interval = interval
        self.misses = misses
        self.last_heard = now       # anything at all (the death clock)
        self.quiet_since = now      # the PING clock (see HeartbeatEngine)
        self.ping_due = 0.0
        self.seq = 0
        self.decoder = Decoder()


class PyHeartbeatPeer:
    """The heartbeat in plain Python, same wire format and rules as the
    engine (dedicated connections only).  It answers every PING and, for
    connections added with an ``interval``, pings after ``interval`` of
    silence and reports the connection dead after ``misses * interval``.
    ``interval=None`` only answers.  Drive it with :meth:`step`, or run it
    in a thread with :meth:`start` and collect :meth:`take_deaths`."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._conns: Dict[int, _PeerConn] = {}
        self._deaths: List[HeartbeatDeath] = []
        self._thread_deaths: List[HeartbeatDeath] = []
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._mutex = threading.RLock()
        self.pings_answered = 0
        self.pings_sent = 0
        self.pongs_received = 0

    def add(self, sock: socket.socket, interval: Optional[float] = None,
            misses: int = 3) -> None:
        """Answer ``sock``'s PINGs; with ``interval`` (seconds) also PING it
        after that much silence and report it dead after ``misses *
        interval`` without a byte.  The socket is registered with the
        selector (epoll) for reading."""
        if interval is not None:
            _check_schedule(interval, misses)
        with self._mutex:
            conn = _PeerConn(sock, interval, misses, time.monotonic())
            self._conns[conn.fd] = conn
            self._sel.register(conn.fd, selectors.EVENT_READ, conn)

    def remove(self, sock: socket.socket) -> None:
        """Stop answering and watching ``sock`` (unregisters it from the
        selector; the socket stays open)."""
        with self._mutex:
            conn = self._conns.pop(sock.fileno(), None)
            if conn is not None:
                self._sel.unregister(conn.fd)

    def __len__(self) -> int:
        return len(self._conns)

    def _die(self, conn: _PeerConn, err: int, seen: int, method: Method, now: float) -> None:
        """The connection is given up: the verdict comes from the one rule
        (:func:`fastlive.verdict.decide`, C ``fl_verdict_decide``) applied to
        what was seen and the socket's TCP state, as in the C engine."""
        if self._conns.pop(conn.fd, None) is None:
            return
        self._sel.unregister(conn.fd)
        state = -1
        if err != _errno.EBADF:
            st = int(lib.fl_tcp_state(conn.fd))
            state = st if st >= 0 else -1
        v = decide(method, err, state, seen)
        if v.status is Status.ALIVE:          # given up all the same
            v = Verdict(Status.ERROR, method, err or _errno.EIO, v.tcp_state, v.flags)
        self._deaths.append(HeartbeatDeath(conn.fd, v, now - conn.last_heard, conn.sock, now))

    def _send(self, conn: _PeerConn, frame: bytes, now: float) -> None:
        try:
            conn.sock.send(frame, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except BlockingIOError:
            pass
        except OSError as exc:
            self._die(conn, exc.errno or _errno.EIO, 0, Method.HEARTBEAT, now)

    def _read(self, conn: _PeerConn, now: float) -> None:
        try:
            data = conn.sock.recv(4096, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            self._die(conn, exc.errno or _errno.EIO, 0, Method.EPOLL, now)
            return
        if not data:
            if conn.decoder.pending:
                self._die(conn, _errno.EPROTO, Seen.EOF, Method.HEARTBEAT, now)
            else:
                self._die(conn, 0, Seen.EOF, Method.EPOLL, now)
            return
        conn.last_heard = now
        try:
            frames = conn.decoder.feed(data)
        except FrameError as exc:
            self._die(conn, exc.errno, Seen.DATA, Method.HEARTBEAT, now)
            return
        for f in frames:
            if f.type == FrameType.PING:
                conn.quiet_since = now
                self.pings_answered += 1
                self._send(conn, pong_for(f), now)
                if conn.fd not in self._conns:
                    return
            else:
                self.pongs_received += 1
                if f.seq == conn.seq and conn.ping_due > conn.quiet_since:
                    conn.quiet_since = conn.ping_due

    def step(self, timeout: float) -> List[HeartbeatDeath]:
        """One round: wait up to ``timeout`` seconds for data, read it, then
        ping the silent connections; returns the deaths found."""
        timeout = seconds("timeout", timeout)
        for key, _ in self._sel.select(timeout):
            with self._mutex:
                conn: _PeerConn = key.data
                if self._conns.get(conn.fd) is conn:
                    self._read(conn, time.monotonic())
        now = time.monotonic()
        with self._mutex:
            for conn in list(self._conns.values()):
                if conn.interval is None:
                    continue
                silence = now - conn.last_heard
                if silence >= conn.interval * conn.misses:
                    self._die(conn, _errno.ETIMEDOUT, Seen.EXPIRED,
                              Method.HEARTBEAT, now)
                elif now - conn.quiet_since >= conn.interval and now >= conn.ping_due + conn.interval:
                    conn.seq = (conn.seq + 1) & 0xFFFF
                    conn.ping_due = now
                    self.pings_sent += 1
                    self._send(conn, ping(conn.seq), now)
            deaths, self._deaths = self._deaths, []
        return deaths

    def start(self) -> PyHeartbeatPeer:
        """Run :meth:`step` in a daemon thread until :meth:`stop`."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="PyHeartbeatPeer",
                                        daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            deaths = self.step(0.01)
            if deaths:
                with self._mutex:
                    self._thread_deaths.extend(deaths)

    def take_deaths(self) -> List[HeartbeatDeath]:
        """Deaths found by the :meth:`start` thread since the last call."""
        with self._mutex:
            out, self._thread_deaths = self._thread_deaths, []
        return out

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the :meth:`start` thread (waits up to ``timeout`` seconds for
        it to finish its current step)."""
        timeout = seconds("timeout", timeout)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def close(self) -> None:
        """Stop the thread and close the selector's epoll fd (the sockets
        stay open)."""
        self.stop()
        self._sel.close()

    def __enter__(self) -> PyHeartbeatPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

