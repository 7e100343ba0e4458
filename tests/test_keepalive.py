"""Method 4: keepalive / TCP_USER_TIMEOUT settings and the worst-case math.
(The timers really firing on a silently dead peer is tested inside a
network-namespace pair in test_silent_death.py.)"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

import fastlive
from fastlive import KeepaliveSettings, detection_time
from fastlive.keepalive import read_sysctl_defaults

from _scale import scaled


@pytest.fixture
def sock(loopback_pair):
    return loopback_pair[0]


def test_kernel_defaults_give_7875_seconds():
    d = KeepaliveSettings(True, 7200, 75, 9)
    assert detection_time(d) == 7875.0
    assert detection_time(KeepaliveSettings(False, 7200, 75, 9)) == math.inf


def test_busy_connection_hangs_about_925_seconds():
    assert fastlive.retransmit_timeout(15) == pytest.approx(924.6)
    assert fastlive.retransmit_timeout(3) == pytest.approx(3.0)   # 0.2+0.4+0.8+1.6
    busy = detection_time(KeepaliveSettings(True, 1, 1, 3), busy=True)
    assert busy == pytest.approx(924.6)   # keepalive is off while data is in flight


def test_user_timeout_bounds_busy_and_caps_keepalive():
    s = KeepaliveSettings(True, 10, 5, 9, user_timeout=12.0)
    assert detection_time(s, busy=True) == 12.0 + fastlive.keepalive.BUSY_SLACK
    # first probe check at or past 12 s after silence: 10 + 5 x 1 = 15
    assert detection_time(s) == 15.0
    assert detection_time(KeepaliveSettings(True, 10, 5, 9, 3.0)) == 15.0


def _proc(name):
    with open(f"/proc/sys/net/ipv4/{name}") as f:
        return int(f.read())


def test_sysctl_defaults_are_the_proc_values():
    d = read_sysctl_defaults()
    assert (d.idle, d.interval, d.count) == (
        _proc("tcp_keepalive_time"), _proc("tcp_keepalive_intvl"), _proc("tcp_keepalive_probes"))
    assert not d.enabled and d.user_timeout == 0.0


def test_sysctl_read_errors_are_visible(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_sysctl_defaults(str(tmp_path))
    for name, text in (("tcp_keepalive_time", "300\n"), ("tcp_keepalive_intvl", "oops\n"),
                       ("tcp_keepalive_probes", "4\n")):
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match="tcp_keepalive_intvl.*oops"):
        read_sysctl_defaults(str(tmp_path))
    (tmp_path / "tcp_keepalive_intvl").write_text("20\n")
    assert read_sysctl_defaults(str(tmp_path)) == KeepaliveSettings(False, 300, 20, 4)


_IN_NETNS = r"""
import socket, sys
from fastlive.keepalive import get_keepalive, read_sysctl_defaults
for name, value in (("time", 1234), ("intvl", 56), ("probes", 7)):
    with open(f"/proc/sys/net/ipv4/tcp_keepalive_{name}", "w") as f:
        f.write(str(value))
d = read_sysctl_defaults()
got = get_keepalive(socket.socket())
print(d.idle, d.interval, d.count, got.idle, got.interval, got.count)
"""


@pytest.mark.no_qemu("unshare needs root and network namespaces")
def test_sysctl_defaults_follow_the_namespace():
    # In a fresh network namespace (the sysctls are per namespace), set
    # values no kernel defaults to: the reader and a fresh socket see them.
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1)")
    out = subprocess.run(["unshare", "--net", sys.executable, "-c", _IN_NETNS],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    if out.returncode != 0 and "unshare failed" in out.stderr:
        pytest.skip(f"unshare: {out.stderr.strip()}")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1234", "56", "7"] * 2


def test_fresh_socket_reads_namespace_defaults(sock):
    got = fastlive.get_keepalive(sock)
    d = read_sysctl_defaults()
    assert not got.enabled
    assert (got.idle, got.interval, got.count) == (d.idle, d.interval, d.count)
    assert got.user_timeout == 0.0


def test_set_keepalive_roundtrip(sock):
    got = fastlive.set_keepalive(sock, idle=30, interval=4, count=5, user_timeout=2.5)
    assert got == KeepaliveSettings(True, 30, 4, 5, 2.5)
    got = fastlive.set_keepalive(sock, False)
    assert not got.enabled and got.idle == 30      # None leaves options alone


@settings(max_examples=scaled(100))
@given(st.floats(min_value=2, max_value=100000, allow_nan=False))
def test_plan_within_never_exceeds_the_bound(seconds):
    plan = fastlive.plan_within(seconds)
    assert plan.idle >= 1 and plan.interval >= 1 and 1 <= plan.count <= 3
    idle_bound = detection_time(plan)
    busy_bound = detection_time(plan, busy=True)
    assert idle_bound <= seconds and busy_bound <= seconds
    assert idle_bound <= plan.idle + plan.interval * plan.count
    assert max(idle_bound, busy_bound) == int(min(seconds, 32767))
    if seconds >= 4:
        assert plan.count == 3


@pytest.mark.parametrize("seconds,expect", [(2, (1, 1, 1)), (3, (1, 1, 2)), (4, (1, 1, 3)),
                                            (10, (7, 1, 3)), (60, (30, 10, 3))])
def test_plan_examples(seconds, expect):
    p = fastlive.plan_within(seconds)
    assert (p.idle, p.interval, p.count) == expect


def test_detect_within_sets_and_reports(sock):
    bound = fastlive.detect_within(sock, 10)
    assert bound.seconds == 10.0
    s = fastlive.get_keepalive(sock)
    assert s == bound.settings
    assert s.enabled and (s.idle, s.interval, s.count) == (7, 1, 3)
    assert s.user_timeout == 8.5          # BUSY_SLACK short of the bound


def test_user_timeout_rounds_up_to_a_millisecond(sock):
    # 0.4 ms must not become 0, which the kernel reads as "off"
    assert fastlive.set_keepalive(sock, user_timeout=0.0004).user_timeout == 0.001
    assert fastlive.set_keepalive(sock, user_timeout=2.0001).user_timeout == 2.001
    assert fastlive.set_keepalive(sock, user_timeout=0).user_timeout == 0.0


@pytest.mark.parametrize("kw,exc", [
    (dict(user_timeout=math.inf), ValueError), (dict(user_timeout=math.nan), ValueError),
    (dict(user_timeout=-1), ValueError), (dict(user_timeout=1e300), ValueError),
    (dict(user_timeout=True), TypeError), (dict(user_timeout="1"), TypeError),
    (dict(idle=0), ValueError), (dict(idle=32768), ValueError), (dict(idle=2**70), ValueError),
    (dict(idle=1.5), TypeError), (dict(idle=True), TypeError),
    (dict(interval=-3), ValueError), (dict(interval="5"), TypeError),
    (dict(count=128), ValueError), (dict(count=False), TypeError),
])
def test_set_keepalive_bad_numbers_name_the_parameter(sock, kw, exc):
    before = fastlive.get_keepalive(sock)
    with pytest.raises(exc, match=next(iter(kw))):
        fastlive.set_keepalive(sock, **kw)
    assert fastlive.get_keepalive(sock) == before      # nothing was set


@pytest.mark.parametrize("value,exc", [
    ("10", TypeError), (None, TypeError), (True, TypeError), (math.inf, ValueError),
    (math.nan, ValueError), (1e300, ValueError), (1.5, ValueError), (-5, ValueError),
])
def test_detect_within_bad_bound_names_the_parameter(sock, value, exc):
    before = fastlive.get_keepalive(sock)
    with pytest.raises(exc, match="seconds"):
        fastlive.detect_within(sock, value)
    with pytest.raises(exc, match="seconds"):
        fastlive.plan_within(value)
    assert fastlive.get_keepalive(sock) == before


def test_math_helpers_check_their_input():
    with pytest.raises(TypeError, match="retries"):
        fastlive.retransmit_timeout(2.5)
    with pytest.raises(ValueError, match="retries"):
        fastlive.retransmit_timeout(-1)
    with pytest.raises(TypeError, match="retries2"):
        detection_time(KeepaliveSettings(True, 1, 1, 1), busy=True, retries2="15")
    with pytest.raises(TypeError, match="settings"):
        detection_time((True, 1, 1, 1))


def test_detect_within_32767_is_the_kernels_limit(sock):
    bound = fastlive.detect_within(sock, 10**6)
    assert bound.seconds == 32767.0
    s = bound.settings
    assert s.idle <= 32767 and s.interval <= 32767 and s.user_timeout == 32767 - 1.5
