"""Import and one real call: the wheel test command (also valid under qemu)."""
import socket
import os
import subprocess
import sys

import fastlive


def test_version_matches_compiled_core():
    from fastlive._lib import ffi, lib
    assert ffi.string(lib.fl_version()).decode() == fastlive.__version__


def test_module_is_built_inside_package():
    import fastlive._native as native
    assert native.__file__.startswith(fastlive.__path__[0])


def test_one_check_on_loopback():
    with socket.create_server(("127.0.0.1", 0)) as lst:
        cli = socket.create_connection(lst.getsockname(), timeout=2)
        srv, _ = lst.accept()
    with cli, srv:
        assert fastlive.check_poll(cli).alive
        srv.close()
        assert fastlive.check_poll(cli, timeout=2).status is fastlive.Status.PEER_CLOSED


def test_version_commands():
    cmds = [[sys.executable, "-m", "fastlive", "--version"]]
    # the console script that belongs to this interpreter (pip install -e .
    # puts it beside it; a `fastlive` elsewhere on PATH may be another's)
    script = os.path.join(os.path.dirname(sys.executable), "fastlive")
    if os.path.exists(script):
        cmds.append([script, "--version"])
    for cmd in cmds:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0
        assert out.stdout.strip() == f"fastlive {fastlive.__version__}"
