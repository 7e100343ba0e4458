"""ThreadSanitizer over the heartbeat engine's C: its thread, the mutex,
the deaths queue and close(), driven from two more threads by a small C
program (tests/c/hb_tsan_driver.c).  Python is not instrumented, so the
driver calls the C API directly."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"


@pytest.mark.slow
@pytest.mark.no_qemu("builds and runs a TSan binary")
@pytest.mark.skipif(not shutil.which("gcc"), reason="needs gcc")
def test_engine_threads_are_race_free(tmp_path: Path) -> None:
    exe = tmp_path / "hb_tsan"
    build = subprocess.run(
        ["gcc", "-std=gnu11", "-g", "-O1", "-fsanitize=thread", "-D_GNU_SOURCE",
         '-DFL_VERSION="tsan"', f"-I{CSRC}", "-include", str(CSRC / "fl_prelude.h"),
         str(ROOT / "tests" / "c" / "hb_tsan_driver.c"), str(CSRC / "heartbeat.c"),
         str(CSRC / "core.c"), "-o", str(exe), "-pthread"],
        capture_output=True, text=True, timeout=120)
    if build.returncode != 0 and "tsan" in build.stderr.lower():
        pytest.skip(f"no ThreadSanitizer runtime: {build.stderr[-300:]}")
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120,
                         env={"TSAN_OPTIONS": "halt_on_error=1 exitcode=66"})
    assert "WARNING: ThreadSanitizer" not in run.stderr, run.stderr[-4000:]
    assert run.returncode == 0, (run.returncode, run.stdout, run.stderr[-3000:])
    assert "b answered" in run.stdout
