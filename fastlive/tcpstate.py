"""The kernel's TCP states (include/net/tcp_states.h)."""
from __future__ import annotations

import enum
from typing import Union

__all__ = ["TcpState"]


class TcpState(enum.IntEnum):
    """``tcpi_state`` values, named as the kernel names them."""

    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11

    @classmethod
    def of(cls, value: int) -> Union[TcpState, int]:
        """The enum member, or the bare int for a state this enum lacks
        (NEW_SYN_RECV and BOUND_INACTIVE never reach tcp_info)."""
        try:
            return cls(value)
        except ValueError:
            return value
