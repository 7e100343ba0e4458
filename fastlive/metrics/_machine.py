"""Machine-level figures from one census dump, tallied in C.

:class:`MachineSampler` keeps one ``struct fl_census`` (its receive buffer
and record array are reused, grown, never shrunk), a 64 Ki-entry scratch
table and the top-k arrays, so a sample allocates nothing per socket: the
kernel's ``sock_diag`` dump fills the C records and ``fl_census_tally``
counts them in one pass.  The dump runs in the network namespace of the
calling thread (see ``fastlive exporter --netns``).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

from .._lib import check_rc, count, ffi, lib
from ..tcpstate import TcpState

__all__ = ["MachineFigures", "MachineSampler", "STATE_LABELS", "SUSPECT_REASONS",
           "DEFAULT_TOP"]

#: Label value per kernel state number: node_exporter's ``tcpstat`` values
#: (the kernel's names, lowercase).
STATE_LABELS: Dict[int, str] = {int(s): s.name.lower() for s in TcpState}
#: Suspect reasons in the order of ``fl_tcp_info_suspect``; a socket counts under the first.
SUSPECT_REASONS: Tuple[str, ...] = ("retransmits", "probes", "backoff", "no_ack")
#: CLOSE_WAIT ports reported one by one (the rest are summed).
DEFAULT_TOP = 10
_MAX_TOP = 1000


@dataclass(frozen=True)
class MachineFigures:
    """One census, counted."""

    sockets: int                          #: TCP sockets of the namespace
    states: Dict[str, int]                #: by state label (every state, zeros included)
    suspect: Dict[str, int]               #: by reason (SUSPECT_REASONS); {} without tcp_info
    retransmitting: int                   #: retransmission timer fired, not yet answered
    zero_window: int                      #: peer's window 0 with data waiting to be sent
    close_wait_top: List[Tuple[int, int]]  #: (local port, CLOSE_WAIT sockets), most first
    close_wait_rest: int                  #: CLOSE_WAIT sockets on the other ports
    close_wait_ports: int                 #: distinct local ports with CLOSE_WAIT sockets
    duration: float                       #: seconds the dump and tally took
    interrupted: bool                     #: the kernel flagged the dump as racing changes


class MachineSampler:
    """Counts the TCP sockets of this network namespace on demand.

    ``top`` is how many CLOSE_WAIT local ports are reported one by one
    (0..1000).  ``tcp_info=False`` asks the kernel for the base records
    only (about a third cheaper; the suspect counts are then all 0 and
    :attr:`MachineFigures.suspect` is empty).  :meth:`sample` is
    thread-safe (samples are serialized).

    The dump socket is opened by the first :meth:`sample`, in the network
    namespace of the thread that calls it, and belongs to that namespace
    from then on."""

    def __init__(self, top: int = DEFAULT_TOP, *, tcp_info: bool = True) -> None:
        self.top = count("top", top, 0, _MAX_TOP)
        if not isinstance(tcp_info, bool):
            raise TypeError(f"tcp_info must be a bool, not {type(tcp_info).__name__}")
        self.tcp_info = tcp_info
        ptr = ffi.new("struct fl_census **")
        check_rc(lib.fl_census_new(ptr))
        self._c: Any = ffi.gc(ptr[0], lib.fl_census_free)
        self._tally: Any = ffi.new("struct fl_tally *")
        self._scratch: Any = ffi.new("uint32_t[65536]")
        self._ports: Any = ffi.new("uint16_t[]", max(self.top, 1))
        self._counts: Any = ffi.new("uint32_t[]", max(self.top, 1))
        self._lock = threading.Lock()

    def sample(self) -> MachineFigures:
        """One ``sock_diag`` dump of every TCP socket (IPv4 and IPv6, with
        ``tcp_info``) and its tally.  Raises ``OSError`` when the kernel
        refuses the dump."""
        with self._lock:
            t0 = time.perf_counter()
            c, t = self._c, self._tally
            if c is None:
                raise ValueError("MachineSampler is closed")
            check_rc(lib.fl_census_dump(c, 3, 0, -1, 1 if self.tcp_info else 0))
            k = check_rc(lib.fl_census_tally(c, t, self._scratch, self._ports, self._counts,
                                             self.top))
            top = [(int(self._ports[i]), int(self._counts[i])) for i in range(k)]
            states = {label: int(t.states[n]) for n, label in STATE_LABELS.items()}
            suspect = ({r: int(t.suspect[i]) for i, r in enumerate(SUSPECT_REASONS)}
                       if self.tcp_info else {})
            interrupted = bool(c.flags & lib.FL_CENSUS_INTR)
            return MachineFigures(int(t.sockets), states, suspect, int(t.retransmitting),
                                  int(t.zero_window), top, int(t.close_wait_rest),
                                  int(t.close_wait_ports), time.perf_counter() - t0,
                                  interrupted)

    def close(self) -> None:
        """Frees the C census (and its netlink socket) now."""
        with self._lock:
            c, self._c = self._c, None
            if c is not None:
                ffi.release(c)

    def __enter__(self) -> MachineSampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
