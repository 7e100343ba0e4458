"""The alert rules of docs/fleet_alerts.yml, checked and unit-tested by
Prometheus's own promtool against synthetic series of fastlive's metric
names (the names are checked against the collector too)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

ENV = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS")}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = os.path.join(ROOT, "docs", "fleet_alerts.yml")

pytestmark = pytest.mark.no_qemu("host tool promtool")

TESTS = """
rule_files:
  - {rules}
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      # port 8080 leaks 5 sockets a minute; port 9000 is steady at 150
      - series: 'fastlive_tcp_close_wait_connections{{instance="a", port="8080"}}'
        values: '0+5x90'
      - series: 'fastlive_tcp_close_wait_connections{{instance="a", port="9000"}}'
        values: '150x90'
      # 30 heartbeat deaths a minute on b, 1 an hour on c; EPOLL deaths do not count
      - series: 'fastlive_deaths_total{{instance="b", job="app", status="timed_out", method="heartbeat"}}'
        values: '0+30x60'
      - series: 'fastlive_deaths_total{{instance="c", job="app", status="timed_out", method="heartbeat"}}'
        values: '0+0.0166x60'
      - series: 'fastlive_deaths_total{{instance="c", job="app", status="reset", method="epoll"}}'
        values: '0+600x60'
    alert_rule_test:
      - eval_time: 10m
        alertname: FastliveCloseWaitGrowing
        exp_alerts: []
      - eval_time: 80m
        alertname: FastliveCloseWaitGrowing
        exp_alerts:
          - exp_labels: {{severity: warning, instance: a, port: "8080"}}
            exp_annotations:
              summary: "CLOSE_WAIT keeps growing on a port 8080"
              description: >-
                400 sockets in CLOSE_WAIT on local port 8080, and more than 50 more than
                30 minutes ago: the peers closed but the application does not close its sockets.
      - eval_time: 8m
        alertname: FastliveHeartbeatDeaths
        exp_alerts: []
      - eval_time: 30m
        alertname: FastliveHeartbeatDeaths
        exp_alerts:
          - exp_labels: {{severity: warning, instance: b, job: app}}
            exp_annotations:
              summary: "Heartbeat peers dying on b"
              description: >-
                500m connections per second found dead by heartbeat over the last 5 minutes
                (sustained 10 minutes).
"""


def _promtool() -> str:
    tool = shutil.which("promtool")
    if not tool:
        pytest.skip("promtool (Debian package prometheus) is not installed")
    return tool


def test_rules_check():
    out = subprocess.run([_promtool(), "check", "rules", RULES], capture_output=True,
                         text=True, timeout=60, env=ENV)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 rules found" in out.stdout


def test_rules_fire_on_the_right_series(tmp_path):
    tool = _promtool()
    t = tmp_path / "alerts_test.yml"
    t.write_text(TESTS.format(rules=RULES))
    out = subprocess.run([tool, "test", "rules", str(t)], capture_output=True, text=True,
                         timeout=60, env=ENV)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_rules_use_exported_names():
    pytest.importorskip("prometheus_client")
    from fastlive.metrics.prometheus import FastliveCollector

    names = set()
    for fam in FastliveCollector(process=True, machine=True).describe():
        names.add(fam.name + ("_total" if fam.type == "counter" else ""))
    text = open(RULES).read()
    used = set(re.findall(r"\b(fastlive_[a-z_]+)", text))
    assert used and used <= names, used - names
