"""A heartbeat peer process, for tests, the demo and interop checks::

    python -m fastlive.heartbeat_peer --connect 127.0.0.1:PORT [--count N]
        [--interval S] [--misses M] [--engine c|py] [--lifetime S]

It opens N connections, prints ``ready``, and answers PINGs (and pings
too, with --interval) until every connection is gone or --lifetime passes.
Freeze it (SIGSTOP) or kill it to see what each method notices.
"""
from __future__ import annotations

import sys

from .heartbeat import _peer_main

if __name__ == "__main__":
    sys.exit(_peer_main())
