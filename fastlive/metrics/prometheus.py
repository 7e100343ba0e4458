"""fastlive's figures as a ``prometheus_client`` custom collector.

``FastliveCollector`` is read at scrape time: each scrape sums the
process's engines (O(engines), nothing per connection) and, with
``machine=True``, takes one census of the namespace's TCP sockets (a
``sock_diag`` dump tallied in C).  There is no thread of ours and no
per-connection label::

    from prometheus_client import start_http_server
    from fastlive.metrics.prometheus import register
    register()                      # process figures into the default REGISTRY
    start_http_server(9464, addr="127.0.0.1")

Metrics (units in the names):

process (``process=True``)
    ``fastlive_deaths_total{status,method}`` counter; ``fastlive_detection_seconds``
    histogram (last sign of life to verdict, where known);
    ``fastlive_monitored_connections`` and ``fastlive_engines`` gauges;
    ``fastlive_heartbeat_pings_sent_total``, ``..._answered_total``,
    ``..._missed_total`` counters; ``fastlive_heartbeat_rtt_seconds`` histogram.
machine (``machine=True``)
    ``fastlive_tcp_connections{state}`` (node_exporter's state values),
    ``fastlive_tcp_suspect_connections{reason}``,
    ``fastlive_tcp_retransmitting_connections``, ``fastlive_tcp_zero_window_connections``,
    ``fastlive_tcp_close_wait_connections{port}`` (top ``close_wait_top`` local
    ports, the rest as ``port="other"``), ``fastlive_census_up``,
    ``fastlive_census_duration_seconds``.
"""
from __future__ import annotations

import math
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

from prometheus_client.core import (REGISTRY, CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from prometheus_client.registry import CollectorRegistry

from ._machine import DEFAULT_TOP, MachineSampler
from ._process import DETECTION_BUCKETS, LEDGER, Ledger

__all__ = ["FastliveCollector", "register"]


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def _buckets(bounds: Sequence[float], counts: Sequence[int]) -> List[Tuple[str, float]]:
    """Cumulative (le, count) pairs from per-bucket counts (+Inf last)."""
    out: List[Tuple[str, float]] = []
    acc = 0
    for b, n in zip(list(bounds) + [math.inf], counts):
        acc += n
        out.append((_le(b), float(acc)))
    return out


class FastliveCollector:
    """A ``prometheus_client`` collector of fastlive's figures.

    ``process``: the engines of this process; ``machine``: one census of
    the network namespace per scrape (for a node-level exporter - every
    process of a fleet doing it would repeat the same dump);
    ``close_wait_top``: CLOSE_WAIT local ports reported one by one;
    ``tcp_info=False``: a cheaper census without ``tcp_info`` (no
    ``fastlive_tcp_suspect_connections``).
    """

    def __init__(self, *, process: bool = True, machine: bool = False,
                 close_wait_top: int = DEFAULT_TOP, tcp_info: bool = True,
                 ledger: Optional[Ledger] = None) -> None:
        for name, v in (("process", process), ("machine", machine)):
            if not isinstance(v, bool):
                raise TypeError(f"{name} must be a bool, not {type(v).__name__}")
        self.process = process
        self._ledger = ledger if ledger is not None else LEDGER
        self._sampler = MachineSampler(close_wait_top, tcp_info=tcp_info) if machine else None

    @property
    def machine(self) -> bool:
        """Whether each scrape takes a census of the namespace's TCP sockets."""
        return self._sampler is not None

    def describe(self) -> Iterable[Metric]:
        """The families without samples (registration checks names with
        this; it takes no census)."""
        return list(self._families(None))

    def collect(self) -> Iterator[Metric]:
        """Called by prometheus_client at each scrape."""
        return iter(list(self._families(True)))

    def probe(self) -> None:
        """Takes one census now (machine collectors): OSError if the kernel
        refuses it (a scrape would then report ``fastlive_census_up 0``)."""
        if self._sampler is not None:
            self._sampler.sample()

    def close(self) -> None:
        """Frees the census memory and netlink socket (machine collectors)."""
        if self._sampler is not None:
            self._sampler.close()

    # -- families ---------------------------------------------------------

    def _families(self, read: Optional[bool]) -> Iterator[Metric]:
        if self.process:
            yield from self._process_families(read)
        if self._sampler is not None:
            yield from self._machine_families(read)

    def _process_families(self, read: Optional[bool]) -> Iterator[Metric]:
        deaths = CounterMetricFamily(
            "fastlive_deaths", "Connections fastlive found dead, by verdict status and method.",
            labels=["status", "method"])
        monitored = GaugeMetricFamily(
            "fastlive_monitored_connections",
            "Connections watched by this process's Monitors and HeartbeatEngines.")
        engines = GaugeMetricFamily(
            "fastlive_engines", "Open Monitors and HeartbeatEngines of this process.")
        sent = CounterMetricFamily(
            "fastlive_heartbeat_pings_sent", "Heartbeat PINGs sent.")
        answered = CounterMetricFamily(
            "fastlive_heartbeat_pings_answered", "Heartbeat PINGs the peer answered (PONGs read).")
        missed = CounterMetricFamily(
            "fastlive_heartbeat_pings_missed",
            "Heartbeat PINGs with no answer before the next PING or the death.")
        if not read:
            yield from (deaths, monitored, engines, sent, answered, missed,
                        HistogramMetricFamily("fastlive_detection_seconds", ""),
                        HistogramMetricFamily("fastlive_heartbeat_rtt_seconds", ""))
            return
        f = self._ledger.figures()
        for (status, method), n in sorted(f.deaths.items()):
            deaths.add_metric([status, method], n)
        monitored.add_metric([], f.monitored)
        engines.add_metric([], f.engines)
        sent.add_metric([], f.pings_sent)
        answered.add_metric([], f.pings_answered)
        missed.add_metric([], f.pings_missed)
        yield from (deaths, monitored, engines, sent, answered, missed)
        yield HistogramMetricFamily(
            "fastlive_detection_seconds",
            "Seconds from the last sign of life to the verdict, per death where known.",
            buckets=_buckets(DETECTION_BUCKETS, f.detection_buckets), sum_value=f.detection_sum)
        yield HistogramMetricFamily(
            "fastlive_heartbeat_rtt_seconds", "Heartbeat PING to PONG round trips.",
            buckets=_buckets(f.rtt_bounds, f.rtt_buckets), sum_value=f.rtt_sum)

    def _machine_families(self, read: Optional[bool]) -> Iterator[Metric]:
        up = GaugeMetricFamily("fastlive_census_up",
                               "1 if the last sock_diag census of TCP sockets succeeded.")
        took = GaugeMetricFamily("fastlive_census_duration_seconds",
                                 "Seconds the census (kernel dump and tally) took.")
        conns = GaugeMetricFamily("fastlive_tcp_connections",
                                  "TCP sockets of the network namespace by kernel state.",
                                  labels=["state"])
        suspect = GaugeMetricFamily(
            "fastlive_tcp_suspect_connections",
            "TCP sockets whose tcp_info says the peer may be gone, by first reason "
            "(retransmits, probes, backoff, no_ack).", labels=["reason"])
        retrans = GaugeMetricFamily(
            "fastlive_tcp_retransmitting_connections",
            "TCP sockets whose retransmission timer fired and is still unanswered.")
        zero = GaugeMetricFamily(
            "fastlive_tcp_zero_window_connections",
            "TCP sockets whose peer advertises a zero window while data waits to be sent.")
        cw = GaugeMetricFamily(
            "fastlive_tcp_close_wait_connections",
            "CLOSE_WAIT sockets (the peer closed, this side did not) by local port; "
            "ports beyond the top k are summed as port=\"other\".", labels=["port"])
        if not read:
            yield from (up, took, conns, suspect, retrans, zero, cw)
            return
        assert self._sampler is not None
        try:
            m = self._sampler.sample()
        except (OSError, ValueError):
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        took.add_metric([], m.duration)
        for state, n in m.states.items():
            conns.add_metric([state], n)
        for reason, n in m.suspect.items():
            suspect.add_metric([reason], n)
        retrans.add_metric([], m.retransmitting)
        zero.add_metric([], m.zero_window)
        for port, n in m.close_wait_top:
            cw.add_metric([str(port)], n)
        cw.add_metric(["other"], m.close_wait_rest)
        yield from (up, took, conns)
        if m.suspect:
            yield suspect
        yield from (retrans, zero, cw)


def register(registry: Optional[CollectorRegistry] = None, *, process: bool = True,
             machine: bool = False, close_wait_top: int = DEFAULT_TOP,
             tcp_info: bool = True) -> FastliveCollector:
    """Creates a :class:`FastliveCollector` and registers it (default:
    prometheus_client's global ``REGISTRY``); returns it (unregister with
    ``registry.unregister(collector)``)."""
    c = FastliveCollector(process=process, machine=machine, close_wait_top=close_wait_top,
                          tcp_info=tcp_info)
    (REGISTRY if registry is None else registry).register(c)
    return c
