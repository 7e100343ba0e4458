"""fastlive._platform: native Linux vs qemu-user, by two independent signals
(the kernel's exe link of this thread, the length TCP_INFO returns), and the
conftest markers built on them.  Runs natively and under qemu-user
(scripts/arm_wheels.sh); each assertion holds in both."""
from __future__ import annotations

import platform
import socket
import subprocess
import sys

import pytest

import fastlive
from fastlive import _platform


def test_the_two_signals_agree():
    by_exe = _platform.emulator() is not None
    by_tcp_info = 0 < _platform.tcp_info_length() <= 8
    assert by_exe == by_tcp_info, _platform.describe()
    assert _platform.under_qemu() == by_exe
    if _platform.tcg_vm():
        # a full-system machine runs its own kernel: the whole record
        assert not _platform.under_qemu() and not _platform.tcp_info_truncated()
        assert _platform.emulated_cpu()


def test_tcg_vm_is_the_runners_variable(monkeypatch):
    monkeypatch.setenv(_platform.TCG_VM_ENV, "qemu-system TCG (test)")
    assert _platform.tcg_vm() == "qemu-system TCG (test)"
    assert _platform.emulated_cpu()
    if not _platform.under_qemu():
        assert "qemu-system TCG (test)" in _platform.describe()
    monkeypatch.setenv(_platform.TCG_VM_ENV, "")
    assert _platform.tcg_vm() is None
    assert _platform.emulated_cpu() == _platform.under_qemu()


def test_tcp_info_length_is_what_the_decoder_sees(loopback_pair):
    local, _ = loopback_pair
    info = fastlive.tcp_info(local)
    assert info.length == _platform.tcp_info_length()
    assert info.state is fastlive.TcpState.ESTABLISHED
    if _platform.tcp_info_truncated():
        assert info.rtt is None and not info.has("rtt")
    else:
        assert info.length >= _platform.BASE_TCP_INFO_LENGTH
        assert info.has("total_retrans")


def test_emulator_is_a_qemu_binary_when_under_qemu():
    exe = _platform.emulator()
    if exe is None:     # native, or a full-system VM (its own kernel)
        assert ("native" in _platform.describe()) == (_platform.tcg_vm() is None)
    else:
        assert "qemu" in exe or "binfmt" in exe
        assert platform.machine() in ("aarch64", "armv7l", "armv8l")
        assert "qemu-user" in _platform.describe()


def test_a_subprocess_sees_the_same():
    # under qemu this needs binfmt_misc: the child is an emulated Python too
    code = "from fastlive import _platform as p; print(p.under_qemu(), p.tcp_info_length())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(_platform.under_qemu()),
                                  str(_platform.tcp_info_length())]


@pytest.mark.tcp_info_fields("rtt", "bytes_acked")
def test_marker_runs_only_where_fields_exist(loopback_pair):
    local, peer = loopback_pair
    local.sendall(b"x")
    assert peer.recv(1) == b"x"
    info = fastlive.tcp_info(local)
    assert info.rtt is not None and info.bytes_acked is not None


@pytest.mark.no_qemu("checks the no_qemu marker itself")
def test_no_qemu_marker_skips_under_qemu():
    assert not _platform.under_qemu()


@pytest.mark.timed("checks the timed marker itself")
def test_timed_marker_skips_on_an_emulated_cpu():
    assert not _platform.emulated_cpu()


def test_unconnected_socket_has_a_record():
    with socket.socket() as s:
        assert len(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 512)) == \
            _platform.tcp_info_length()
