"""The heartbeat benchmark runs (quick mode: 0.5 s interval, 0.6 s windows,
every case end to end); it prints numbers, asserts no speed."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_heartbeat.py"


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("gcc"), reason="the bench compiles its floor with gcc")
def test_quick_bench_runs() -> None:
    out = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--n", "50", "--json"],
        capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    doc = json.loads(text[text.index("\n{") + 1:])
    by = {r["name"]: r for r in doc["results"]}
    names = {"floor", "floor-spread", "engine", "engine-burst", "pyepoll", "asyncio",
             "engine-busy", "engine-gil"}
    assert set(by) == names and set(doc["summary"]) == names
    for name in names - {"engine-busy"}:
        r = by[name]
        assert r["pings"] >= 50, r          # one round of PINGs in the window
        assert r["pongs"] >= r["pings"] - 50, r
        assert r["cpu"] >= 0 and r["window"] >= 0.5     # --quick: 0.6 s, one interval
    # busy connections: data every half interval is life, so (almost) no PING goes
    # out, against >= one per connection when idle (slack: a loaded machine
    # may delay the peer's data past an interval now and then)
    assert by["engine-busy"]["pings"] <= 5, by["engine-busy"]
    assert by["engine-busy"].get("deaths", 0) == 0
    # the main thread spun holding the GIL all along: the engine's own thread
    # pinged, read the PONGs and killed nobody
    assert by["engine-gil"]["deaths"] == 0 and by["engine-gil"]["pongs"] >= 50
