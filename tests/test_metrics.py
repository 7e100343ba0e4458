"""fastlive.metrics: the census tally, the process ledger, the
prometheus_client collector and the OpenTelemetry instruments, on real
sockets, real Monitors and real deaths."""
from __future__ import annotations

import gc
import math
import socket
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

import fastlive
from fastlive._lib import ffi, lib
from fastlive.census import Timer
from fastlive.metrics import LEDGER, MachineSampler, process_figures

from _scale import scaled
from _metrics_util import close_wait_on, counted_monitor, open_fds, wait_deaths

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from fastlive.metrics.prometheus import FastliveCollector, register  # noqa: E402

pytestmark = pytest.mark.no_qemu("netlink sock_diag")

STATES = ["established", "syn_sent", "syn_recv", "fin_wait1", "fin_wait2", "time_wait",
          "close", "close_wait", "last_ack", "listen", "closing"]


def families(registry):
    text = generate_latest(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams, name, **labels):
    """The sample of family ``name`` whose labels include ``labels``."""
    for fam in fams.values():
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(f"{name} {labels}")


# --- import hygiene -------------------------------------------------------------

def test_import_fastlive_does_not_import_clients():
    code = ("import sys, fastlive, fastlive.metrics; "
            "bad = [m for m in sys.modules if m.startswith(('prometheus_client', 'opentelemetry'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# --- the C tally against the same records read in Python ------------------------

def test_tally_matches_the_records(loopback_pairs):
    lsts = [socket.create_server(("127.0.0.1", 0)) for _ in range(3)]
    held = []
    try:
        for n, lst in zip((4, 2, 1), lsts):
            held += close_wait_on(n, lst)[0]
        pairs = loopback_pairs(5)
        assert pairs
        c = fastlive.census()
        t = ffi.new("struct fl_tally *")
        scratch = ffi.new("uint32_t[65536]")
        k = 2
        ports, counts = ffi.new("uint16_t[]", k), ffi.new("uint32_t[]", k)
        got = lib.fl_census_tally(c._c, t, scratch, ports, counts, k)
        assert got == min(k, t.close_wait_ports)
        assert not any(scratch[i] for i in range(65536))     # left zeroed
        states = {}
        cw = {}
        retrans = zero = suspect = 0
        for e in c:
            st = int(e.state)
            states[st] = states.get(st, 0) + 1
            if st == fastlive.TcpState.CLOSE_WAIT:
                cw[e.local[1]] = cw.get(e.local[1], 0) + 1
            if e.timer == Timer.RETRANSMIT and e.retrans > 0:
                retrans += 1
            info = e.info
            if e.timer == Timer.ZERO_WINDOW or (
                    st == fastlive.TcpState.ESTABLISHED and e.wqueue > 0 and info is not None
                    and getattr(info, "snd_wnd", None) == 0):
                zero += 1
            suspect += e.suspect
        assert t.sockets == len(c)
        assert {s: t.states[s] for s in states} == states
        assert sum(t.states) == len(c)
        assert t.retransmitting == retrans and t.zero_window == zero
        assert sum(t.suspect) == suspect
        top = sorted(cw.items(), key=lambda pc: (-pc[1], pc[0]))
        assert [(ports[i], counts[i]) for i in range(got)] == top[:k]
        assert t.close_wait_rest == sum(n for _, n in top[k:])
        assert t.close_wait_ports == len(cw)
        # our own ports are there with their exact counts
        ours = {lst.getsockname()[1]: n for n, lst in zip((4, 2, 1), lsts)}
        assert all(cw[p] == n for p, n in ours.items())
    finally:
        for s in held + lsts:
            s.close()


def test_tally_rejects_bad_arguments():
    c = fastlive.census(states="listen")
    t = ffi.new("struct fl_tally *")
    scratch = ffi.new("uint32_t[65536]")
    assert lib.fl_census_tally(ffi.NULL, t, scratch, ffi.NULL, ffi.NULL, 0) < 0
    assert lib.fl_census_tally(c._c, t, scratch, ffi.NULL, ffi.NULL, 1) < 0
    assert lib.fl_census_tally(c._c, t, scratch, ffi.NULL, ffi.NULL, -1) < 0
    assert lib.fl_census_tally(c._c, t, scratch, ffi.NULL, ffi.NULL, 0) == 0


# --- machine figures in a namespace of our own: exact values --------------------

def test_machine_figures_exact_in_a_fresh_namespace(netns_pair):
    pair = netns_pair
    with pair.inside_a():
        sampler = MachineSampler(top=2)
        base = sampler.sample()      # opens the dump socket inside A
        lsts = [socket.create_server(("127.0.0.1", 0)) for _ in range(3)]
        held = []
        for n, lst in zip((5, 3, 1), lsts):
            held += close_wait_on(n, lst)[0]
        w = socket.create_connection(lsts[0].getsockname(), timeout=5)
        r, _ = lsts[0].accept()
    try:
        # only pair.local lived here before
        assert base.sockets == 1 and base.states["established"] == 1
        f = sampler.sample()
        p = [lst.getsockname()[1] for lst in lsts]
        assert f.states["listen"] == 3
        assert f.states["close_wait"] == 9
        # the closed client ends: FIN_WAIT2 (or its timewait form, reported alike)
        assert sum(f.states[s] for s in ("fin_wait1", "fin_wait2", "time_wait")) == 9, f
        assert f.states["established"] == 3            # pair.local, w, r
        assert f.close_wait_top == [(p[0], 5), (p[1], 3)]
        assert f.close_wait_rest == 1 and f.close_wait_ports == 3
        assert f.zero_window == 0 and f.retransmitting == 0
        assert set(f.states) == set(STATES)

        # zero window: r never reads, w fills its window
        w.setblocking(False)
        with pytest.raises(BlockingIOError):
            for _ in range(10_000):
                w.send(b"z" * 65536)
        # retransmissions: the peer's packets vanish (nothing comes back)
        pair.blackhole()
        pair.local.send(b"ping")
        end = time.monotonic() + 10
        while time.monotonic() < end:
            f = sampler.sample()
            if f.zero_window == 1 and f.retransmitting == 1:
                break
            time.sleep(0.1)
        assert f.zero_window == 1, f
        assert f.retransmitting == 1, f
        assert f.suspect["retransmits"] >= 1, f
    finally:
        for s in held + lsts + [w, r]:
            s.close()
        sampler.close()


# --- process figures: real Monitors, real deaths ---------------------------------

def test_deaths_counted_and_kept_after_close(many_peers):
    before = process_figures()
    mon = counted_monitor()
    socks = many_peers.connect(6)
    try:
        for s in socks:
            mon.add(s)
        f = process_figures()
        assert f.monitored - before.monitored == 6
        assert f.engines - before.engines == 1
        many_peers.rst(socks[:2])
        many_peers.fin(socks[2:3])
        deaths = wait_deaths(mon, 3)
        f = process_figures()
        got = {}
        for d in deaths:
            key = (d.status.name.lower(), d.method.name.lower())
            got[key] = got.get(key, 0) + 1
        for key, n in got.items():
            assert f.deaths.get(key, 0) - before.deaths.get(key, 0) == n
        assert ("reset", deaths[0].method.name.lower()) in f.deaths
        assert f.monitored - before.monitored == 3
        mon.close()
        after = process_figures()
        assert after.engines == before.engines
        assert after.monitored == before.monitored
        for key, n in got.items():        # a closed engine's deaths stay counted
            assert after.deaths.get(key, 0) - before.deaths.get(key, 0) == n
    finally:
        mon.close()
        for s in socks:
            s.close()


def test_exposition_parses_with_prometheus_client(many_peers):
    reg = CollectorRegistry()
    coll = register(reg, machine=True, close_wait_top=3)
    mon = counted_monitor()
    socks = many_peers.connect(4)
    try:
        before = families(reg)
        for s in socks:
            mon.add(s)
        many_peers.rst(socks[:3])
        wait_deaths(mon, 3)
        fams = families(reg)
        types = {name: f.type for name, f in fams.items()}
        expect = {
            "fastlive_deaths": "counter", "fastlive_detection_seconds": "histogram",
            "fastlive_monitored_connections": "gauge", "fastlive_engines": "gauge",
            "fastlive_heartbeat_pings_sent": "counter",
            "fastlive_heartbeat_pings_answered": "counter",
            "fastlive_heartbeat_pings_missed": "counter",
            "fastlive_heartbeat_rtt_seconds": "histogram",
            "fastlive_tcp_connections": "gauge", "fastlive_tcp_suspect_connections": "gauge",
            "fastlive_tcp_retransmitting_connections": "gauge",
            "fastlive_tcp_zero_window_connections": "gauge",
            "fastlive_tcp_close_wait_connections": "gauge", "fastlive_census_up": "gauge",
            "fastlive_census_duration_seconds": "gauge",
        }
        assert {k: types.get(k) for k in expect} == expect
        method = "epoll"
        old = 0.0
        try:
            old = value(before, "fastlive_deaths_total", status="reset", method=method)
        except KeyError:
            pass
        assert value(fams, "fastlive_deaths_total", status="reset", method=method) - old == 3
        assert value(fams, "fastlive_census_up") == 1
        assert {s.labels["state"] for s in fams["fastlive_tcp_connections"].samples} == set(STATES)
        assert value(fams, "fastlive_tcp_connections", state="established") >= 1
        cw = fams["fastlive_tcp_close_wait_connections"].samples
        assert len(cw) <= 4 and cw[-1].labels["port"] == "other"
        # histograms are cumulative and end in +Inf == _count
        for h in ("fastlive_detection_seconds", "fastlive_heartbeat_rtt_seconds"):
            b = [s for s in fams[h].samples if s.name == h + "_bucket"]
            assert b[-1].labels["le"] == "+Inf"
            assert all(x.value <= y.value for x, y in zip(b, b[1:]))
            assert b[-1].value == value(fams, h + "_count")
        # no per-connection label anywhere
        for fam in fams.values():
            for s in fam.samples:
                assert set(s.labels) <= {"status", "method", "state", "reason", "port", "le"}
    finally:
        mon.close()
        coll.close()
        for s in socks:
            s.close()


def test_opentelemetry_in_memory_reader(many_peers):
    sdk = pytest.importorskip("opentelemetry.sdk.metrics")
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from fastlive.metrics.otel import instrument

    reader = InMemoryMetricReader()
    provider = sdk.MeterProvider(metric_readers=[reader])
    handle = instrument(provider.get_meter("test"), machine=True, max_age=0)
    mon = counted_monitor()
    socks = many_peers.connect(3)
    try:
        for s in socks:
            mon.add(s)
        many_peers.rst(socks[:2])
        wait_deaths(mon, 2)
        points = {}
        for rm in reader.get_metrics_data().resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    points[m.name] = [(dict(p.attributes or {}), p.value)
                                      for p in m.data.data_points]
        resets = [v for a, v in points["fastlive.deaths"]
                  if a == {"fastlive.status": "reset", "fastlive.method": "epoll"}]
        assert resets and resets[0] >= 2
        assert [v for _, v in points["fastlive.monitored_connections"]][0] >= 1
        states = {a["network.connection.state"] for a, _ in points["fastlive.tcp.connection.count"]}
        assert "syn_received" in states and "fin_wait_1" in states and len(states) == 11
        assert points["fastlive.census.up"] == [({}, 1)]
        handle.close()
        data = reader.get_metrics_data()        # closed: the callbacks report nothing
        assert data is None or "fastlive.deaths" not in {
            m.name for rm in data.resource_metrics
            for sm in rm.scope_metrics for m in sm.metrics if m.data.data_points}
    finally:
        mon.close()
        handle.close()
        provider.shutdown()
        for s in socks:
            s.close()


# --- a real heartbeat engine and a peer that freezes -------------------------------

def test_heartbeat_pings_rtt_misses_and_death():
    from fastlive.testing import HeartbeatPeerProcess

    reg = CollectorRegistry()
    coll = register(reg)
    lst = socket.create_server(("127.0.0.1", 0))
    before = families(reg)
    peer = HeartbeatPeerProcess(lst, 2)
    eng = fastlive.HeartbeatEngine(tick=0.005)
    try:
        for s in peer.socks:
            eng.add(s, 0.1, 3, rtt=True)
        end = time.monotonic() + 10
        while time.monotonic() < end and eng.stats().pongs_received < 6:
            assert eng.wait(0.1) == []
        mid = families(reg)
        for name in ("fastlive_heartbeat_pings_sent_total",
                     "fastlive_heartbeat_pings_answered_total",
                     "fastlive_heartbeat_rtt_seconds_count"):
            assert value(mid, name) - value(before, name) >= 6, name
        rtt = [s for s in mid["fastlive_heartbeat_rtt_seconds"].samples
               if s.name.endswith("_bucket")]
        assert len(rtt) > 2 and rtt[-1].labels["le"] == "+Inf"
        assert value(mid, "fastlive_heartbeat_rtt_seconds_sum") > 0
        assert value(mid, "fastlive_monitored_connections") - \
            value(before, "fastlive_monitored_connections") == 2
        peer.freeze()
        deaths = []
        end = time.monotonic() + 10
        while time.monotonic() < end and len(deaths) < 2:
            deaths += eng.wait(0.2)
        assert len(deaths) == 2
        d = deaths[0].verdict
        after = families(reg)
        st, me = d.status.name.lower(), d.method.name.lower()
        try:
            old = value(before, "fastlive_deaths_total", status=st, method=me)
        except KeyError:
            old = 0
        assert me == "heartbeat"
        assert value(after, "fastlive_deaths_total", status=st, method=me) - old == 2
        assert value(after, "fastlive_heartbeat_pings_missed_total") - \
            value(before, "fastlive_heartbeat_pings_missed_total") >= 2
        # the detection times (silence before the verdict) are in the histogram
        assert value(after, "fastlive_detection_seconds_count") - \
            value(before, "fastlive_detection_seconds_count") == 2
        assert value(after, "fastlive_detection_seconds_sum") - \
            value(before, "fastlive_detection_seconds_sum") >= 2 * 0.2
        eng.close()
        closed = families(reg)     # counters survive the engine
        assert value(closed, "fastlive_deaths_total", status=st, method=me) - old == 2
        assert value(closed, "fastlive_heartbeat_pings_sent_total") >= \
            value(after, "fastlive_heartbeat_pings_sent_total")
    finally:
        eng.close()
        peer.close()
        lst.close()
        coll.close()


# --- scrapes racing Monitors being closed -----------------------------------------

def test_scrape_while_monitors_are_closed(loopback_pairs):
    reg = CollectorRegistry()
    coll = register(reg, machine=False)
    pairs = loopback_pairs(20)
    gc.collect()
    fd0 = open_fds()
    engines0 = process_figures().engines
    stop = threading.Event()
    errors = []

    def churn():
        try:
            for i in range(200):
                if stop.is_set():
                    return
                m = counted_monitor()
                for a, _ in pairs:
                    m.add(a)
                if i % 2:
                    m.close()
                else:
                    del m           # dropped without close: collected
                if i % 20 == 0:     # heartbeat engines too (each has a native thread)
                    with fastlive.HeartbeatEngine() as h:
                        h.add(pairs[i % 20][0], 1.0, 3)
                        h.stats()
        except Exception as e:     # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=churn) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(300):
            fams = families(reg)
            assert value(fams, "fastlive_monitored_connections") >= 0
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors
    gc.collect()
    fams = families(reg)
    assert value(fams, "fastlive_engines") == engines0
    assert len(LEDGER._seen) == engines0           # nothing kept for the dead engines
    assert open_fds() == fd0
    coll.close()


# --- bad input ---------------------------------------------------------------

def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="process"):
        FastliveCollector(process="yes")
    with pytest.raises(TypeError, match="machine"):
        FastliveCollector(machine=1)
    with pytest.raises(ValueError, match="top"):
        FastliveCollector(machine=True, close_wait_top=-1)
    with pytest.raises(ValueError, match="top"):
        MachineSampler(1001)
    with pytest.raises(TypeError, match="top"):
        MachineSampler("3")
    otel = pytest.importorskip("fastlive.metrics.otel")
    with pytest.raises(ValueError, match="max_age"):
        otel.instrument(max_age=-1)
    with pytest.raises(ValueError, match="max_age"):
        otel.instrument(max_age=math.nan)
    with pytest.raises(TypeError, match="machine"):
        otel.instrument(machine="no")


def test_closed_sampler_reports_census_down():
    reg = CollectorRegistry()
    coll = register(reg, process=False, machine=True)
    assert value(families(reg), "fastlive_census_up") == 1
    coll.close()
    fams = families(reg)
    assert value(fams, "fastlive_census_up") == 0
    assert "fastlive_tcp_connections" not in fams or not fams["fastlive_tcp_connections"].samples
    s = MachineSampler()
    s.close()
    with pytest.raises(ValueError, match="closed"):
        s.sample()


def test_census_without_tcp_info_has_no_suspect_family(loopback_pairs):
    assert loopback_pairs(2)
    reg = CollectorRegistry()
    coll = register(reg, process=False, machine=True, tcp_info=False)
    try:
        fams = families(reg)
        assert "fastlive_tcp_suspect_connections" not in fams
        assert value(fams, "fastlive_tcp_connections", state="established") >= 4
        assert value(fams, "fastlive_tcp_zero_window_connections") >= 0
    finally:
        coll.close()
    with pytest.raises(TypeError, match="tcp_info"):
        MachineSampler(tcp_info=1)


# --- the tally's top-k on synthetic records (any ports, any k) ---------------------

@settings(max_examples=scaled(200), deadline=None)
@given(recs=hs.lists(hs.tuples(hs.integers(1, 11), hs.integers(0, 65535), hs.integers(0, 6),
                               hs.integers(0, 3)), max_size=300),
       k=hs.integers(0, 12))
def test_tally_top_k_property(recs, k):
    n = len(recs)
    arr = ffi.new("struct fl_census_rec[]", max(n, 1))
    for i, (state, port, timer, retrans) in enumerate(recs):
        arr[i].state, arr[i].sport, arr[i].timer, arr[i].retrans = state, port, timer, retrans
    c = ffi.new("struct fl_census *")
    c.n, c.recs = n, arr
    t = ffi.new("struct fl_tally *")
    scratch = ffi.new("uint32_t[65536]")
    ports, counts = ffi.new("uint16_t[]", max(k, 1)), ffi.new("uint32_t[]", max(k, 1))
    got = lib.fl_census_tally(c, t, scratch, ports, counts, k)
    cw = {}
    for state, port, _, _ in recs:
        if state == 8:
            cw[port] = cw.get(port, 0) + 1
    top = sorted(cw.items(), key=lambda pc: (-pc[1], pc[0]))
    assert got == min(k, len(cw))
    assert [(ports[i], counts[i]) for i in range(got)] == top[:k]
    assert t.close_wait_rest == sum(v for _, v in top[k:])
    assert t.close_wait_ports == len(cw)
    assert t.retransmitting == sum(1 for _, _, tm, r in recs if tm == 1 and r > 0)
    assert t.zero_window == sum(1 for _, _, tm, _ in recs if tm == 4)
    assert [t.states[s] for s in range(1, 12)] == [sum(1 for r in recs if r[0] == s)
                                                   for s in range(1, 12)]
    assert sum(t.suspect) == 0                     # no tcp_info given
    assert not any(scratch[p] for p in cw)
