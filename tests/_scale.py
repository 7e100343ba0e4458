"""One scale knob for the amount of work a test does on an emulated CPU.

Under qemu-user (scripts/arm_wheels.sh) and in a full-system TCG machine
(scripts/arm_kernels.sh) Python runs 10-50 times slower than natively
(:func:`fastlive._platform.emulated_cpu`).  Work whose amount only buys
confidence - hypothesis examples, sweeps of a memory-growth loop, the size
of a "huge" batch - is scaled there by :data:`EMULATED_FACTOR`; a native run
keeps the full counts.  What is checked never changes, only how often.

    from _scale import scaled
    @settings(max_examples=scaled(300), deadline=None)
"""
from __future__ import annotations

from fastlive import _platform

__all__ = ["EMULATED", "EMULATED_FACTOR", "scaled"]

#: True when the CPU is emulated (qemu-user or a TCG machine).
EMULATED: bool = _platform.emulated_cpu()

#: The share of the native amount of work done on an emulated CPU.
EMULATED_FACTOR = 0.15


def scaled(n: int, minimum: int = 1) -> int:
    """``n`` natively; on an emulated CPU ``n * EMULATED_FACTOR`` rounded,
    but at least ``minimum`` (the count below which the test proves nothing:
    pass it explicitly where that matters) and at most ``n``."""
    if not EMULATED:
        return n
    return min(n, max(minimum, round(n * EMULATED_FACTOR)))
