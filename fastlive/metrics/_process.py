"""In-process figures: every Monitor and HeartbeatEngine of this process.

:class:`Ledger` reads the engines :func:`fastlive._registry.engines` lists
at the moment it is asked (no thread of its own) and sums their counters:
deaths by (status, method), the detection-time histogram, the connections
watched, and the heartbeat engines' PING counters and RTT histogram.  Each
read is O(engines): per engine a ``len()`` and a copy of a few counters,
never anything per connection.

Counters must not go down when an engine closes, so the ledger remembers
each engine's counters (its :class:`~fastlive._registry.DeathCounters`
object, which outlives the engine, and the last heartbeat statistics it
read) and folds them into a "retired" total once the engine is gone:
the deaths of an engine seen by one read are never lost (its counters
object stays readable after the close); heartbeat PINGs counted between
the last read and the close are.  An engine opened and closed entirely
between two reads is not seen at all (the registry holds engines weakly
and keeps no history).
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from .. import _registry
from ..verdict import Method, Status

__all__ = ["ProcessFigures", "Ledger", "LEDGER", "DETECTION_BUCKETS"]

DETECTION_BUCKETS = _registry.DETECTION_BUCKETS


def _default_rtt_bounds() -> Tuple[float, ...]:
    """The heartbeat engine's RTT bucket bounds (finite ones), so the
    histogram has its buckets before the first engine exists."""
    from ..heartbeat import engine
    bounds = getattr(engine, "_RTT_BOUNDS", ())
    return tuple(float(b) for b in bounds if b != float("inf"))


_STATUS = {int(s): s.name.lower() for s in Status}
_METHOD = {int(m): m.name.lower() for m in Method}


@dataclass(frozen=True)
class ProcessFigures:
    """The process's engines, summed."""

    engines: int                               #: live (not closed) engines
    monitored: int                             #: connections they watch
    deaths: Dict[Tuple[str, str], int]         #: by (status, method) label values
    detection_buckets: List[int]               #: per bucket (not cumulative), +Inf last
    detection_sum: float                       #: seconds
    detection_count: int                       #: deaths with a known detection time
    pings_sent: int
    pings_answered: int                        #: our PINGs the peers answered (PONGs read)
    pings_missed: int                          #: PINGs with no answer in time
    rtt_bounds: Tuple[float, ...]              #: finite RTT bucket bounds, seconds
    rtt_buckets: List[int]                     #: per bucket (not cumulative), +Inf last
    rtt_sum: float
    rtt_count: int


class _Hb:
    """Heartbeat counters of one engine, or a sum of them."""

    __slots__ = ("sent", "answered", "missed", "bounds", "buckets", "rtt_sum")

    def __init__(self) -> None:
        self.sent = self.answered = self.missed = 0
        self.bounds: Optional[Tuple[float, ...]] = None
        self.buckets: List[int] = []
        self.rtt_sum = 0.0

    def add(self, o: _Hb) -> None:
        self.sent += o.sent
        self.answered += o.answered
        self.missed += o.missed
        if o.bounds is None:
            return
        if self.bounds is None:
            self.bounds, self.buckets = o.bounds, [0] * len(o.buckets)
        if o.bounds == self.bounds:
            self.buckets = [a + b for a, b in zip(self.buckets, o.buckets)]
            self.rtt_sum += o.rtt_sum


def _read_hb(engine: Any) -> Optional[_Hb]:
    """The heartbeat counters of an engine with ``stats()``; None for other
    engines, or when it closed under us."""
    stats = getattr(engine, "stats", None)
    if not callable(stats):
        return None
    try:
        st = stats()
    except (ValueError, OSError, RuntimeError):      # closed meanwhile
        return None
    hb = _Hb()
    hb.sent = int(getattr(st, "pings_sent", 0))
    hb.answered = int(getattr(st, "pongs_received", 0))
    hb.missed = int(getattr(st, "misses", 0))
    buckets = getattr(st, "rtt_buckets", None)
    if buckets:
        bounds = tuple(float(b) for b, _ in buckets)
        if bounds[-1] == float("inf"):
            hb.bounds = bounds[:-1]
            hb.buckets = [int(n) for _, n in buckets]
            hb.rtt_sum = float(getattr(st, "rtt_sum", 0.0))
    return hb


class _Seen:
    __slots__ = ("ref", "counters", "hb")

    def __init__(self, ref: Any, counters: Optional[_registry.DeathCounters]) -> None:
        self.ref = ref
        self.counters = counters
        self.hb: Optional[_Hb] = None


class Ledger:
    """Sums the process's engines; one per process (:data:`LEDGER`) so that
    every exporter sees the same monotonic totals."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: Dict[int, _Seen] = {}
        self._retired_deaths: Dict[Tuple[int, int], int] = {}
        self._retired_buckets = [0] * (len(DETECTION_BUCKETS) + 1)
        self._retired_sum = 0.0
        self._retired_count = 0
        self._retired_hb = _Hb()

    def _retire(self, s: _Seen) -> None:
        if s.counters is not None:
            deaths, buckets, total, n = s.counters.snapshot()
            for k, v in deaths.items():
                self._retired_deaths[k] = self._retired_deaths.get(k, 0) + v
            self._retired_buckets = [a + b for a, b in zip(self._retired_buckets, buckets)]
            self._retired_sum += total
            self._retired_count += n
        if s.hb is not None:
            self._retired_hb.add(s.hb)

    def figures(self) -> ProcessFigures:
        """Reads every live engine now."""
        live = _registry.engines()
        with self._lock:
            monitored = 0
            current: Dict[int, _Seen] = {}
            for e in live:
                try:
                    monitored += len(e)
                except (ValueError, OSError, RuntimeError):
                    continue                    # closed between the listing and now
                key = id(e)
                s = self._seen.get(key)
                if s is None or s.ref() is not e:
                    if s is not None:           # id reused: the old engine is gone
                        self._retire(s)
                    s = _Seen(weakref.ref(e), getattr(e, "counters", None))
                hb = _read_hb(e)
                if hb is not None:
                    s.hb = hb
                current[key] = s
            for key, s in self._seen.items():
                if key not in current or current[key] is not s:
                    self._retire(s)
            self._seen = current

            deaths: Dict[Tuple[int, int], int] = dict(self._retired_deaths)
            buckets = list(self._retired_buckets)
            dsum, dcount = self._retired_sum, self._retired_count
            hb = _Hb()
            hb.add(self._retired_hb)
            for s in current.values():
                if s.counters is not None:
                    d, b, total, n = s.counters.snapshot()
                    for k, v in d.items():
                        deaths[k] = deaths.get(k, 0) + v
                    buckets = [x + y for x, y in zip(buckets, b)]
                    dsum += total
                    dcount += n
                if s.hb is not None:
                    hb.add(s.hb)
            engines = len(current)
        if hb.bounds is None:
            hb.bounds = _default_rtt_bounds()
            hb.buckets = [0] * (len(hb.bounds) + 1)
        labelled: Dict[Tuple[str, str], int] = {}
        for (st, me), v in deaths.items():
            lk = (_STATUS.get(st, str(st)), _METHOD.get(me, str(me)))
            labelled[lk] = labelled.get(lk, 0) + v
        return ProcessFigures(
            engines, monitored, labelled, buckets, dsum, dcount,
            hb.sent, hb.answered, hb.missed, hb.bounds, hb.buckets,
            hb.rtt_sum, sum(hb.buckets))


#: The process's ledger (every exporter reads this one).
LEDGER = Ledger()
