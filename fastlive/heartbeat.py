"""Method 6: an application heartbeat that scales to many connections.

The kernel cannot tell a frozen peer (SIGSTOP, a deadlocked process, a VM
paused by its host) from a healthy idle one: the peer's kernel still ACKs
keepalive probes and TCP_INFO stays ESTABLISHED.  Only the peer's
application can prove it is there, by answering.  This module runs that
question for thousands of connections from one epoll set and one timing
wheel in C (:class:`HeartbeatEngine`), and holds a plain-Python peer
(:class:`PyHeartbeatPeer`) and the frame codec for interop and tests.

Wire format v1 (5 bytes for a PING or PONG)::

    0xFB | version<<4 | type | seq (u16, big-endian) | payload length (0..32) | payload

Rules (see docs/heartbeat.md):

* Idle-only: any byte received counts as life.  A PING goes out only after
  ``interval`` seconds without traffic from the peer (the PONG answering
  our own PING restarts that clock at the PING's due time, so an idle
  healthy connection gets one PING per interval); the connection is
  declared gone after ``misses * interval`` without any byte (``misses >=
  2``: with ``interval=1, misses=3`` PINGs go out at 1 s and 2 s of
  silence, the death is reported at 3 s).  FIN, RST and socket errors are
  reported as soon as epoll sees them.
* A *dedicated* connection (the default) belongs to the engine: it reads
  every byte, and every byte must be a heartbeat frame.  A *shared*
  connection (``shared=True``) stays the application's: the engine never
  reads it, learns about received data from the kernel (TCP_INFO
  ``tcpi_last_data_recv``), and writes a PING only when the kernel's send
  queue is empty.  The application's own framing must reserve first byte
  0xFB, answer PINGs with :func:`pong_for` and drop PONGs.
"""
from __future__ import annotations

import argparse
import enum
import errno as _errno
import os
import selectors
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Deque, Dict, List, NamedTuple, Optional, Tuple

from ._lib import SocketLike, check_rc, fd_of, ffi, lib, timeout_ms
from .verdict import Method, Status, Verdict

__all__ = [
    "MAGIC", "VERSION", "HEADER_LEN", "MAX_PAYLOAD", "MAX_FRAME",
    "FrameType", "Frame", "FrameError", "encode", "ping", "pong_for", "parse",
    "c_parse", "Decoder", "HeartbeatDeath", "RttSample", "EngineStats", "HeartbeatEngine",
    "PyHeartbeatPeer",
]

MAGIC: int = lib.FL_HB_MAGIC
VERSION: int = lib.FL_HB_VERSION
HEADER_LEN: int = lib.FL_HB_HEADER_LEN
MAX_PAYLOAD: int = lib.FL_HB_MAX_PAYLOAD
MAX_FRAME: int = HEADER_LEN + MAX_PAYLOAD


class FrameType(enum.IntEnum):
    PING = lib.FL_HB_PING
    PONG = lib.FL_HB_PONG


class Frame(NamedTuple):
    version: int
    type: FrameType
    seq: int
    payload_len: int


class FrameError(ValueError):
    """A byte stream that is not heartbeat frames; ``errno`` says how
    (EPROTO: bad magic or type, EPROTONOSUPPORT: other version, EMSGSIZE:
    payload longer than MAX_PAYLOAD)."""

    def __init__(self, err: int) -> None:
        super().__init__(f"{_errno.errorcode.get(err, err)}: {os.strerror(err)}")
        self.errno = err


# ---- codec (the Python reference; C has the same rules) -----------------

def encode(type_: int, seq: int) -> bytes:
    """A v1 frame without payload (5 bytes)."""
    if type_ not in (FrameType.PING, FrameType.PONG):
        raise ValueError(f"unknown frame type {type_!r}")
    if not 0 <= seq <= 0xFFFF:
        raise ValueError(f"seq must fit in 16 bits, got {seq}")
    return bytes((MAGIC, (VERSION << 4) | int(type_), seq >> 8, seq & 0xFF, 0))


def ping(seq: int) -> bytes:
    return encode(FrameType.PING, seq)


def pong_for(frame: Frame) -> bytes:
    """The answer to a PING frame."""
    return encode(FrameType.PONG, frame.seq)


def parse(buf: bytes) -> Tuple[int, Optional[Frame]]:
    """Parses the frame at the start of ``buf`` like the C parser does.

    Returns ``(n, frame)``: ``n > 0`` is the whole frame's length, ``n == 0``
    means more bytes are needed (``frame`` is filled once the 5-byte header
    is there), ``n < 0`` is ``-errno`` as soon as the bytes present prove
    the frame bad.
    """
    if not buf:
        return 0, None
    if buf[0] != MAGIC:
        return -_errno.EPROTO, None
    if len(buf) < 2:
        return 0, None
    ver, typ = buf[1] >> 4, buf[1] & 0x0F
    if ver != VERSION:
        return -_errno.EPROTONOSUPPORT, None
    if typ not in (FrameType.PING, FrameType.PONG):
        return -_errno.EPROTO, None
    if len(buf) < HEADER_LEN:
        return 0, None
    plen = buf[4]
    if plen > MAX_PAYLOAD:
        return -_errno.EMSGSIZE, None
    frame = Frame(ver, FrameType(typ), (buf[2] << 8) | buf[3], plen)
    if len(buf) < HEADER_LEN + plen:
        return 0, frame
    return HEADER_LEN + plen, frame


def c_parse(buf: bytes) -> Tuple[int, Optional[Frame]]:
    """The C parser (fl_hb_parse), same contract as :func:`parse`."""
    out = ffi.new("struct fl_hb_frame *")
    out.version = -1
    n = lib.fl_hb_parse(ffi.from_buffer(buf), len(buf), out)
    if out.version < 0:
        return n, None
    return n, Frame(out.version, FrameType(out.type), out.seq, out.payload_len)


class Decoder:
    """Incremental decoder of one connection's byte stream."""

    def __init__(self) -> None:
        self._buf = b""

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buf)

    def feed(self, data: bytes) -> List[Frame]:
        """Complete frames in ``data``; raises :class:`FrameError`."""
        buf = self._buf + data if self._buf else bytes(data)
        frames: List[Frame] = []
        off = 0
        while off < len(buf):
            n, frame = parse(buf[off:off + MAX_FRAME])
            if n < 0:
                self._buf = b""
                raise FrameError(-n)
            if n == 0:
                break
            assert frame is not None
            frames.append(frame)
            off += n
        self._buf = buf[off:]
        return frames


# ---- the C engine -----------------------------------------------------

@dataclass(frozen=True)
class HeartbeatDeath:
    """A connection the engine gave up on (it no longer watches it; the
    socket stays open and is the caller's to close)."""

    fd: int
    verdict: Verdict
    silent: float            #: seconds since anything was last heard
    sock: Optional[SocketLike] = None


@dataclass(frozen=True)
class RttSample:
    fd: int
    rtt: float               #: seconds from PING sent to PONG read


@dataclass(frozen=True)
class EngineStats:
    conns: int
    pings_sent: int
    pings_skipped: int
    pongs_received: int
    pings_answered: int
    frames_received: int
    bytes_received: int
    timer_fires: int
    wakeups: int
    coalesced: int
    deaths: int
    rtt_dropped: int
    late_max: float          #: seconds, deadline -> handled (worst)
    late_mean: float
    tick: float


def _check_schedule(interval: float, misses: int) -> Tuple[int, int]:
    if not interval == interval or interval <= 0 or interval > 0x7FFFFFFF / 1000:
        raise ValueError(f"interval must be > 0 seconds (and < 24 days), got {interval!r}")
    ms = max(1, int(round(interval * 1000)))
    if isinstance(misses, bool) or not isinstance(misses, int) or not 2 <= misses <= 1000:
        raise ValueError(f"misses must be an int in 2..1000, got {misses!r}")
    return ms, misses


class HeartbeatEngine:
    """Heartbeats for many TCP connections, run in C.

    ``wait(timeout)`` runs the engine (releasing the GIL) and returns the
    connections found dead.  The engine is locked while it runs: add() and
    remove() from another thread wait for wait() to return (keep timeouts
    short there).  Inside another event loop, watch :meth:`fileno` for
    readability and call :meth:`poll`.

    ``tick`` is the timer granularity: a deadline is served at the first
    tick boundary at or after it, and while deadlines are due every tick
    the engine sleeps to the boundary and harvests all readiness in one
    pass (FIN/RST are then reported up to one tick later).
    """

    _BATCH = 256

    def __init__(self, tick: float = 0.01, capacity: int = 1024,
                 rtt_samples: int = 4096) -> None:
        tick_ms = int(round(tick * 1000))
        if not 1 <= tick_ms <= 1000:
            raise ValueError(f"tick must be 0.001..1 s, got {tick!r}")
        pp = ffi.new("struct fl_hb **")
        check_rc(lib.fl_hb_new(tick_ms, max(0, int(capacity)), pp))
        self._hb = ffi.gc(pp[0], lib.fl_hb_free)
        self._out = ffi.new("struct fl_hb_event[]", self._BATCH)
        self._socks: Dict[int, SocketLike] = {}
        # sockets whose fd number was reused under them (see add())
        self._stale: Dict[int, SocketLike] = {}
        self._lock = threading.Lock()
        self.rtt: Deque[RttSample] = deque(maxlen=max(1, rtt_samples))

    def _live(self) -> ffi.CData:
        if self._hb is None:
            raise ValueError("the engine is closed")
        return self._hb

    def add(self, sock: SocketLike, interval: float = 1.0, misses: int = 3, *,
            shared: bool = False, rtt: bool = False) -> None:
        """Watch ``sock`` (a connected TCP socket or fd).

        ``shared=False``: the engine owns the read side; every byte must be
        a heartbeat frame.  ``shared=True``: the application reads; see the
        module docstring for its duties.  Keep the socket open until it is
        removed or reported dead.  A socket closed behind the engine's back
        is never written to or read: the engine checks the socket's SO_COOKIE
        before each PING and each read, reports the registration INVALID (EBADF) instead, and a
        new socket that got the same fd number can be added at once.
        """
        ms, misses = _check_schedule(interval, misses)
        fd = fd_of(sock)
        flags = (lib.FL_HB_SHARED if shared else 0) | (lib.FL_HB_RTT if rtt else 0)
        with self._lock:
            check_rc(lib.fl_hb_add(self._live(), fd, ms, misses, flags))
            prev = self._socks.get(fd)
            if prev is not None and prev is not sock:
                self._stale[fd] = prev   # its EBADF death comes with the next wait
            self._socks[fd] = sock

    def remove(self, sock: SocketLike) -> bool:
        """Stop watching; False if it was not watched.  Call it before
        closing the socket: a closed fd number can be reused by the next
        socket, which the engine would then ping.  (A socket object that is
        already closed is still found, by identity.)"""
        fd = fd_of(sock)
        if fd < 0:
            fd = next((k for k, v in self._socks.items() if v is sock), -1)
        with self._lock:
            rc = lib.fl_hb_remove(self._live(), fd)
            self._socks.pop(fd, None)
        if rc == -_errno.ENOENT:
            return False
        check_rc(rc)
        return True

    def __len__(self) -> int:
        return len(self._socks)

    def __contains__(self, sock: SocketLike) -> bool:
        return fd_of(sock) in self._socks

    def fileno(self) -> int:
        """The engine's epoll fd (readable when :meth:`poll` has work)."""
        return int(lib.fl_hb_fileno(self._live()))

    def wait(self, timeout: float) -> List[HeartbeatDeath]:
        """Run for up to ``timeout`` seconds; return as soon as something
        died (every death found so far), or ``[]`` at the timeout."""
        ms = timeout_ms(timeout)
        with self._lock:        # add()/remove() from other threads wait for it
            n = check_rc(lib.fl_hb_wait(self._live(), ms, self._out, self._BATCH))
            return self._collect(n)

    def poll(self) -> List[HeartbeatDeath]:
        """One non-blocking pass (for use with :meth:`fileno`)."""
        return self.wait(0)

    def _collect(self, n: int) -> List[HeartbeatDeath]:
        deaths: List[HeartbeatDeath] = []
        for k in range(n):
            e = self._out[k]
            if e.kind == lib.FL_HB_RTT_SAMPLE:
                self.rtt.append(RttSample(e.fd, e.rtt_us / 1e6))
                continue
            v = Verdict._from_c(e.verdict)
            if v.errno == _errno.EBADF and e.fd in self._stale:
                sock = self._stale.pop(e.fd, None)
            else:
                sock = self._socks.pop(e.fd, None)
            deaths.append(HeartbeatDeath(e.fd, v, e.silent_us / 1e6, sock))
        return deaths

    def stats(self) -> EngineStats:
        st = ffi.new("struct fl_hb_stats *")
        lib.fl_hb_get_stats(self._live(), st)
        return EngineStats(
            st.conns, st.pings_sent, st.pings_skipped, st.pongs_received,
            st.pings_answered, st.frames_received, st.bytes_received,
            st.timer_fires, st.wakeups, st.coalesced, st.deaths, st.rtt_dropped,
            st.late_max_us / 1e6,
            (st.late_sum_us / st.late_count / 1e6) if st.late_count else 0.0,
            st.tick_us / 1e6)

    def reset_stats(self) -> None:
        """Zero the counters of :meth:`stats` (for measuring a window)."""
        lib.fl_hb_reset_stats(self._live())

    def close(self) -> None:
        """Release the engine (the sockets stay open)."""
        with self._lock:
            if self._hb is not None:
                hb, self._hb = self._hb, None
                ffi.release(hb)
                self._socks.clear()

    def __enter__(self) -> HeartbeatEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- plain-Python peer --------------------------------------------------

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
        if interval is not None:
            _check_schedule(interval, misses)
        with self._mutex:
            conn = _PeerConn(sock, interval, misses, time.monotonic())
            self._conns[conn.fd] = conn
            self._sel.register(conn.fd, selectors.EVENT_READ, conn)

    def remove(self, sock: socket.socket) -> None:
        with self._mutex:
            conn = self._conns.pop(sock.fileno(), None)
            if conn is not None:
                self._sel.unregister(conn.fd)

    def __len__(self) -> int:
        return len(self._conns)

    def _die(self, conn: _PeerConn, status: Status, err: int, method: Method,
             now: float) -> None:
        if self._conns.pop(conn.fd, None) is None:
            return
        self._sel.unregister(conn.fd)
        self._deaths.append(HeartbeatDeath(conn.fd, Verdict(status, method, err),
                                  now - conn.last_heard, conn.sock))

    def _send(self, conn: _PeerConn, frame: bytes, now: float) -> None:
        try:
            conn.sock.send(frame, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except BlockingIOError:
            pass
        except OSError as exc:
            err = exc.errno or 0
            st = Status.RESET if err in (_errno.ECONNRESET, _errno.EPIPE) else Status.ERROR
            self._die(conn, st, err, Method.HEARTBEAT, now)

    def _read(self, conn: _PeerConn, now: float) -> None:
        try:
            data = conn.sock.recv(4096, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            err = exc.errno or 0
            st = Status.RESET if err == _errno.ECONNRESET else Status.ERROR
            self._die(conn, st, err, Method.EPOLL, now)
            return
        if not data:
            if conn.decoder.pending:
                self._die(conn, Status.ERROR, _errno.EPROTO, Method.HEARTBEAT, now)
            else:
                self._die(conn, Status.PEER_CLOSED, 0, Method.EPOLL, now)
            return
        conn.last_heard = now
        try:
            frames = conn.decoder.feed(data)
        except FrameError as exc:
            self._die(conn, Status.ERROR, exc.errno, Method.HEARTBEAT, now)
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
                    self._die(conn, Status.TIMED_OUT, _errno.ETIMEDOUT,
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
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def close(self) -> None:
        self.stop()
        self._sel.close()

    def __enter__(self) -> PyHeartbeatPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- a peer process (tests, demo, interop) ----------------------------

def _peer_main(argv: Optional[List[str]] = None) -> int:
    """``python -m fastlive.heartbeat_peer``: see that module."""
    ap = argparse.ArgumentParser(prog="python -m fastlive.heartbeat_peer")
    ap.add_argument("--connect", required=True, help="HOST:PORT (loopback)")
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--interval", type=float, default=None)
    ap.add_argument("--misses", type=int, default=3)
    ap.add_argument("--engine", choices=("c", "py"), default="py")
    ap.add_argument("--lifetime", type=float, default=120.0,
                    help="exit after this many seconds in any case")
    args = ap.parse_args(argv)
    host, _, port = args.connect.rpartition(":")
    socks = [socket.create_connection((host, int(port)), timeout=5)
             for _ in range(args.count)]
    end = time.monotonic() + args.lifetime
    if args.engine == "c":
        eng = HeartbeatEngine(capacity=args.count)
        for s in socks:
            eng.add(s, args.interval or 3600.0, args.misses)
        print("ready", flush=True)
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
