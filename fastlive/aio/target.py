"""What ``conn`` is: a StreamWriter, a Transport, a socket or an fd, reduced
to the one TCP socket behind it (and the protocol whose ``connection_lost``
tells of a local close)."""
from __future__ import annotations

import asyncio
import numbers
import os
import socket
import stat
from typing import Any, NamedTuple, Optional

__all__ = ["Target", "resolve", "check_within"]

_TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)
_MAX_WITHIN = 32767.0   # the kernel's TCP_KEEPIDLE/KEEPINTVL limit (seconds)


class Target(NamedTuple):
    """The socket behind a ``conn`` argument."""

    fd: int                 #: -1 when the connection is already closed
    sock: Any               #: what Monitor.add() gets (socket-like, or the fd)
    transport: Any          #: the transport (None for a socket or an fd)
    protocol: Any           #: the transport's protocol (None without one)
    closing: bool           #: closed or closing on this side already


def check_within(within: object) -> Optional[float]:
    """``within`` is None or seconds in 2..32767 (keepalive's range)."""
    if within is None:
        return None
    if isinstance(within, bool) or not isinstance(within, numbers.Real):
        raise TypeError(f"within must be seconds (a number) or None, got {type(within).__name__}")
    w = float(within)
    if not 2.0 <= w <= _MAX_WITHIN:
        raise ValueError(f"within must be 2..{_MAX_WITHIN:.0f} seconds (the kernel's keepalive "
                         f"timers count whole seconds, and one probe may be lost), got {within!r}")
    return w


def _check_family(family: int, type_: int, what: str) -> None:
    if type_ != socket.SOCK_STREAM:
        kind = "UDP (datagram)" if type_ == socket.SOCK_DGRAM else f"type {type_}"
        raise ValueError(f"conn: {what} is a {kind} socket; peer_gone watches TCP connections")
    if family not in _TCP_FAMILIES:
        name = "unix" if family == socket.AF_UNIX else f"family {family}"
        raise ValueError(f"conn: {what} is a {name} socket; peer_gone watches TCP connections "
                         "(AF_INET, AF_INET6)")


def _check_fd(fd: int, what: str) -> None:
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise ValueError(f"conn: fd {fd} is not open ({e.strerror})") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ValueError(f"conn: fd {fd} is not a socket")
    s = socket.socket(fileno=fd)        # reads SO_DOMAIN / SO_TYPE; detached below
    try:
        _check_family(s.family, s.type, what)
    finally:
        s.detach()


def _sock_fd(sock: Any) -> int:
    try:
        fd = sock.fileno()
    except (OSError, ValueError):
        return -1
    if not isinstance(fd, int) or isinstance(fd, bool):
        raise TypeError("conn: fileno() did not return an int")
    return fd


def _of_transport(tr: Any, loop: asyncio.AbstractEventLoop, what: str) -> Target:
    if isinstance(tr, asyncio.DatagramTransport):
        raise ValueError(f"conn: {what} is a UDP (datagram) transport; peer_gone watches TCP "
                         "connections")
    tl = getattr(tr, "_loop", None)
    if isinstance(tl, asyncio.AbstractEventLoop) and tl is not loop:
        raise ValueError(f"conn: {what} belongs to another event loop; await peer_gone() in "
                         "the loop that runs the connection")
    sock = tr.get_extra_info("socket")
    proto = tr.get_protocol() if hasattr(tr, "get_protocol") else None
    if tr.is_closing():
        return Target(-1, sock, tr, proto, True)
    if sock is None:
        raise ValueError(f"conn: {what} has no socket (a pipe or subprocess transport?); "
                         "peer_gone watches TCP connections")
    _check_family(int(sock.family), int(sock.type), what)
    fd = _sock_fd(sock)
    return Target(fd, sock, tr, proto, fd < 0)


def resolve(conn: Any, loop: asyncio.AbstractEventLoop) -> Target:
    """The TCP socket behind ``conn``; ValueError / TypeError (naming
    ``conn``) for anything that is not a TCP connection of this loop."""
    if isinstance(conn, asyncio.StreamWriter):
        wl = getattr(conn, "_loop", None)
        if isinstance(wl, asyncio.AbstractEventLoop) and wl is not loop:
            raise ValueError("conn: the StreamWriter belongs to another event loop; await "
                             "peer_gone() in the loop that runs the connection")
        return _of_transport(conn.transport, loop, "the StreamWriter's transport")
    if isinstance(conn, bool):
        raise TypeError("conn must be a StreamWriter, a Transport, a socket or an fd, got bool")
    if isinstance(conn, int):
        if conn < 0 or conn > 0x7FFFFFFF:
            raise ValueError(f"conn: fd must be 0..2**31-1, got {conn}")
        _check_fd(conn, f"fd {conn}")
        return Target(conn, conn, None, None, False)
    if callable(getattr(conn, "get_extra_info", None)) and callable(getattr(conn, "is_closing", None)):
        return _of_transport(conn, loop, f"the {type(conn).__name__}")
    if callable(getattr(conn, "fileno", None)):
        fd = _sock_fd(conn)
        if fd < 0:
            return Target(-1, conn, None, None, True)
        family, type_ = getattr(conn, "family", None), getattr(conn, "type", None)
        if isinstance(family, int) and isinstance(type_, int):
            _check_family(family, type_, f"the {type(conn).__name__}")
        else:
            _check_fd(fd, f"the {type(conn).__name__}")
        return Target(fd, conn, None, None, False)
    raise TypeError("conn must be a StreamWriter, a Transport, a socket or an fd, "
                    f"got {type(conn).__name__}")
