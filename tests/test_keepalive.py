"""Method 4: keepalive / TCP_USER_TIMEOUT settings and the worst-case math.
(The timers really firing on a silently dead peer is tested inside a
network-namespace pair in test_silent_death.py.)"""
from __future__ import annotations

import math
import socket

import pytest
from hypothesis import given, strategies as st

import fastlive
from fastlive import KeepaliveSettings, detection_time
from fastlive.keepalive import read_sysctl_defaults


@pytest.fixture
def sock():
    with socket.create_server(("127.0.0.1", 0)) as lst:
        cli = socket.create_connection(lst.getsockname(), timeout=5)
        srv, _ = lst.accept()
    yield cli
    cli.close()
    srv.close()


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


def test_sysctl_defaults_are_read():
    d = read_sysctl_defaults()
    assert d.idle > 0 and d.interval > 0 and d.count > 0


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
