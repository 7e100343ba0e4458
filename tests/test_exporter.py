"""``fastlive exporter``: the /metrics endpoint for a machine or a network
namespace, and a real Prometheus server scraping it (and a process's own
engine metrics) on loopback."""
from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from typing import Dict, List, Optional, Tuple

import pytest

import fastlive
from fastlive.testing.netns import netns_unavailable

from _metrics_util import close_wait_on, counted_monitor, wait_deaths

pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from fastlive.metrics import process_figures  # noqa: E402
from fastlive.metrics.prometheus import register  # noqa: E402
from fastlive.tools.exporter import _handler, _Server, parse_listen  # noqa: E402

pytestmark = pytest.mark.no_qemu("netlink sock_diag, network namespaces, host tools")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fastlive.__file__)))


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _plain_env() -> Dict[str, str]:
    """The environment for a foreign program (prometheus, a Go binary):
    without the sanitizer runtime scripts/sanitize.sh preloads."""
    return {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS")}


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastlive", *args], capture_output=True,
                          text=True, timeout=timeout, env=_env())


class Exporter:
    """``fastlive exporter`` in a child process; ``url`` once it serves."""

    def __init__(self, *args: str, timeout: float = 30) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastlive", "exporter", "--listen", "127.0.0.1:0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if r else ""
        if "serving" not in line:
            self.close()
            raise RuntimeError(f"exporter did not start: {line!r} {self.proc.stderr.read()!r}")
        self.url = line.split()[3]
        self.hostport = urllib.parse.urlsplit(self.url).netloc

    def scrape(self) -> Dict[str, object]:
        with urllib.request.urlopen(self.url, timeout=10) as r:
            text = r.read().decode()
        return {f.name: f for f in text_string_to_metric_families(text)}

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for f in (self.proc.stdout, self.proc.stderr):
            f.close()
        return self.proc.returncode


def sample(fams, name, **labels) -> float:
    for fam in fams.values():
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(f"{name} {labels}")


# --- bad input -------------------------------------------------------------------

def test_port_in_use_is_a_clear_error():
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        out = _cli("exporter", "--listen", f"127.0.0.1:{port}")
    assert out.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr
    assert "in use" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("listen", ["nohost", "127.0.0.1:65536", "127.0.0.1:x", "::1:80", ":80"])
def test_bad_listen_is_named(listen):
    out = _cli("exporter", "--listen", listen)
    assert out.returncode == 2 and "--listen" in out.stderr and "Traceback" not in out.stderr
    with pytest.raises(ValueError, match="--listen"):
        parse_listen(listen)


def test_parse_listen():
    assert parse_listen("127.0.0.1:9469") == ("127.0.0.1", 9469)
    assert parse_listen("[::1]:0") == ("::1", 0)
    with pytest.raises(TypeError):
        parse_listen(9469)          # type: ignore[arg-type]


def test_unreachable_namespace_is_a_clear_error(tmp_path):
    out = _cli("exporter", "--netns", "fl-no-such-namespace")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "no network namespace" in out.stderr and "fl-no-such-namespace" in out.stderr
    plain = tmp_path / "plain"
    plain.write_text("")
    out = _cli("exporter", "--netns", str(plain))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert ("not a network namespace" if os.geteuid() == 0 else "CAP_SYS_ADMIN") in out.stderr
    out = _cli("exporter", "--netns", str(tmp_path / "missing"))
    assert out.returncode == 2 and "cannot open" in out.stderr


def test_close_wait_top_out_of_range():
    out = _cli("exporter", "--close-wait-top", "5000")
    assert out.returncode == 2 and "--close-wait-top" in out.stderr


# --- the endpoint ----------------------------------------------------------------

def test_exporter_reports_a_namespace_exactly(netns_pair):
    pair = netns_pair
    ex = Exporter("--netns", pair.ns_a, "--close-wait-top", "1")
    try:
        with pair.inside_a():
            lsts = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
            held = close_wait_on(4, lsts[0])[0] + close_wait_on(2, lsts[1])[0]
        fams = ex.scrape()
        assert sample(fams, "fastlive_census_up") == 1
        assert sample(fams, "fastlive_tcp_connections", state="listen") == 2
        assert sample(fams, "fastlive_tcp_connections", state="established") == 1  # pair.local
        assert sample(fams, "fastlive_tcp_connections", state="close_wait") == 6
        port = str(lsts[0].getsockname()[1])
        assert sample(fams, "fastlive_tcp_close_wait_connections", port=port) == 4
        assert sample(fams, "fastlive_tcp_close_wait_connections", port="other") == 2
        assert "fastlive_deaths" not in fams            # machine only by default
        for path, code in (("/", 200), ("/nope", 404)):
            try:
                with urllib.request.urlopen(f"http://{ex.hostport}{path}", timeout=10) as r:
                    got = r.status
            except urllib.error.HTTPError as e:
                got = e.code
            assert got == code
        for s in held + lsts:
            s.close()
    finally:
        assert ex.close() == 0          # SIGTERM: a clean exit


def test_exporter_on_ipv6_loopback_and_openmetrics():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError as e:
        pytest.skip(f"no IPv6 loopback: {e}")
    ex = Exporter("--listen", "[::1]:0")
    try:
        assert ex.url.startswith("http://[::1]:")
        fams = ex.scrape()
        assert sample(fams, "fastlive_census_up") == 1
        req = urllib.request.Request(
            ex.url, headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.headers["Content-Type"].startswith("application/openmetrics-text")
            assert r.read().decode().endswith("# EOF\n")
    finally:
        assert ex.close() == 0


# --- a real Prometheus -------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """The Debian ``prometheus`` server with its own config and storage in
    ``tmp``, listening on a loopback port, scraping ``targets`` every 1 s."""

    def __init__(self, tmp, targets: Dict[str, str]) -> None:
        binary = shutil.which("prometheus")
        assert binary
        cfg = tmp / "prometheus.yml"
        jobs = "".join(f"  - job_name: {job}\n    static_configs:\n"
                       f"      - targets: ['{hp}']\n" for job, hp in targets.items())
        cfg.write_text("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
                       "  evaluation_interval: 1s\nscrape_configs:\n" + jobs)
        self.port = _free_port()
        self.log = open(tmp / "prometheus.log", "w")
        self.proc: Optional[subprocess.Popen] = subprocess.Popen(
            [binary, f"--config.file={cfg}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=tmp, env=_plain_env())
        self.tmp = tmp

    def query(self, q: str) -> List[Tuple[Dict[str, str], float]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return [(x["metric"], float(x["value"][1])) for x in body["data"]["result"]]

    def wait_for(self, q: str, want: float, timeout: float = 40.0) -> None:
        """Polls until ``q`` has exactly one series equal to ``want``."""
        end = time.monotonic() + timeout
        got: object = None
        while time.monotonic() < end:
            assert self.proc is not None and self.proc.poll() is None, self.logtext()
            try:
                res = self.query(q)
                got = res
                if len(res) == 1 and res[0][1] == want:
                    return
            except OSError as e:      # not up yet
                got = e
            time.sleep(0.25)
        raise AssertionError(f"{q}: wanted {want}, last {got!r}\n{self.logtext()[-2000:]}")

    def wait_nonempty(self, q: str, timeout: float = 40.0) -> None:
        """Polls until ``q`` (a filter such as ``x > 0``) returns a series."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if self.query(q):
                    return
            except OSError:
                pass
            time.sleep(0.25)
        raise AssertionError(f"{q}: no series\n{self.logtext()[-2000:]}")

    def logtext(self) -> str:
        self.log.flush()
        return (self.tmp / "prometheus.log").read_text()

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
            self.proc = None
        self.log.close()


def test_a_real_prometheus_scrapes_machine_and_process(tmp_path, many_peers):
    if not shutil.which("prometheus"):
        pytest.skip("the Debian package prometheus is not installed "
                    "(apt-get install -y prometheus)")
    reason = netns_unavailable()
    if reason:
        pytest.skip(f"needs a network namespace: {reason}")
    from fastlive.testing import HeartbeatPeerProcess, NetnsPair

    # the process's own engines, served from this test process
    with contextlib.ExitStack() as stack:
        reg = CollectorRegistry()
        coll = register(reg)
        stack.callback(coll.close)
        app = _Server(("127.0.0.1", 0), _handler(reg, False))
        stack.callback(app.server_close)
        t = threading.Thread(target=app.serve_forever, kwargs={"poll_interval": 0.2},
                             daemon=True)
        t.start()
        stack.callback(app.shutdown)
        mon = stack.enter_context(counted_monitor())
        socks = many_peers.connect(5)
        for s in socks:
            stack.callback(s.close)
        hlst = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
        hpeer = HeartbeatPeerProcess(hlst, 1)
        stack.callback(hpeer.close)
        eng = stack.enter_context(fastlive.HeartbeatEngine(tick=0.005))
        eng.add(hpeer.socks[0], 0.1, 3, rtt=True)
        pair = stack.enter_context(NetnsPair())
        ex = Exporter("--netns", pair.ns_a)
        stack.callback(lambda: ex.close() == 0 or pytest.fail("exporter exit status"))
        prom = Prometheus(tmp_path, {
            "fastlive-node": ex.hostport,
            "fastlive-app": f"127.0.0.1:{app.server_address[1]}"})
        stack.callback(prom.close)
        _scenario(prom, pair, mon, socks, many_peers, eng, hpeer)


def _scenario(prom, pair, mon, socks, many_peers, eng, hpeer) -> None:
    prom.wait_for('up{job="fastlive-node"}', 1)
    prom.wait_for('up{job="fastlive-app"}', 1)
    prom.wait_for('fastlive_tcp_connections{state="established"}', 1)  # pair.local

    # connections and deaths
    with pair.inside_a():
        lst = socket.create_server(("127.0.0.1", 0))
        held = close_wait_on(3, lst)[0]
    try:
        port = lst.getsockname()[1]
        for s in socks:
            mon.add(s)
        many_peers.rst(socks[:2])
        wait_deaths(mon, 2)
        f = process_figures()
        resets = f.deaths[("reset", "epoll")]

        prom.wait_for(f'fastlive_tcp_close_wait_connections{{port="{port}"}}', 3)
        prom.wait_for('fastlive_tcp_connections{state="close_wait"}', 3)
        prom.wait_for('fastlive_tcp_connections{state="listen"}', 1)
        prom.wait_for('fastlive_deaths_total{status="reset",method="epoll"}', resets)
        prom.wait_for("fastlive_monitored_connections", f.monitored)
        prom.wait_for("fastlive_census_up", 1)

        # heartbeat: PINGs answered with RTTs, then the peer freezes and dies
        prom.wait_nonempty("fastlive_heartbeat_pings_answered_total > 5")
        prom.wait_nonempty("fastlive_heartbeat_rtt_seconds_count > 5")
        hpeer.freeze()
        hb_deaths = []
        end = time.monotonic() + 10
        while not hb_deaths and time.monotonic() < end:
            hb_deaths = eng.wait(0.2)
        assert len(hb_deaths) == 1
        v = hb_deaths[0].verdict
        st, me = v.status.name.lower(), v.method.name.lower()
        n = process_figures().deaths[(st, me)]
        prom.wait_for(f'fastlive_deaths_total{{status="{st}",method="{me}"}}', n)
        prom.wait_nonempty("fastlive_heartbeat_pings_missed_total > 0")

        # the CLOSE_WAIT sockets closed: the gauge falls back
        for s in held:
            s.close()
        prom.wait_for('sum(fastlive_tcp_connections{state="close_wait"})', 0)
    finally:
        for s in held + [lst]:
            s.close()
