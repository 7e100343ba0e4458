"""fastlive for asyncio (and uvloop): dead peers found inside the event loop.

``import fastlive.aio`` explicitly; ``import fastlive`` does not import
asyncio.

* :func:`peer_gone` - ``await peer_gone(writer, within=10)`` returns the
  :class:`~fastlive.verdict.Verdict` when the peer is gone.  One epoll
  :class:`~fastlive.monitor.Monitor` per loop, its fd on the loop with
  ``add_reader``: no thread, no task, no polling per connection.
  :func:`watch` is the same as a future (for callbacks).
* :func:`guard` - close a connection when its peer is gone, calling a hook
  with the verdict; :func:`guard_streams` / :func:`start_server` for
  ``asyncio.start_server`` and :func:`guard_protocol` for
  ``loop.create_server``: every accepted connection guarded.
* :func:`socket_factory` - sockets armed with a bound before they connect,
  for client drivers that make their own (aiohttp's ``TCPConnector``); the
  bound covers the driver's retry on a fresh connection (:func:`plan_client`).
* :class:`LoopHeartbeat` - the heartbeat engine's deaths delivered on the
  loop (its fd on the loop); the engine's own thread sends and answers the
  PINGs.

See docs/aio.md for the recipes for driver-owned sockets (redis,
asyncpg/psycopg, aiohttp client sessions).
"""
from __future__ import annotations

from .client import ClientPlan, plan_client, socket_factory
from .heartbeat import LoopHeartbeat
from .server import OnGone, guard, guard_protocol, guard_streams, start_server
from .target import check_within
from .watcher import (LOCAL_CLOSE, LoopWatcher, closed_locally, peer_gone, verdict_of_exc, watch,
                      watcher_for)

__all__ = [
    "peer_gone", "watch", "LOCAL_CLOSE", "closed_locally", "verdict_of_exc",
    "LoopWatcher", "watcher_for", "check_within",
    "guard", "guard_streams", "guard_protocol", "start_server", "OnGone",
    "LoopHeartbeat", "socket_factory", "plan_client", "ClientPlan",
]
