"""Blocking checks release the GIL: other Python threads run meanwhile."""
import socket
import threading
import time

import fastlive


def test_blocking_poll_lets_other_threads_run():
    with socket.create_server(("127.0.0.1", 0)) as lst:
        cli = socket.create_connection(lst.getsockname(), timeout=5)
        srv, _ = lst.accept()
    with cli, srv:
        done = threading.Event()
        result = []

        def waiter():
            result.append(fastlive.check_poll(cli, timeout=0.5))
            done.set()

        t = threading.Thread(target=waiter)
        t.start()
        spins = 0
        t0 = time.monotonic()
        while not done.is_set() and time.monotonic() - t0 < 5:
            spins += 1
        t.join(5)
        assert result and result[0].alive
        # Had the GIL been held for the 0.5 s wait, this loop would have
        # been stopped; it runs hundreds of thousands of times instead.
        assert spins > 10000
