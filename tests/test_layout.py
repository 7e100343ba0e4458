"""The house: what ``import fastlive`` loads, and the README's first command
run as a new user runs it, in a fresh clone's root."""
import ast
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

import fastlive

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_import_fastlive_is_light():
    code = ("import sys, fastlive; "
            "bad = sorted(m for m in sys.modules if m == 'argparse' or m == 'pytest' "
            "or m.startswith(('fastlive.testing', 'fastlive.tools'))); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _modules_after(code: str) -> list:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\n"
                          "print(sorted(m for m in sys.modules if m.startswith('fastlive')))"],
                         capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    return ast.literal_eval(out.stdout.strip().splitlines()[-1])


def test_names_load_their_module_on_first_use():
    """``import fastlive`` loads the vocabulary (verdicts) and the native core,
    not the engines: each public name imports its module when first used."""
    heavy = ("fastlive.batch", "fastlive.monitor", "fastlive.heartbeat", "fastlive.keepalive")
    assert not set(_modules_after("import fastlive")) & set(heavy)
    after = _modules_after("import fastlive; fastlive.Monitor")
    assert "fastlive.monitor" in after and "fastlive.heartbeat" not in after
    # the function stays the function when its module is imported by name later
    assert _modules_after("import sys, fastlive, fastlive.tools.census\n"
                          "assert fastlive.census is sys.modules['fastlive.census'].census")
    # every public name resolves, to the object its module defines
    for name in fastlive.__all__:
        assert getattr(fastlive, name) is not None, name
    assert set(fastlive.__all__) <= set(dir(fastlive))
    assert fastlive.Monitor is sys.modules["fastlive.monitor"].Monitor
    with pytest.raises(AttributeError, match="no attribute 'Monitr'"):
        fastlive.Monitr  # noqa: B018
    # the star import goes through the same path
    ns: dict = {}
    exec("from fastlive import *", ns)
    assert ns["HeartbeatEngine"] is fastlive.HeartbeatEngine


def test_cli_loads_only_the_command_it_runs():
    """``fastlive --help`` imports no tool module, ``fastlive census`` only its own."""
    def tools_after(*argv: str) -> list:
        loaded = _modules_after(
            "import contextlib, io\nfrom fastlive.tools.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    try:\n        main({list(argv)!r})\n    except SystemExit:\n        pass")
        assert "fastlive.testing" not in loaded
        return sorted(m for m in loaded if m.startswith("fastlive.tools."))
    assert tools_after("--help") == ["fastlive.tools.cli"]
    assert tools_after("census", "--help") == ["fastlive.tools.census", "fastlive.tools.cli"]


def test_every_module_has_all():
    pkg = pathlib.Path(fastlive.__path__[0])
    missing = []
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(pkg)
        if rel.name in ("__main__.py", "_version.py") or rel.name.startswith("test_"):
            continue
        if "__all__" not in path.read_text():
            missing.append(str(rel))
    assert not missing


def test_helpers_import_the_parents_fastlive(tmp_path):
    """A helper started from a directory that holds a ``fastlive`` package
    without its compiled core (a source checkout's root) still imports the
    owner's package."""
    root = tmp_path / "root"
    fake = root / "fastlive"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('the shadowing source tree')\n")
    code = ("import fastlive.testing as t\n"
            "local, peer = t.loopback_peer()\n"
            "with peer: peer.ping(); print('ok', peer.running)\n")
    (tmp_path / "owner.py").write_text(code)
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(fastlive.__path__[0]).parent))
    out = subprocess.run([sys.executable, str(tmp_path / "owner.py")], cwd=root, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "ok True"


@pytest.mark.slow
@pytest.mark.no_qemu("builds the package in a new virtual environment")
def test_readme_first_command_in_a_fresh_clone(tmp_path):
    """``git clone; cd fastlive; python3 -m venv v; . v/bin/activate;
    pip install . && fastlive demo``, as the README says, in the clone's root."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: no clone to make")
    readme = (ROOT / "README.md").read_text()
    first = next(line for line in readme.splitlines() if line.startswith("pip install "))
    command = first.split("#")[0].strip()
    assert command == "pip install . && fastlive demo"
    clone = tmp_path / "fastlive"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    # what is committed, plus the work tree's changes (a test of this tree, not of HEAD)
    diff = subprocess.run(["git", "diff", "HEAD", "--binary"], cwd=ROOT, capture_output=True,
                          timeout=60, check=True).stdout
    if diff:
        subprocess.run(["git", "apply", "--whitespace=nowarn"], cwd=clone, input=diff,
                       check=True, timeout=60)
    venv = tmp_path / "v"
    # system site-packages: the build's own requirements still come through pip
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = f"{venv}/bin:{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    out = subprocess.run(["bash", "-c", command], cwd=clone, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "ImportError" not in out.stderr and "PeerError" not in out.stderr
    assert "SIGKILL" in out.stdout and "6 heartbeat" in out.stdout


def test_every_subpackage_is_packaged():
    """pyproject's ``packages`` lists every subpackage (a wheel would lack it)."""
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        pytest.skip("tomllib needs Python 3.11")
    if not (ROOT / "pyproject.toml").exists():
        pytest.skip("no pyproject.toml beside the tests")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    # the imported package: a source tree, or the installed wheel (which then
    # proves the wheel holds every subpackage the tree has)
    pkg = pathlib.Path(fastlive.__path__[0])
    found = {".".join(p.parent.relative_to(pkg.parent).parts) for p in pkg.rglob("__init__.py")}
    if (ROOT / "fastlive").is_dir():
        found |= {".".join(p.parent.relative_to(ROOT).parts)
                  for p in (ROOT / "fastlive").rglob("__init__.py")}
    assert found == listed
