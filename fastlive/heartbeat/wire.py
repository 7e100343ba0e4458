"""The heartbeat wire format: 5-byte PING/PONG frames, the Python codec and
the C parser (method 6's bytes on the wire; see docs/heartbeat.md).

Wire format v1 (5 bytes for a PING or PONG)::

    0xFB | version<<4 | type | seq (u16, big-endian) | payload length (0..32) | payload

An application that shares a connection with the engine (``shared=True``)
reserves first byte 0xFB for these frames, answers a PING with
:func:`pong_for` and drops PONGs.
"""
from __future__ import annotations

import enum
import errno as _errno
import os
from typing import List, NamedTuple, Optional, Tuple

from .._lib import ffi, lib

__all__ = [
    "MAGIC", "VERSION", "HEADER_LEN", "MAX_PAYLOAD", "MAX_FRAME",
    "FrameType", "Frame", "FrameError", "encode", "ping", "pong_for", "parse",
    "c_parse", "Decoder",
]

MAGIC: int = lib.FL_HB_MAGIC
VERSION: int = lib.FL_HB_VERSION
HEADER_LEN: int = lib.FL_HB_HEADER_LEN
MAX_PAYLOAD: int = lib.FL_HB_MAX_PAYLOAD
MAX_FRAME: int = HEADER_LEN + MAX_PAYLOAD


class FrameType(enum.IntEnum):
    """The frame type nibble: PING asks for an answer, PONG answers (echoing the seq)."""

    PING = lib.FL_HB_PING
    PONG = lib.FL_HB_PONG


class Frame(NamedTuple):
    """One parsed frame header (the payload, v1: none, is skipped)."""

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
    """A PING frame with sequence number ``seq`` (0..65535)."""
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
        """An empty decoder (no partial frame held)."""
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


