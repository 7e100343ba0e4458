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
        for kw in ({"idle": 0}, {"interval": 40000}, {"count": 128}, {"user_timeout": -1}):
            with pytest.raises(ValueError):
                fastlive.set_keepalive(s, **kw)
        with pytest.raises(TypeError, match="count"):
            fastlive.set_keepalive(s, count=1.5)            # a wrong type
        with pytest.raises(ValueError):
            fastlive.detect_within(s, 1.5)


# --- numbers: one validator, errors name the parameter, never OverflowError ------

@pytest.mark.parametrize("bad,exc", [
    (float("inf"), ValueError), (1e300, ValueError), (2**63, ValueError),
    (-1e-9, ValueError), (True, TypeError), ("1", TypeError), (None, ValueError)])
@pytest.mark.parametrize("call", [
    lambda s, t: fastlive.check_poll(s, t), lambda s, t: fastlive.check_select(s, t),
    lambda s, t: fastlive.check_rcvtimeo(s, t),
    lambda s, t: fastlive.Batch([s]).sweep_poll(t),
    lambda s, t: fastlive.Monitor().wait(t)], ids=["poll", "select", "rcvtimeo", "sweep", "monitor"])
def test_timeouts_refused_with_the_parameter_named(call, bad, exc, request):
    if bad is None and "rcvtimeo" in request.node.name:
        pytest.skip("check_rcvtimeo(timeout=None) means: the socket's SO_RCVTIMEO")
    with socket.socket() as s:
        with pytest.raises(exc, match="timeout"):
            call(s, bad)


def test_wait_accepts_the_maximum():
    from fastlive._lib import MAX_SECONDS, timeout_ms
    assert timeout_ms(MAX_SECONDS) == 0x7FFFFFFF
    with pytest.raises(ValueError, match="timeout"):
        timeout_ms(MAX_SECONDS + 0.001)


@pytest.mark.parametrize("fd", [-2**31 - 1, -2**63, 2**31, 2**63])
def test_out_of_range_fds_are_invalid_not_overflow(fd):
    for check in CHECKS:
        v = check(fd)
        assert (v.status, v.errno) == (Status.INVALID, errno.EBADF)
    b = fastlive.Batch([fd])
    assert b.dead()[0][2:4] == (Status.INVALID, errno.EBADF)


def test_set_timeouts_rounding_and_range(loopback_pair):
    cli, _ = loopback_pair
    fastlive.set_timeouts(cli, recv=1e-7, send=1e-9)
    rcv, snd = fastlive.get_timeouts(cli)
    assert rcv > 0 and snd > 0                      # rounded up, not turned off
    for bad in (25 * 86400, float("inf"), 1e300):
        with pytest.raises(ValueError, match="recv"):
            fastlive.set_timeouts(cli, recv=bad)
    with pytest.raises(TypeError, match="send"):
        fastlive.set_timeouts(cli, send=True)


def test_rcvtimeo_longer_than_poll_can_wait_is_refused(loopback_pair):
    """SO_RCVTIMEO set outside fastlive beyond 24.8 days: INVALID/EINVAL at
    once, never a bogus TIMED_OUT nor a wait without end."""
    import struct
    import time
    cli, _ = loopback_pair
    for days in (24.9, 30, 50, 1000):
        secs = int(days * 86400)
        cli.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", secs, 0))
        t = time.monotonic()
        v = fastlive.check_rcvtimeo(cli)
        assert time.monotonic() - t < 0.5
        assert (v.status, v.errno) == (Status.INVALID, errno.EINVAL), days
    cli.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 200000))
    assert fastlive.check_rcvtimeo(cli).status is Status.TIMED_OUT


def test_send_wrong_data_type_is_a_clear_typeerror(loopback_pair):
    import tracemalloc
    cli, srv = loopback_pair
    with pytest.raises(TypeError, match="data must be a bytes-like object, got str"):
        fastlive.send(cli, "str")               # type: ignore[arg-type]

    def many() -> None:
        for _ in range(2000):
            try:
                fastlive.send(cli, "str")       # type: ignore[arg-type]
            except TypeError:
                pass

    many()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        many()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 4096, grown
    for data in (bytearray(b"ab"), memoryview(b"cd"), memoryview(bytes(8)).cast("I")):
        r = fastlive.send(cli, data)
        assert r.verdict.alive and r.sent == len(bytes(data))
    with pytest.raises(ValueError, match="flags"):
        fastlive.send(cli, b"x", flags=-1)
