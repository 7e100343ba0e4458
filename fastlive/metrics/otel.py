"""fastlive's figures as OpenTelemetry observable instruments.

Needs ``opentelemetry-api`` only (``pip install fastlive[otel]``); the
application brings the SDK and its exporter.  Every instrument is
asynchronous: the SDK calls our callbacks when it collects, and they read
the process's engines (and, with ``machine=True``, one census of the
namespace's TCP sockets) - no thread of ours.  The callbacks of one
collection share one reading (taken by the first, reused for ``max_age``
seconds)::

    from fastlive.metrics.otel import instrument
    handle = instrument()              # the global MeterProvider's meter "fastlive"

Instruments (OpenTelemetry names; units as UCUM):

process
    ``fastlive.deaths`` counter {death} (``fastlive.status``, ``fastlive.method``);
    ``fastlive.detection.time`` counter s and ``fastlive.detection.count`` counter
    {death} (sum and count of detection times: the API has no asynchronous
    histogram; the bucketed distribution is on the Prometheus side);
    ``fastlive.monitored_connections`` and ``fastlive.engines`` up-down counters;
    ``fastlive.heartbeat.pings.sent|answered|missed`` counters {ping};
    ``fastlive.heartbeat.rtt.time`` counter s and ``fastlive.heartbeat.rtt.count``.
machine
    ``fastlive.tcp.connection.count`` up-down counter ({connection},
    ``network.connection.state`` with the semantic conventions' values, as
    ``system.network.connection.count``); ``fastlive.tcp.connection.suspect``
    (``fastlive.reason``); ``fastlive.tcp.connection.retransmitting``;
    ``fastlive.tcp.connection.zero_window``; ``fastlive.tcp.close_wait``
    (``network.local.port`` for the top ports, no attribute for the rest);
    ``fastlive.census.up`` and ``fastlive.census.duration`` (s) gauges.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterable, List, Optional, Tuple

from opentelemetry.metrics import CallbackOptions, Meter, Observation, get_meter

from .._version import __version__
from ..tcpstate import TcpState
from ._machine import DEFAULT_TOP, MachineFigures, MachineSampler
from ._process import LEDGER, ProcessFigures

__all__ = ["instrument", "Instruments", "OTEL_STATES"]

#: ``network.connection.state`` values of the OpenTelemetry semantic conventions.
OTEL_STATES = {
    TcpState.ESTABLISHED: "established", TcpState.SYN_SENT: "syn_sent",
    TcpState.SYN_RECV: "syn_received", TcpState.FIN_WAIT1: "fin_wait_1",
    TcpState.FIN_WAIT2: "fin_wait_2", TcpState.TIME_WAIT: "time_wait",
    TcpState.CLOSE: "close", TcpState.CLOSE_WAIT: "close_wait",
    TcpState.LAST_ACK: "last_ack", TcpState.LISTEN: "listen", TcpState.CLOSING: "closing",
}
_BY_LABEL = {s.name.lower(): v for s, v in OTEL_STATES.items()}

Cb = Callable[[CallbackOptions], Iterable[Observation]]


class _Cached:
    """One reading shared by the callbacks of a collection."""

    def __init__(self, read: Callable[[], Any], max_age: float) -> None:
        self._read = read
        self._max_age = max_age
        self._lock = threading.Lock()
        self._at = -1e18
        self._value: Any = None

    def get(self) -> Any:
        with self._lock:
            now = time.monotonic()
            if now - self._at > self._max_age:
                try:
                    self._value = self._read()
                except (OSError, ValueError):
                    self._value = None
                self._at = now
            return self._value


class Instruments:
    """What :func:`instrument` created.  OpenTelemetry's API cannot remove
    an instrument; :meth:`close` makes the callbacks report nothing and
    frees the census."""

    def __init__(self, meter: Meter, process: bool, machine: bool, close_wait_top: int,
                 max_age: float) -> None:
        self.meter = meter
        self.instruments: List[Any] = []
        self._closed = False
        self._sampler = MachineSampler(close_wait_top) if machine else None
        self._proc = _Cached(LEDGER.figures, max_age)
        self._mach = _Cached(self._sample, max_age)
        if process:
            self._add_process()
        if machine:
            self._add_machine()

    def _sample(self) -> Optional[MachineFigures]:
        return None if self._sampler is None else self._sampler.sample()

    def close(self) -> None:
        """From now on the callbacks report nothing; frees the census."""
        self._closed = True
        if self._sampler is not None:
            self._sampler.close()

    # -- helpers ----------------------------------------------------------

    def _cb(self, cache: _Cached, fn: Callable[[Any], Iterable[Tuple[float, Any]]]) -> Cb:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            if self._closed:
                return []
            value = cache.get()
            if value is None:
                return []
            return [Observation(v, attrs) for v, attrs in fn(value)]
        return callback

    def _counter(self, name: str, unit: str, desc: str, cb: Cb) -> None:
        self.instruments.append(self.meter.create_observable_counter(
            name, callbacks=[cb], unit=unit, description=desc))

    def _updown(self, name: str, unit: str, desc: str, cb: Cb) -> None:
        self.instruments.append(self.meter.create_observable_up_down_counter(
            name, callbacks=[cb], unit=unit, description=desc))

    def _gauge(self, name: str, unit: str, desc: str, cb: Cb) -> None:
        self.instruments.append(self.meter.create_observable_gauge(
            name, callbacks=[cb], unit=unit, description=desc))

    # -- the instruments --------------------------------------------------

    def _add_process(self) -> None:
        P = self._proc

        def p(fn: Callable[[ProcessFigures], Iterable[Tuple[float, Any]]]) -> Cb:
            return self._cb(P, fn)

        self._counter("fastlive.deaths", "{death}",
                      "Connections fastlive found dead, by verdict status and method.",
                      p(lambda f: [(n, {"fastlive.status": s, "fastlive.method": m})
                                   for (s, m), n in sorted(f.deaths.items())]))
        self._counter("fastlive.detection.time", "s",
                      "Sum of the seconds from the last sign of life to the verdict.",
                      p(lambda f: [(f.detection_sum, None)]))
        self._counter("fastlive.detection.count", "{death}",
                      "Deaths with a known detection time.",
                      p(lambda f: [(f.detection_count, None)]))
        self._updown("fastlive.monitored_connections", "{connection}",
                     "Connections watched by this process's Monitors and HeartbeatEngines.",
                     p(lambda f: [(f.monitored, None)]))
        self._updown("fastlive.engines", "{engine}",
                     "Open Monitors and HeartbeatEngines of this process.",
                     p(lambda f: [(f.engines, None)]))
        self._counter("fastlive.heartbeat.pings.sent", "{ping}", "Heartbeat PINGs sent.",
                      p(lambda f: [(f.pings_sent, None)]))
        self._counter("fastlive.heartbeat.pings.answered", "{ping}",
                      "Heartbeat PINGs the peer answered.",
                      p(lambda f: [(f.pings_answered, None)]))
        self._counter("fastlive.heartbeat.pings.missed", "{ping}",
                      "Heartbeat PINGs with no answer in time.",
                      p(lambda f: [(f.pings_missed, None)]))
        self._counter("fastlive.heartbeat.rtt.time", "s", "Sum of heartbeat round trips.",
                      p(lambda f: [(f.rtt_sum, None)]))
        self._counter("fastlive.heartbeat.rtt.count", "{ping}", "Heartbeat round trips timed.",
                      p(lambda f: [(f.rtt_count, None)]))

    def _add_machine(self) -> None:
        M = self._mach

        def m(fn: Callable[[MachineFigures], Iterable[Tuple[float, Any]]]) -> Cb:
            return self._cb(M, fn)

        def up(options: CallbackOptions) -> Iterable[Observation]:
            if self._closed:
                return []
            return [Observation(0 if M.get() is None else 1)]

        self._gauge("fastlive.census.up", "1",
                    "1 if the last sock_diag census of TCP sockets succeeded.", up)
        self._gauge("fastlive.census.duration", "s",
                    "Seconds the census (kernel dump and tally) took.",
                    m(lambda f: [(f.duration, None)]))
        self._updown("fastlive.tcp.connection.count", "{connection}",
                     "TCP sockets of the network namespace by state.",
                     m(lambda f: [(n, {"network.connection.state": _BY_LABEL[s]})
                                  for s, n in f.states.items()]))
        self._updown("fastlive.tcp.connection.suspect", "{connection}",
                     "TCP sockets whose tcp_info says the peer may be gone, by first reason.",
                     m(lambda f: [(n, {"fastlive.reason": r}) for r, n in f.suspect.items()]))
        self._updown("fastlive.tcp.connection.retransmitting", "{connection}",
                     "TCP sockets whose retransmission timer fired and is unanswered.",
                     m(lambda f: [(f.retransmitting, None)]))
        self._updown("fastlive.tcp.connection.zero_window", "{connection}",
                     "TCP sockets whose peer advertises a zero window while data waits.",
                     m(lambda f: [(f.zero_window, None)]))
        self._updown("fastlive.tcp.close_wait", "{connection}",
                     "CLOSE_WAIT sockets by local port (top ports; the rest without attribute).",
                     m(lambda f: [(n, {"network.local.port": port})
                                  for port, n in f.close_wait_top]
                       + [(f.close_wait_rest, None)]))


def instrument(meter: Optional[Meter] = None, *, process: bool = True, machine: bool = False,
               close_wait_top: int = DEFAULT_TOP, max_age: float = 1.0) -> Instruments:
    """Creates fastlive's observable instruments on ``meter`` (default: the
    global MeterProvider's meter ``"fastlive"``).  ``machine=True`` adds
    the census instruments (one ``sock_diag`` dump per collection);
    ``max_age`` (seconds) is how long one reading serves the callbacks of
    a collection."""
    for name, v in (("process", process), ("machine", machine)):
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be a bool, not {type(v).__name__}")
    if isinstance(max_age, bool) or not isinstance(max_age, (int, float)):
        raise TypeError(f"max_age must be a number of seconds, not {type(max_age).__name__}")
    if not 0 <= max_age <= 3600:
        raise ValueError(f"max_age must be in 0..3600 seconds, got {max_age!r}")
    if meter is None:
        meter = get_meter("fastlive", __version__)
    return Instruments(meter, process, machine, close_wait_top, float(max_age))
