"""bench/bench_metrics.py runs (quick mode); speed is printed, not asserted."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("prometheus_client")


@pytest.mark.slow
@pytest.mark.no_qemu("netlink sock_diag; too slow emulated")
def test_bench_metrics_quick():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "bench_metrics.py"), "--quick"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    for what in ("process scrape", "machine scrape", "kernel dump", "dump, no tcp_info",
                 "C tally", "python tally", "/proc/net/tcp"):
        assert f"| {what} |" in out.stdout, what
    assert "ratios: C tally vs python tally" in out.stdout
