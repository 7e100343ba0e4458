"""Close connections whose peer is gone: :func:`guard` for one connection,
:func:`guard_streams` / :func:`start_server` for ``asyncio.start_server``,
:func:`guard_protocol` for ``loop.create_server`` (any protocol factory,
aiohttp's ``runner.server`` included)."""
from __future__ import annotations

import asyncio
import inspect
from typing import Any, Awaitable, Callable, Optional, Set, Union

from ..verdict import Status, Verdict
from .target import check_within, resolve
from .watcher import _running_loop, closed_locally, watcher_for

__all__ = ["OnGone", "guard", "guard_streams", "guard_protocol", "start_server"]

#: ``on_gone(conn, verdict)``: called once when the peer of ``conn`` is gone,
#: before fastlive closes it; may return an awaitable (run as a task that
#: fastlive keeps a reference to).
OnGone = Callable[[Any, Verdict], Optional[Awaitable[Any]]]

_hook_tasks: Set[asyncio.Task[Any]] = set()


def _call_hook(loop: asyncio.AbstractEventLoop, on_gone: OnGone, conn: Any, v: Verdict) -> None:
    try:
        res = on_gone(conn, v)
        if inspect.isawaitable(res):
            task = asyncio.ensure_future(res)
            _hook_tasks.add(task)
            task.add_done_callback(_hook_tasks.discard)
    except Exception as exc:
        loop.call_exception_handler({"message": "fastlive.aio: on_gone hook failed",
                                     "exception": exc})


def guard(conn: Any, *, within: Optional[float] = None,
          on_gone: Optional[OnGone] = None) -> asyncio.Future[Verdict]:
    """Watch ``conn`` (a StreamWriter or a transport) and close it when its
    peer is gone: ``on_gone(conn, verdict)`` first, then the transport is
    closed - ``close()`` after a FIN (what is buffered still goes out),
    ``abort()`` after a reset, a timeout or an error (nothing can be
    delivered any more, and a close would wait on the dead peer).  A
    connection closed on this side just ends the watch (no hook).  Returns
    the watch's future (its result is the verdict; cancel it to stop
    guarding).  Needs a running loop; ValueError / TypeError as
    :func:`~fastlive.aio.peer_gone`.
    """
    loop = _running_loop("guard()")
    w = check_within(within)
    target = resolve(conn, loop)
    if target.transport is None:
        raise TypeError("conn: guard() closes the connection, so it needs a StreamWriter or a "
                        f"transport, got {type(conn).__name__}; watch a socket with peer_gone()")
    fut = watcher_for(loop).watch(target, w)
    transport = target.transport

    def gone(f: asyncio.Future[Verdict]) -> None:
        if f.cancelled():
            return
        v = f.result()
        if closed_locally(v):
            return
        if on_gone is not None:
            _call_hook(loop, on_gone, conn, v)
        if transport.is_closing() and v.status is not Status.PEER_CLOSED:
            transport.abort()           # a close() may still be waiting to flush: stop it
        elif not transport.is_closing():
            if v.status is Status.PEER_CLOSED:
                transport.close()
            else:
                transport.abort()

    fut.add_done_callback(gone)
    return fut


StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Union[Awaitable[Any], None]]


def guard_streams(client_connected_cb: StreamHandler, *, within: Optional[float] = None,
                  on_gone: Optional[OnGone] = None,
                  cancel_handler: bool = False) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                                            Awaitable[None]]:
    """Wrap an ``asyncio.start_server`` callback: every accepted connection
    is guarded (:func:`guard` with ``within``) for its whole life, also after
    the callback returns.  ``cancel_handler=True`` also cancels the
    callback's task when the peer is gone (a handler waiting on something
    other than the socket learns it at once)."""
    w = check_within(within)
    if not callable(client_connected_cb):
        raise TypeError("client_connected_cb must be callable")

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        ours = False

        def hook(conn: Any, v: Verdict) -> Optional[Awaitable[Any]]:
            nonlocal ours
            res = on_gone(conn, v) if on_gone is not None else None
            if cancel_handler and task is not None and not task.done():
                ours = True
                task.cancel()
            return res

        guard(writer, within=w, on_gone=hook)
        try:
            res = client_connected_cb(reader, writer)
            if inspect.isawaitable(res):
                await res
        except asyncio.CancelledError:
            # our own cancel ends the handler quietly (asyncio's server would
            # log a cancelled handler task as an error); anyone else's propagates
            uncancel = getattr(task, "uncancel", None)
            if not ours or (uncancel is not None and uncancel() > 0):
                raise

    return handler


async def start_server(client_connected_cb: StreamHandler, host: Any = None, port: Any = None, *,
                       within: Optional[float] = None, on_gone: Optional[OnGone] = None,
                       cancel_handler: bool = False, **kwargs: Any) -> asyncio.Server:
    """``asyncio.start_server`` with every connection guarded
    (:func:`guard_streams`); ``kwargs`` go to ``asyncio.start_server``."""
    cb = guard_streams(client_connected_cb, within=within, on_gone=on_gone,
                       cancel_handler=cancel_handler)
    return await asyncio.start_server(cb, host, port, **kwargs)


class _GuardedProtocol(asyncio.Protocol):
    """Delegates everything to the application's protocol; guards the
    transport once the application has seen ``connection_made``."""

    def __init__(self, inner: Any, within: Optional[float], on_gone: Optional[OnGone]) -> None:
        self._fl_inner = inner
        self._fl_within = within
        self._fl_on_gone = on_gone

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._fl_inner.connection_made(transport)
        guard(transport, within=self._fl_within, on_gone=self._fl_on_gone)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._fl_inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._fl_inner.data_received(data)

    def eof_received(self) -> Optional[bool]:
        return self._fl_inner.eof_received()  # type: ignore[no-any-return]

    def pause_writing(self) -> None:
        self._fl_inner.pause_writing()

    def resume_writing(self) -> None:
        self._fl_inner.resume_writing()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_fl_"):       # not set up (yet): no recursion
            raise AttributeError(name)
        return getattr(self._fl_inner, name)


class _GuardedBufferedProtocol(_GuardedProtocol, asyncio.BufferedProtocol):
    def get_buffer(self, sizehint: int) -> Any:
        return self._fl_inner.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self._fl_inner.buffer_updated(nbytes)


def guard_protocol(protocol_factory: Callable[[], asyncio.BaseProtocol], *,
                   within: Optional[float] = None,
                   on_gone: Optional[OnGone] = None) -> Callable[[], asyncio.BaseProtocol]:
    """Wrap a ``loop.create_server`` protocol factory: each protocol it makes
    is wrapped in a delegating protocol that guards its transport
    (:func:`guard`) right after the application's ``connection_made``.  The
    transport's ``get_protocol()`` returns the wrapper; every other
    attribute is the application's protocol's."""
    w = check_within(within)
    if not callable(protocol_factory):
        raise TypeError("protocol_factory must be callable")

    def factory() -> asyncio.BaseProtocol:
        inner = protocol_factory()
        cls = (_GuardedBufferedProtocol if isinstance(inner, asyncio.BufferedProtocol)
               else _GuardedProtocol)
        return cls(inner, w, on_gone)

    return factory
