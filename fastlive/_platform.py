"""What the running "kernel" can do: native Linux or qemu-user emulation.

qemu-user runs an ARM Python on an x86_64 host by translating each system
call.  It passes most socket calls straight to the host kernel, but it
treats every ``IPPROTO_TCP`` option as an ``int``: ``getsockopt(TCP_INFO)``
returns 4 bytes (``tcpi_state`` and three fields that happen to share the
word), so every later field is absent.  It also cannot emulate everything
(netlink, namespaces entered from the emulated process, ...), and it is
10-50 times slower.  Tests use this module to skip, with a reason, what
cannot run there.

Two independent signals, either of which is enough:

* **The executable.**  The kernel's ``exe`` link of the running thread
  points at the qemu binary (``qemu-aarch64-static``, or the binfmt_misc
  alias ``aarch64-binfmt-P``).  qemu rewrites ``/proc/self/exe`` and
  ``/proc/<pid>/exe`` to show the emulated program, but not
  ``/proc/thread-self/exe`` nor ``/proc/self/task/<tid>/exe``, so those
  show the truth.
* **The short TCP_INFO.**  No Linux kernel since 2.6 returns fewer than
  104 bytes of ``struct tcp_info``; qemu-user returns 4.

Both are read once and cached.

A **full-system emulated machine** (``qemu-system`` with TCG, as
``scripts/arm_kernels.sh`` boots for the ARM kernels) is the opposite
case: its kernel is real, so TCP_INFO is full length and nothing above
fires, but its CPU is 10-50 times slower than the host's.  Nothing inside
the guest tells TCG from KVM or hardware (the ``virt`` machine's device
tree and a ``QEMU`` DMI vendor look the same under KVM), so the runner
says so: it sets ``FASTLIVE_TCG_VM`` (to a description) in the guest's
init, and every process inherits it.  :func:`tcg_vm` reads it;
:func:`emulated_cpu` is true under either kind of emulation (tests timed
against wall-clock windows skip there).
"""
from __future__ import annotations

import functools
import os
import socket
import threading
from typing import Optional

__all__ = [
    "BASE_TCP_INFO_LENGTH", "TCG_VM_ENV", "tcp_info_length", "tcp_info_truncated", "emulator",
    "under_qemu", "tcg_vm", "emulated_cpu", "describe",
]

#: ``struct tcp_info`` up to ``tcpi_total_retrans``: what every Linux kernel
#: since 2.6.x returns (the fields the UAPI header had in 2006).
BASE_TCP_INFO_LENGTH = 104

#: The buffer handed to getsockopt; larger than any kernel's struct.
_ASK = 512


@functools.cache
def tcp_info_length() -> int:
    """How many bytes ``getsockopt(TCP_INFO)`` returns here for a TCP socket
    (0 if it fails, e.g. no TCP support).  A fresh, unconnected socket is
    enough: the kernel fills the record whatever the state."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            return len(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _ASK))
    except OSError:
        return 0


def tcp_info_truncated() -> bool:
    """True when TCP_INFO returns less than the 104-byte base record (qemu-
    user: 4 bytes), so only ``state`` (and a few neighbours) can be read."""
    return tcp_info_length() < BASE_TCP_INFO_LENGTH


def _exe_links() -> list[str]:
    tid = threading.get_native_id()
    return ["/proc/thread-self/exe", f"/proc/self/task/{tid}/exe"]


@functools.cache
def emulator() -> Optional[str]:
    """The path of the qemu-user binary running this process, or None when
    the process runs natively (or the link cannot be read)."""
    for link in _exe_links():
        try:
            target = os.readlink(link)
        except OSError:
            continue
        name = os.path.basename(target)
        if name.startswith("qemu-") or "-binfmt" in name:
            return target
    return None


@functools.cache
def under_qemu() -> bool:
    """True when this Python runs under qemu-user emulation (by either
    signal in the module docstring)."""
    return emulator() is not None or 0 < tcp_info_length() <= 8


#: The variable a full-system emulator's guest init sets (its value
#: describes the machine, e.g. ``qemu-system TCG (arm64, scripts/arm_kernels.sh)``).
TCG_VM_ENV = "FASTLIVE_TCG_VM"


def tcg_vm() -> Optional[str]:
    """The runner's description when this process runs in a full-system
    emulated (TCG) virtual machine, i.e. ``$FASTLIVE_TCG_VM`` when set and
    not empty; else None."""
    return os.environ.get(TCG_VM_ENV) or None


def emulated_cpu() -> bool:
    """True when the CPU is emulated: qemu-user (:func:`under_qemu`) or a
    full-system TCG machine (:func:`tcg_vm`).  Wall-clock windows that a
    native CPU meets with room to spare are then missed."""
    return under_qemu() or tcg_vm() is not None


def describe() -> str:
    """One line for test headers and bug reports."""
    import platform
    if under_qemu():
        where = f"qemu-user ({emulator() or 'short TCP_INFO'})"
    elif tcg_vm():
        where = f"{tcg_vm()}, Linux {platform.release()}"
    else:
        where = "native"
    return (f"{platform.machine()} {where}, Python {platform.python_version()}, "
            f"TCP_INFO {tcp_info_length()} bytes")
