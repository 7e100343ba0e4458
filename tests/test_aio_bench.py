"""bench/bench_aio.py runs (--quick: a few hundred connections, 0.5 s interval,
0.6 s windows) and
prints both parts with asyncio and uvloop columns; the numbers it reports
are checked for sanity only (speed is the benchmark's business)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "bench_aio.py"


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH), "--quick", "--json", *args],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


@pytest.mark.slow
@pytest.mark.no_qemu("too slow emulated")
def test_bench_gone_quick() -> None:
    out = bench("--parts", "gone")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "peer_gone woke" in out.stdout
    data = json.loads(out.stdout[out.stdout.index("{"):out.stdout.rindex("}") + 1])
    n = data["n"]
    assert n >= 100          # so the SIGKILLed 1% is at least one peer
    for name, r in data["gone"].items():
        assert r["woke"] == r["killed"] == n // 100, (name, r)
        assert r["wrong"] == 0, (name, r)
        if name.startswith("fastlive"):
            assert r["watched"] == n


@pytest.mark.slow
@pytest.mark.no_qemu("too slow emulated")
@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc builds the C peer and floor")
def test_bench_heartbeat_quick() -> None:
    # 15 cases (the five ratio cases twice: interleaved rounds), each its
    # own processes: a 0.25 s interval keeps it short (every case still
    # runs whole rounds of PINGs in its window)
    out = bench("--parts", "hb", "--rounds", "2", "--n", "100", "--interval", "0.25",
                "--seconds", "0.3", "--warmup", "0.25")
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(out.stdout[out.stdout.index("{"):out.stdout.rindex("}") + 1])
    by = {r["name"]: r for r in data["hb"]}
    assert {"floor", "engine", "LoopHeartbeat/asyncio", "task-per-conn/asyncio+blocked",
            "ws-style/asyncio"} <= set(by)
    assert len(by["floor"]["rounds"]) == len(by["LoopHeartbeat/asyncio"]["rounds"]) == 2
    assert len(by["ws-style/asyncio"]["rounds"]) == 1
    for r in data["hb"]:
        for run in r["rounds"]:
            assert run["pings"] > 0, r
        assert r["x_floor"] > 0, r
        if r["name"].startswith(("engine", "LoopHeartbeat")):
            assert r["deaths"] == 0, r      # every peer answers, blocked loop or not
