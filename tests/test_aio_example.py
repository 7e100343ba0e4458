"""examples/aio_server.py: --help works, and its demo (a server on
asyncio.start_server holding many clients, a tenth of them SIGKILLed)
closes exactly the dead ones, on asyncio and on uvloop."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
from _scale import scaled

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "aio_server.py"


def run(args: List[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(EXAMPLE), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_help() -> None:
    out = run(["--help"])
    assert out.returncode == 0, out.stderr
    assert "--within" in out.stdout and "--demo" in out.stdout


def test_refuses_non_loopback() -> None:
    out = run(["--host", "192.0.2.1"])
    assert out.returncode == 2 and "loopback" in out.stderr


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_demo_closes_the_dead_clients(loop: str) -> None:
    if loop == "uvloop":
        pytest.importorskip("uvloop", reason="uvloop is not installed (pip install uvloop)")
    n = scaled(500, minimum=100)        # 100 clients on an emulated CPU
    out = run(["--demo", str(n), "--within", "5"] + (["--uvloop"] if loop == "uvloop" else []))
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["held"] == res["watched"] == n
    assert res["killed"] == n // 10
    assert res["closed"] == {"PEER_CLOSED": n // 10}
    assert res["still_open"] == n - n // 10
