"""Register fastlive's pytest plugin when running from a source tree that
was built in place but not installed (an install registers it through the
``pytest11`` entry point).

Also the markers for what qemu-user cannot run (scripts/arm_wheels.sh runs
the suite on emulated aarch64 and armv7l); see fastlive/_platform.py:

* ``@pytest.mark.no_qemu("why")`` - skipped under qemu-user with that
  reason (network namespaces, root-only setups, netlink, host tools, or
  too slow emulated).
* ``@pytest.mark.timed("why")`` - timed against wall-clock windows that an
  emulated CPU misses: skipped under qemu-user and in a full-system TCG
  machine (scripts/arm_kernels.sh sets ``FASTLIVE_TCG_VM`` there), and in
  the ASan/UBSan run (scripts/sanitize.sh sets ``FASTLIVE_SANITIZED``: it
  looks for memory errors, and its instrumented interpreters start too
  slowly, dozens at once, for 1 s windows).
* ``@pytest.mark.tcp_info_fields("rtt", "bytes_acked", ...)`` - skipped
  where getsockopt(TCP_INFO) does not return those fields (qemu-user
  returns 4 bytes: ``state`` only).  With no names: needs the 104-byte
  base record every real kernel returns.
"""
import os

import pytest

import fastlive.testing.plugin
from fastlive import _platform


def pytest_configure(config):
    pm = config.pluginmanager
    if not pm.is_registered(fastlive.testing.plugin):
        pm.register(fastlive.testing.plugin, "fastlive")
    config.addinivalue_line(
        "markers", "no_qemu(reason): cannot run under qemu-user emulation; "
        "skipped there with the reason")
    config.addinivalue_line(
        "markers", "timed(reason): timed against wall-clock windows; skipped on an "
        "emulated CPU (qemu-user or a full-system TCG machine) with the reason")
    config.addinivalue_line(
        "markers", "tcp_info_fields(*names): needs these TCP_INFO fields "
        "(none named: the 104-byte base record); skipped where the kernel "
        "or emulator returns fewer bytes")


def pytest_report_header(config):
    return f"fastlive platform: {_platform.describe()}"


def _tcp_info_skip(names):
    from fastlive.tcpinfo import FIELDS
    ends = {name: end for name, _c, end in FIELDS}
    unknown = [n for n in names if n not in ends]
    if unknown:
        raise ValueError(f"tcp_info_fields: unknown field(s) {unknown}")
    need = max((ends[n] for n in names), default=_platform.BASE_TCP_INFO_LENGTH)
    have = _platform.tcp_info_length()
    if have >= need:
        return None
    where = "qemu-user" if _platform.under_qemu() else "this kernel"
    what = ", ".join(names) if names else "the 104-byte base record"
    return (f"TCP_INFO returns {have} bytes on {where}; the test needs "
            f"{need} ({what})")


def pytest_collection_modifyitems(config, items):
    qemu = _platform.under_qemu()
    emulated = "qemu-user" if qemu else _platform.tcg_vm()
    slow_cpu = f"emulated CPU ({emulated})" if emulated else (
        "ASan/UBSan build (FASTLIVE_SANITIZED)" if os.environ.get("FASTLIVE_SANITIZED") else "")
    for item in items:
        if slow_cpu:
            for mark in item.iter_markers("timed"):
                why = mark.args[0] if mark.args else mark.kwargs.get("reason", "")
                item.add_marker(pytest.mark.skip(
                    reason=f"{slow_cpu}: {why or 'timed test'}"))
                break
        if qemu:
            for mark in item.iter_markers("no_qemu"):
                why = mark.args[0] if mark.args else mark.kwargs.get("reason", "")
                item.add_marker(pytest.mark.skip(
                    reason=f"qemu-user: {why or 'cannot run under emulation'}"))
                break
        for mark in item.iter_markers("tcp_info_fields"):
            reason = _tcp_info_skip(mark.args)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
            break


@pytest.fixture(params=["asyncio", "uvloop"])
def kind(request):
    """The aio tests run on both loops: asyncio's default and uvloop (skips
    with the reason where uvloop is not installed)."""
    from _aio_util import loop_factory
    loop_factory(request.param)
    return str(request.param)


@pytest.fixture
def listener():
    """A listening loopback TCP socket (backlog 512), closed after the test."""
    import socket
    with socket.create_server(("127.0.0.1", 0), backlog=512) as lst:
        yield lst
