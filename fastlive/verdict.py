"""What a check concluded, and which method concluded it."""
from __future__ import annotations

import enum
import errno as _errno
import os
from dataclasses import dataclass
from typing import Optional, Union

from ._lib import ffi, lib
from .tcpstate import TcpState

__all__ = ["Status", "Method", "Flag", "Seen", "Verdict", "decide", "new_c_verdict"]


class Status(enum.IntEnum):
    """The verdict on a peer.

    ``ALIVE`` means the method saw no sign of death.  It is never proof of
    life: a peer that lost power, or whose link went down, looks ALIVE to
    every method until a timer (keepalive, TCP_USER_TIMEOUT, retransmission,
    or an application heartbeat) runs out.
    """

    ALIVE = lib.FL_ALIVE
    PEER_CLOSED = lib.FL_PEER_CLOSED   #: its FIN arrived (close(), exit, kill)
    RESET = lib.FL_RESET               #: it answered with RST
    TIMED_OUT = lib.FL_TIMED_OUT       #: a timer expired (ETIMEDOUT / EAGAIN)
    UNREACHABLE = lib.FL_UNREACHABLE   #: ICMP host/net unreachable
    ERROR = lib.FL_ERROR               #: another socket error, see errno
    CLOSED = lib.FL_CLOSED             #: the kernel already closed it
    INVALID = lib.FL_INVALID           #: not a connected TCP socket


class Method(enum.IntEnum):
    """Where a verdict came from (the article's methods, and a few more)."""

    PEEK = lib.FL_M_PEEK               #: recv(MSG_PEEK|MSG_DONTWAIT)
    SEND = lib.FL_M_SEND               #: send(MSG_NOSIGNAL) errors
    SO_ERROR = lib.FL_M_SO_ERROR       #: getsockopt(SO_ERROR)
    SELECT = lib.FL_M_SELECT           #: select() then peek
    POLL = lib.FL_M_POLL               #: poll(POLLIN|POLLRDHUP)
    TCP_INFO = lib.FL_M_TCP_INFO       #: getsockopt(TCP_INFO) state
    KEEPALIVE = lib.FL_M_KEEPALIVE     #: SO_KEEPALIVE probes
    RCVTIMEO = lib.FL_M_RCVTIMEO       #: SO_RCVTIMEO read timeout
    HEARTBEAT = lib.FL_M_HEARTBEAT     #: application heartbeat
    EPOLL = lib.FL_M_EPOLL             #: epoll(EPOLLRDHUP) events
    USER_TIMEOUT = lib.FL_M_USER_TIMEOUT  #: TCP_USER_TIMEOUT


class Flag(enum.IntFlag):
    """Details a verdict adds to its status (bits; several may be set)."""

    NONE = 0
    DATA_PENDING = lib.FL_F_DATA_PENDING      #: unread bytes are queued
    SUSPECT = lib.FL_F_SUSPECT                #: TCP_INFO: sender struggling
    SELECT_FALLBACK = lib.FL_F_SELECT_FALLBACK  #: fd >= FD_SETSIZE, poll used
    WRITE_OPEN = lib.FL_F_WRITE_OPEN          #: half-close: we may still send
    #: our own shutdown() explains what was seen (the peer is not blamed)
    LOCAL_SHUTDOWN = lib.FL_F_LOCAL_SHUTDOWN
    #: the fd was closed (or its number reused) behind the engine's back
    BEHIND_BACK = lib.FL_F_BEHIND_BACK


class Seen(enum.IntFlag):
    """What a path observed, for :func:`decide` (poll bits keep their
    poll(2) values, so ``revents`` can be passed as they are)."""

    NONE = 0
    IN = lib.FL_EV_IN                  #: readable
    ERR = lib.FL_EV_ERR                #: POLLERR: pass the SO_ERROR as ``err``
    HUP = lib.FL_EV_HUP                #: POLLHUP: both directions shut
    NVAL = lib.FL_EV_NVAL              #: POLLNVAL: fd not open
    RDHUP = lib.FL_EV_RDHUP            #: POLLRDHUP: the read side is shut
    EOF = lib.FL_EV_EOF                #: a read returned 0 bytes
    DATA = lib.FL_EV_DATA              #: a read returned bytes
    UNCONNECTED = lib.FL_EV_UNCONNECTED  #: CLOSE, and no segment ever
    EXPIRED = lib.FL_EV_EXPIRED        #: the method's own deadline passed


_DEAD = frozenset({Status.PEER_CLOSED, Status.RESET, Status.TIMED_OUT,
                   Status.UNREACHABLE, Status.ERROR, Status.CLOSED})


@dataclass(frozen=True)
class Verdict:
    """One check's answer about one socket."""

    status: Status
    method: Method
    errno: int = 0
    tcp_state: Optional[Union[TcpState, int]] = None
    flags: Flag = Flag.NONE

    @property
    def alive(self) -> bool:
        """No sign of death (not proof of life; see :class:`Status`)."""
        return self.status is Status.ALIVE

    @property
    def dead(self) -> bool:
        """The peer is gone, closed its side, or the connection is over."""
        return self.status in _DEAD

    @property
    def invalid(self) -> bool:
        """Not a connected TCP socket (closed fd, pipe, UDP, listening, connecting)."""
        return self.status is Status.INVALID

    @property
    def suspect(self) -> bool:
        """TCP_INFO says the sender is struggling (retransmits, probes, backoff,
        or no ACK for more than 2 RTOs) while the state is still ESTABLISHED."""
        return bool(self.flags & Flag.SUSPECT)

    def __str__(self) -> str:
        parts = [self.status.name.lower(), f"by {self.method.name.lower()}"]
        if self.errno:
            name = _errno.errorcode.get(self.errno, str(self.errno))
            parts.append(f"{name}: {os.strerror(self.errno)}")
        if self.tcp_state is not None:
            st = self.tcp_state
            parts.append(f"state {st.name if isinstance(st, TcpState) else st}")
        parts += [f.name.lower() for f in Flag if f and f in self.flags and f.name]
        return ", ".join(parts)

    @classmethod
    def _from_c(cls, v: ffi.CData) -> Verdict:
        st = v.tcp_state
        return cls(Status(v.status), Method(v.method), v.err,
                   TcpState.of(st) if st >= 0 else None, Flag(v.flags))


def new_c_verdict() -> ffi.CData:
    """A zeroed ``struct fl_verdict`` for the C checks to fill."""
    return ffi.new("struct fl_verdict *")


def decide(method: Method, err: int = 0, tcp_state: int = -1,
           seen: Union[Seen, int] = Seen.NONE, flags: Union[Flag, int] = Flag.NONE) -> Verdict:
    """The one rule (C ``fl_verdict_decide``, see ``csrc/fl_core.h``) from
    Python: the verdict an observation means - ``err`` the errno seen (0 for
    none), ``tcp_state`` the TCP state or -1 when not read, ``seen`` the
    :class:`Seen` bits - for code that must conclude something outside the
    C paths (it never maps errno or state itself)."""
    v = new_c_verdict()
    v.method = int(method)
    v.flags = int(flags)
    lib.fl_verdict_decide(int(err), int(tcp_state), int(seen), v)
    return Verdict._from_c(v)
