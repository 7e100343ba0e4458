"""The pytest plugin: fault fixtures for testing dead-peer handling.

Loaded automatically (``pytest11`` entry point ``fastlive``) when fastlive is installed;
the fixtures are thin wrappers over :mod:`fastlive.testing`, which works
without pytest too.  See ``docs/testing.md``.

===================  =========================================================
fixture              gives
===================  =========================================================
``loopback_pair``    (local, peer) sockets on 127.0.0.1, both in this process
``loopback_pairs``   factory: ``make(n)`` gives n more such pairs
``loopback_peer``    (local socket, :class:`~fastlive.testing.PeerProcess`):
                     the peer end lives in a helper process you can close,
                     reset, half-close, SIGKILL or freeze
``frozen_peer``      like ``loopback_peer`` with the helper already SIGSTOPped
``make_peer``        factory: ``make_peer(connect=(host, port))`` starts a
                     helper that connects to *your* server (or
                     ``listen=...``, ``sock=...``, ``netns=...``)
``netns_pair``       a :class:`~fastlive.testing.NetnsPair` (two namespaces,
                     veth, helper in B, ``local`` socket in A) for silent
                     deaths: ``link_down()``, ``blackhole()``; skips with the
                     reason when not root or without netns support
===================  =========================================================

Every helper process is killed and every namespace deleted at teardown,
whatever the test did.
"""
from __future__ import annotations

import socket
from typing import Any, Callable, Iterator, List, Tuple

import pytest

from .netns import NetnsPair, netns_unavailable
from .peer import ManyPeers, PeerProcess, loopback_peer as _loopback_peer

__all__ = [
    "loopback_pairs", "loopback_pair", "loopback_peer", "frozen_peer", "make_peer", "netns_pair",
    "many_peers",
]


@pytest.fixture
def loopback_pairs() -> Iterator[Callable[[int], List[Tuple[socket.socket, socket.socket]]]]:
    """A factory: ``make(n)`` returns n connected (local, peer) pairs on
    127.0.0.1, all in this process (mind RLIMIT_NOFILE: two fds a pair);
    every socket is closed after the test."""
    made: List[socket.socket] = []
    lst = socket.create_server(("127.0.0.1", 0), backlog=128)

    def make(n: int) -> List[Tuple[socket.socket, socket.socket]]:
        out = []
        for _ in range(n):
            local = socket.create_connection(lst.getsockname(), timeout=5)
            made.append(local)
            peer, _ = lst.accept()
            made.append(peer)
            out.append((local, peer))
        return out

    try:
        yield make
    finally:
        lst.close()
        for s in made:
            s.close()


@pytest.fixture
def loopback_pair(loopback_pairs: Callable[[int], List[Tuple[socket.socket, socket.socket]]]
                  ) -> Tuple[socket.socket, socket.socket]:
    """A connected (local, peer) pair of TCP sockets on 127.0.0.1, both in
    this process; closed after the test."""
    return loopback_pairs(1)[0]


@pytest.fixture
def loopback_peer() -> Iterator[Tuple[socket.socket, PeerProcess]]:
    """(local socket, helper process holding its peer end) on 127.0.0.1.

    The helper's connection 0 is the peer: ``peer.close_socket()`` (FIN),
    ``peer.reset()`` (RST), ``peer.close_unread(n)`` (RST),
    ``peer.shutdown_write()`` (half-close), ``peer.kill()`` (SIGKILL: FIN),
    ``peer.freeze()`` / ``peer.thaw()``, ``peer.send(b"...")``,
    ``peer.echo()``.  The local socket is blocking without a timeout."""
    local, peer = _loopback_peer()
    try:
        yield local, peer
    finally:
        local.close()
        peer.close()


@pytest.fixture
def frozen_peer(loopback_peer: Tuple[socket.socket, PeerProcess]
                ) -> Tuple[socket.socket, PeerProcess]:
    """(local socket, helper) with the helper SIGSTOPped: the process does
    nothing, its kernel still ACKs data and keepalive probes.  ``thaw()``
    it to talk to it again; teardown kills it either way."""
    local, peer = loopback_peer
    peer.freeze()
    return local, peer


@pytest.fixture
def make_peer() -> Iterator[Callable[..., PeerProcess]]:
    """Factory for helper processes, all killed at teardown.

    ``make_peer(connect=server_address)`` starts a helper that connects to
    your server (its connection 0); ``listen=``, ``sock=`` and ``netns=``
    are passed to :class:`~fastlive.testing.PeerProcess` as well."""
    made: List[PeerProcess] = []

    def make(*args: Any, **kwargs: Any) -> PeerProcess:
        peer = PeerProcess(*args, **kwargs)
        made.append(peer)
        return peer

    try:
        yield make
    finally:
        for peer in made:
            peer.close()


@pytest.fixture
def netns_pair() -> Iterator[NetnsPair]:
    """A :class:`~fastlive.testing.NetnsPair`, entered: ``.local`` (socket in
    namespace A) is connected to ``.peer`` (helper in namespace B).  Skips
    the test when network namespaces are unavailable (not root, no ``ip``,
    no netns/veth support), with the reason."""
    reason = netns_unavailable()
    if reason:
        pytest.skip(f"netns_pair: {reason}")
    with NetnsPair() as pair:
        yield pair


@pytest.fixture
def many_peers() -> Iterator[ManyPeers]:
    """A :class:`~fastlive.testing.ManyPeers` helper (the accepting ends of
    up to thousands of loopback connections), killed at teardown."""
    with ManyPeers() as holder:
        yield holder
