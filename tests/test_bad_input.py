"""Bad input: a documented verdict or a clear exception, never a crash or
a hang.  Checks return INVALID with the errno; getters and setters raise
OSError; wrong types raise TypeError; out-of-range values ValueError."""
from __future__ import annotations

import errno
import os
import socket

import pytest

import fastlive
from fastlive import Status

CHECKS = [fastlive.check_peek, fastlive.check_poll, fastlive.check_select,
          fastlive.check_tcp_info, fastlive.check_so_error,
          lambda s: fastlive.check_rcvtimeo(s, timeout=0),
          lambda s: fastlive.send(s, b"x").verdict]
IDS = ["peek", "poll", "select", "tcp_info", "so_error", "rcvtimeo", "send"]


def _closed_socket():
    s = socket.socket()
    s.close()
    return s, (errno.EBADF,)


def _closed_fd():
    s = socket.socket()
    fd = s.detach()
    os.close(fd)
    return fd, (errno.EBADF,)


def _pipe():
    r, w = os.pipe()
    return r, (errno.ENOTSOCK,)


def _udp():
    return socket.socket(socket.AF_INET, socket.SOCK_DGRAM), (errno.EOPNOTSUPP, errno.ENOPROTOOPT)


def _udp_connected():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("127.0.0.1", 9))
    return s, (errno.EOPNOTSUPP, errno.ENOPROTOOPT)


def _unix():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return a, (errno.EOPNOTSUPP, errno.ENOPROTOOPT)


def _listening():
    return socket.create_server(("127.0.0.1", 0)), (errno.EOPNOTSUPP,)


def _unconnected():
    return socket.socket(), (errno.ENOTCONN,)


BAD = {"closed-socket": _closed_socket, "closed-fd": _closed_fd,
       "minus-one": lambda: (-1, (errno.EBADF,)),
       "huge-fd": lambda: (2**40, (errno.EBADF,)),
       "pipe": _pipe, "udp": _udp, "udp-connected": _udp_connected,
       "unix": _unix, "listening": _listening, "unconnected": _unconnected}


# A never-connected socket is told from a finished one by tcpi_segs_in/out
# (Linux 4.2+); where TCP_INFO is shorter (qemu-user: 4 bytes) it is CLOSED.
_NEEDS_SEGS = pytest.mark.tcp_info_fields("segs_in", "segs_out")


@pytest.mark.parametrize("make", [
    pytest.param(f, id=k, marks=_NEEDS_SEGS if f is _unconnected else ())
    for k, f in BAD.items()])
@pytest.mark.parametrize("check", CHECKS, ids=IDS)
def test_checks_give_invalid_verdict(make, check):
    obj, errnos = make()
    v = check(obj)
    if check is CHECKS[-1] and make is _udp_connected:
        # send() validates the socket only when the write fails; a datagram
        # on a connected UDP socket is simply sent (documented).
        assert v.alive
        return
    if check is CHECKS[-1]:
        assert v.status is Status.INVALID, v
        assert v.errno != 0
    else:
        assert v.status is Status.INVALID, v
        assert v.errno in errnos, v
    assert not v.alive and not v.dead


@pytest.mark.parametrize("make", BAD.values(), ids=BAD.keys())
def test_getters_raise_oserror(make):
    obj, _ = make()
    if make is _unconnected:
        # an unconnected TCP socket has a TCP_INFO record and options
        assert fastlive.tcp_info(obj).state is fastlive.TcpState.CLOSE
        assert fastlive.get_keepalive(obj).idle > 0
        return
    if make is _listening:
        assert fastlive.tcp_info(obj).state is fastlive.TcpState.LISTEN
        return
    with pytest.raises(OSError):
        fastlive.tcp_info(obj)
    if make not in (_udp, _udp_connected, _unix):  # SO_KEEPALIVE exists there
        with pytest.raises(OSError):
            fastlive.get_keepalive(obj)
    with pytest.raises(OSError):
        fastlive.set_keepalive(obj, idle=5)


@pytest.mark.parametrize("bad", ["3", 3.0, None, True, object()])
def test_wrong_types_raise_typeerror(bad):
    with pytest.raises(TypeError):
        fastlive.check_poll(bad)


def test_bad_timeouts_raise_valueerror():
    s = socket.socket()
    with s:
        for t in (-1, float("nan"), None):
            with pytest.raises(ValueError):
                fastlive.check_poll(s, timeout=t)


def test_keepalive_ranges_raise_valueerror():
    with socket.socket() as s:
        for kw in ({"idle": 0}, {"interval": 40000}, {"count": 128}, {"count": 1.5},
                   {"user_timeout": -1}):
            with pytest.raises(ValueError):
                fastlive.set_keepalive(s, **kw)
        with pytest.raises(ValueError):
            fastlive.detect_within(s, 1.5)
