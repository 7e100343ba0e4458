"""Every ```python block of README.md runs as written (each starts its own
loopback peers) and type-checks under ``mypy --strict``.  A comment
``# -> text`` (after a ``print(...)`` or on the line below it) also checks
that ``text`` is a line the block printed."""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
from typing import List, Tuple

import pytest

import fastlive

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: the directory that holds the fastlive this test imported (a source tree
#: built in place, or site-packages)
PKG_PARENT = str(pathlib.Path(fastlive.__file__).resolve().parents[1])
_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)
_PRINTS = re.compile(r"# -> (.+)$")


def blocks() -> List[Tuple[str, str]]:
    """(id, code) of every python block: id = the section heading and the
    block's number in the README."""
    text = README.read_text()
    out = []
    for n, m in enumerate(_BLOCK.finditer(text), 1):
        heads = re.findall(r"^#+ (.+)$", text[:m.start()], re.M)
        head = heads[-1] if heads else "top"
        out.append((f"{n}-{re.sub(r'[^a-z0-9]+', '-', head.lower()).strip('-')}", m.group(1)))
    return out


BLOCKS = blocks()


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 3
    assert any("detect_within" in code for _i, code in BLOCKS)


#: Third-party modules README blocks may import, and the extra that brings each.
_OPTIONAL = {"prometheus_client": "pip install 'fastlive[prometheus]'",
             "uvloop": "pip install 'fastlive[aio]'", "rich": "pip install 'fastlive[top]'"}


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": PKG_PARENT}


@pytest.mark.parametrize("code", [c for _i, c in BLOCKS], ids=[i for i, _c in BLOCKS])
def test_block_runs_as_written(tmp_path, code):
    import importlib.util
    import re as _re
    for mod in _re.findall(r"^(?:from|import) (\w+)", code, _re.M):
        if mod in _OPTIONAL and importlib.util.find_spec(mod) is None:
            pytest.skip(f"the block needs {mod} ({_OPTIONAL[mod]}), not installed here")
    path = tmp_path / "block.py"
    path.write_text(code)
    out = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}"
    for line in code.splitlines():
        m = _PRINTS.search(line)
        if m:
            assert m.group(1).strip() in out.stdout.splitlines(), (line, out.stdout)


def test_blocks_type_check_strict(tmp_path_factory):
    pytest.importorskip("mypy", reason="mypy is not installed (pip install -e '.[test]')")
    d = tmp_path_factory.mktemp("readme_blocks")
    files = []
    for ident, code in BLOCKS:
        f = d / f"block_{ident.replace('-', '_')}.py"
        f.write_text(code)
        files.append(str(f))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH")}
    if pathlib.Path(PKG_PARENT).name in ("site-packages", "dist-packages"):
        cwd = str(d)          # an installed fastlive: mypy finds it (py.typed)
    else:
        cwd = env["MYPYPATH"] = PKG_PARENT    # a source tree: check that one
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", *files],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
