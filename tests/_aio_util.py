"""What the aio tests share: a fresh loop of each kind (asyncio's default
and uvloop) and one way to run a coroutine on it and tear it down."""
from __future__ import annotations

import asyncio
from typing import Any, Callable, Coroutine, List, Optional

import pytest


def loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """``asyncio.new_event_loop`` or uvloop's (skips when uvloop is missing)."""
    if kind == "uvloop":
        uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed (pip install uvloop)")
        return uvloop.new_event_loop  # type: ignore[no-any-return]
    return asyncio.new_event_loop


def run_on(kind: str, coro: Coroutine[Any, Any, Any], timeout: float,
           errors: Optional[List[Any]] = None) -> Any:
    """Run ``coro`` on a fresh loop of ``kind`` for at most ``timeout`` s,
    cancel what it left pending, close the loop.  With ``errors``, what the
    loop's exception handler saw goes there and must be nothing (no "Task
    was destroyed but it is pending", no failed callback)."""
    loop = loop_factory(kind)()
    if errors is not None:
        loop.set_exception_handler(lambda _l, ctx: errors.append(ctx))
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, timeout))
    finally:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()
        if errors is not None:
            assert not errors, errors
