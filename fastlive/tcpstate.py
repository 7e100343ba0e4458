"""The kernel's TCP states (include/net/tcp_states.h)."""
from __future__ import annotations

import enum
from typing import Union

__all__ = ["TcpState"]


class TcpState(enum.IntEnum):
    """``tcpi_state`` values, named as the kernel names them.

    The state moves only on segments and timers: a peer that vanished
    silently leaves it at ESTABLISHED until a timer (keepalive,
    TCP_USER_TIMEOUT, retransmissions) gives up and moves it to CLOSE.
    """

    ESTABLISHED = 1   #: connected; says nothing about the peer being alive
    SYN_SENT = 2      #: connect() sent SYN, no answer yet
    SYN_RECV = 3      #: SYN received, SYN-ACK sent (Fast Open child)
    FIN_WAIT1 = 4     #: we closed (sent FIN), not yet acknowledged
    FIN_WAIT2 = 5     #: our FIN acknowledged; waiting for the peer's FIN
    TIME_WAIT = 6     #: both FINs exchanged, we closed first
    CLOSE = 7         #: over: reset, timed out, or never connected
    CLOSE_WAIT = 8    #: the peer's FIN arrived; we have not closed
    LAST_ACK = 9      #: peer closed first, then we did; waiting for the last ACK
    LISTEN = 10       #: a listening socket
    CLOSING = 11      #: both sides sent FIN at once

    @classmethod
    def of(cls, value: int) -> Union[TcpState, int]:
        """The enum member, or the bare int for a state this enum lacks
        (NEW_SYN_RECV and BOUND_INACTIVE never reach tcp_info)."""
        try:
            return cls(value)
        except ValueError:
            return value
