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

from .engine import EngineStats, HeartbeatDeath, HeartbeatEngine, RttSample
from .peer import PyHeartbeatPeer
from .wire import (HEADER_LEN, MAGIC, MAX_FRAME, MAX_PAYLOAD, VERSION, Decoder, Frame,
                   FrameError, FrameType, c_parse, encode, parse, ping, pong_for)

__all__ = [
    "MAGIC", "VERSION", "HEADER_LEN", "MAX_PAYLOAD", "MAX_FRAME",
    "FrameType", "Frame", "FrameError", "encode", "ping", "pong_for", "parse",
    "c_parse", "Decoder", "HeartbeatDeath", "RttSample", "EngineStats", "HeartbeatEngine",
    "PyHeartbeatPeer",
]
