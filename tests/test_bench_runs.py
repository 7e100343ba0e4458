"""The benchmark script runs (quick mode).  Speed is not asserted here:
the benchmark prints ratios; tests only prove it works."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("gcc"), reason="the plain-C baseline needs gcc")
def test_bench_sweeps_quick():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "bench_sweeps.py"), "--quick"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    for kind in ("poll", "states", "tcp_info", "peek", "epoll"):
        for who in ("fastlive", "plain C", "python"):
            assert f"| {kind} | 200 | {who}" in text, (kind, who)
    assert "dead seen 4 of 4 expected" in text
    assert "memory over 100 x 4 sweeps" in text
    assert "targets:" in text
    assert "draining a backlog" in text and "fresh deaths" in text
