"""Blocking checks release the GIL: other Python threads run meanwhile."""
import threading
import time

import fastlive


def test_blocking_poll_lets_other_threads_run(loopback_pair):
    cli, srv = loopback_pair
    done = threading.Event()
    result = []

    def waiter():
        result.append(fastlive.check_poll(cli, timeout=0.5))
        done.set()

    t = threading.Thread(target=waiter)
    t.start()
    t0 = last = time.monotonic()
    longest = 0.0
    while not done.is_set() and last - t0 < 5:
        now = time.monotonic()
        longest = max(longest, now - last)
        last = now
    t.join(5)
    assert result and result[0].alive
    assert last - t0 >= 0.45            # the waiter really waited
    # Had the GIL been held through the 0.5 s wait, this loop would have
    # stalled for all of it; it is only ever paused for a switch interval.
    assert longest < 0.25, longest
