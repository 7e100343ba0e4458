"""Process-wide bookkeeping the exporters read at scrape time.

Every :class:`~fastlive.Monitor` and :class:`~fastlive.HeartbeatEngine`
registers itself here (weakly: a closed or collected engine drops out) and
keeps a :class:`DeathCounters`: deaths by (status, method) and a histogram
of detection times (the seconds from the last sign of life to the verdict,
where the engine knows it).  Recording a death is a few integer additions
under a lock; nothing here allocates per connection, and nothing runs in a
thread of its own.  :func:`engines` is what ``fastlive.metrics`` reads.
"""
from __future__ import annotations

import bisect
import threading
import weakref
from typing import Dict, List, Optional, Protocol, Tuple

__all__ = ["DETECTION_BUCKETS", "DeathCounters", "Tracked", "track",
           "engines"]

#: Upper bounds (seconds) of the detection-time histogram buckets; +Inf is implied.
DETECTION_BUCKETS: Tuple[float, ...] = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0,
                                        2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)


class DeathCounters:
    """Deaths by (status, method) and a detection-time histogram."""

    __slots__ = ("_lock", "_deaths", "_buckets", "_sum", "_count")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._deaths: Dict[Tuple[int, int], int] = {}
        self._buckets = [0] * (len(DETECTION_BUCKETS) + 1)
        self._sum = 0.0
        self._count = 0

    def record(self, status: int, method: int, detection: Optional[float] = None) -> None:
        """Count one death; ``detection`` in seconds when known."""
        key = (int(status), int(method))
        with self._lock:
            self._deaths[key] = self._deaths.get(key, 0) + 1
            if detection is not None and detection >= 0:
                self._buckets[bisect.bisect_left(DETECTION_BUCKETS, detection)] += 1
                self._sum += detection
                self._count += 1

    def snapshot(self) -> Tuple[Dict[Tuple[int, int], int], List[int], float, int]:
        """A consistent copy: (deaths by (status, method), per-bucket counts
        (not cumulative; the last is +Inf), sum of seconds, timed count)."""
        with self._lock:
            return dict(self._deaths), list(self._buckets), self._sum, self._count


class Tracked(Protocol):
    """What a registered engine offers the exporters."""

    counters: DeathCounters

    @property
    def closed(self) -> bool:
        """Whether the engine was closed (closed engines are not reported)."""

    def __len__(self) -> int: ...


_live: weakref.WeakSet[Tracked] = weakref.WeakSet()
_live_lock = threading.Lock()


def track(obj: Tracked) -> None:
    """Register an engine (weakly) for :func:`engines`."""
    with _live_lock:
        _live.add(obj)


def engines() -> List[Tracked]:
    """The live, not yet closed engines of this process."""
    with _live_lock:
        objs = list(_live)
    return [o for o in objs if not o.closed]
