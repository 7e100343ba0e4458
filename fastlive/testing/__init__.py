"""fastlive's testing kit: peers that die in every way a TCP peer can.

Use it to test your own dead-peer handling, with or without pytest:

* :class:`PeerProcess` / :func:`loopback_peer` - a helper process holding
  the peer end; close (FIN), reset (RST), half-close, SIGKILL, SIGSTOP.
* :class:`ManyPeers` - the peer ends of thousands of loopback connections.
* :class:`HeartbeatPeerProcess` - a peer that answers heartbeat PINGs.
* :class:`NetnsPair` - two network namespaces and a veth pair for the
  *silent* deaths (link down, blackhole, firewall drop); needs root.

The pytest fixtures live in :mod:`fastlive.testing.plugin` (loaded by the
``pytest11`` entry point when fastlive is installed).  ``import fastlive``
does not import this package.
"""
from __future__ import annotations

from .netns import (NetnsPair, firewall_tool, in_netns, list_netns, netns_available,
                    netns_unavailable, sweep_stale_netns)
from .peer import (Address, HeartbeatPeerProcess, ManyPeers, PeerError, PeerProcess,
                   close_all, loopback_peer)

__all__ = [
    "Address", "PeerProcess", "PeerError", "loopback_peer", "ManyPeers", "close_all",
    "HeartbeatPeerProcess", "NetnsPair", "in_netns", "list_netns", "netns_available",
    "netns_unavailable", "sweep_stale_netns", "firewall_tool",
]
