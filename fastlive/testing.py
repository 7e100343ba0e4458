"""pytest plugin: fault fixtures for testing dead-peer handling.

Loaded automatically (``pytest11`` entry point) when fastlive is installed.
"""
from __future__ import annotations

import socket
from typing import Iterator, Tuple

import pytest


@pytest.fixture
def loopback_pair() -> Iterator[Tuple[socket.socket, socket.socket]]:
    """A connected (local, peer) pair of TCP sockets on 127.0.0.1, both in
    this process; closed after the test."""
    with socket.create_server(("127.0.0.1", 0)) as lst:
        local = socket.create_connection(lst.getsockname(), timeout=5)
        peer, _ = lst.accept()
    try:
        yield local, peer
    finally:
        local.close()
        peer.close()
