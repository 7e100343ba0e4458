"""fastlive's figures for the monitoring systems users already run.

* :mod:`fastlive.metrics.prometheus` - a ``prometheus_client`` custom
  collector (``pip install fastlive[prometheus]``);
* :mod:`fastlive.metrics.otel` - OpenTelemetry observable instruments
  (``pip install fastlive[otel]``; needs ``opentelemetry-api`` only).

Both read the same two sources at collection time, with no thread of
their own: the process's engines (:class:`ProcessFigures`, from every
Monitor and HeartbeatEngine) and, when asked for, one census of the
machine's TCP sockets (:class:`MachineFigures`, a ``sock_diag`` dump
tallied in C).  This package imports neither client library; ``import
fastlive`` does not import this package.
"""
from __future__ import annotations

from ._machine import (DEFAULT_TOP, STATE_LABELS, SUSPECT_REASONS, MachineFigures,
                       MachineSampler)
from ._process import DETECTION_BUCKETS, LEDGER, Ledger, ProcessFigures

__all__ = ["DEFAULT_TOP", "DETECTION_BUCKETS", "LEDGER", "Ledger", "MachineFigures",
           "MachineSampler", "ProcessFigures", "STATE_LABELS", "SUSPECT_REASONS",
           "process_figures"]


def process_figures() -> ProcessFigures:
    """The process's engines, summed, now (see :class:`Ledger`)."""
    return LEDGER.figures()
