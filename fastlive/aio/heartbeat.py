"""The heartbeat engine on an event loop: its fd on the loop with
``add_reader``, its deaths delivered as futures (and callbacks).

The engine (:class:`~fastlive.heartbeat.HeartbeatEngine`) sends the PINGs and
answers the peers' PINGs itself; the loop only collects deaths when the
engine's fd says some are queued.  With the native-thread engine a blocked
loop (a slow handler, a long GC pause) therefore makes no healthy peer look
dead, on either end.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable, Dict, Optional

from ..heartbeat import HeartbeatDeath, HeartbeatEngine
from .target import resolve
from .watcher import _running_loop

__all__ = ["LoopHeartbeat", "OnDead"]

#: ``on_dead(conn, death)``: called on the loop when the engine gives up on ``conn``.
OnDead = Callable[[Any, HeartbeatDeath], Any]


class _Handle:
    """What the engine is given for one connection: the fd, and the way
    back to the registration when its death comes out of the engine."""

    __slots__ = ("fd", "conn", "future", "on_dead", "done_cb")

    def __init__(self, fd: int, conn: Any, future: asyncio.Future[HeartbeatDeath],
                 on_dead: Optional[OnDead]) -> None:
        self.fd = fd
        self.conn = conn
        self.future = future
        self.on_dead = on_dead
        self.done_cb: Optional[Callable[[Any], None]] = None

    def fileno(self) -> int:
        return self.fd


class LoopHeartbeat:
    """Heartbeats for many connections of one event loop.

    ``LoopHeartbeat()`` makes (and owns) an engine; pass ``engine=`` to use
    one of your own (it is then not closed by :meth:`close`).  Create it
    inside the running loop (or pass ``loop``).

    A blocked loop is no death: the engine's thread sends and answers the
    PINGs.  To have a *wedged* loop look dead to the peers, pass
    ``progress`` (seconds): the loop tells the engine it runs every
    ``progress / 4`` s, and the engine stops vouching for this end (no PINGs,
    no PONGs) once the loop has been stuck for ``progress`` seconds.  :meth:`add` returns a future
    whose result is the :class:`~fastlive.heartbeat.HeartbeatDeath`; cancel
    it, or call :meth:`remove`, to stop.  :meth:`close` removes the reader
    and cancels the futures still pending: no callback runs after it.
    """

    def __init__(self, engine: Optional[HeartbeatEngine] = None, *, tick: float = 0.01,
                 progress: Optional[float] = None,
                 loop: Optional[asyncio.AbstractEventLoop] = None) -> None:
        self._loop = loop if loop is not None else _running_loop("LoopHeartbeat()")
        if progress is not None:
            if isinstance(progress, bool) or not isinstance(progress, (int, float)):
                raise TypeError(f"progress must be seconds or None, got {type(progress).__name__}")
            if not 0.01 <= progress <= 3600:
                raise ValueError(f"progress must be 0.01..3600 seconds, got {progress!r}")
        self._progress = progress
        self._own = engine is None
        self.engine = engine if engine is not None else HeartbeatEngine(tick=tick)
        self._fd = self.engine.fileno()
        self._by_fd: Dict[int, _Handle] = {}
        self._closed = False
        self._beat: Optional[asyncio.TimerHandle] = None
        self._loop.add_reader(self._fd, self._on_ready)
        if progress is not None:
            self._tell_progress()

    def _tell_progress(self) -> None:
        """The loop ran: tell the engine, and again in a quarter of ``progress``."""
        self._beat = None
        if self._closed or self._progress is None:
            return
        self.engine.progress()
        self._beat = self._loop.call_later(self._progress / 4, self._tell_progress)

    def add(self, conn: Any, interval: float = 1.0, misses: int = 3, *, shared: bool = False,
            rtt: bool = False,
            on_dead: Optional[OnDead] = None) -> asyncio.Future[HeartbeatDeath]:
        """Heartbeat ``conn`` (StreamWriter, transport, socket or fd) every
        ``interval`` s of silence; dead after ``interval * misses`` s without
        a byte (or at once on FIN/RST).  ``shared=True`` when the application
        reads the connection too (see :mod:`fastlive.heartbeat`); ``rtt=True``
        samples round trips into ``engine.rtt``."""
        if self._closed:
            raise ValueError("the LoopHeartbeat is closed")
        target = resolve(conn, self._loop)
        if target.closing or target.fd < 0:
            raise ValueError("conn: the connection is closed")
        if on_dead is not None and not callable(on_dead):
            raise TypeError("on_dead must be callable or None")
        fut: asyncio.Future[HeartbeatDeath] = self._loop.create_future()
        h = _Handle(target.fd, conn, fut, on_dead)
        self.engine.add(h, interval, misses, shared=shared, rtt=rtt, progress=self._progress)
        old = self._by_fd.get(target.fd)
        if old is not None and not old.future.done():
            old.future.cancel()
        self._by_fd[target.fd] = h
        h.done_cb = lambda f: self._future_done(h)
        fut.add_done_callback(h.done_cb)
        return fut

    def _future_done(self, h: _Handle) -> None:
        if self._by_fd.get(h.fd) is h:
            del self._by_fd[h.fd]
            if h.future.cancelled() and not self._closed:
                try:
                    self.engine.remove(h)
                except (ValueError, OSError):
                    pass

    def remove(self, conn: Any) -> bool:
        """Stop heartbeating ``conn``; its future is cancelled.  False when
        it was not watched."""
        fd = resolve(conn, self._loop).fd
        h = self._by_fd.pop(fd, None)
        if h is None:
            return False
        try:
            self.engine.remove(h)
        except (ValueError, OSError):
            pass
        h.future.cancel()
        return True

    def __len__(self) -> int:
        return len(self._by_fd)

    def _on_ready(self) -> None:
        if self._closed:
            return
        for d in self.engine.poll():
            h = d.sock
            if not isinstance(h, _Handle):
                continue
            if self._by_fd.get(h.fd) is h:
                del self._by_fd[h.fd]
            if h.future.done():
                continue
            if h.done_cb is not None:       # already forgotten: no callback to schedule
                h.future.remove_done_callback(h.done_cb)
            h.future.set_result(d)
            if h.on_dead is not None:
                try:
                    h.on_dead(h.conn, d)
                except Exception as exc:
                    self._loop.call_exception_handler(
                        {"message": "fastlive.aio: on_dead callback failed", "exception": exc})

    def close(self) -> None:
        """Remove the engine's fd from the loop, cancel what is pending and
        close the engine if this object made it."""
        if self._closed:
            return
        self._closed = True
        if self._beat is not None:
            self._beat.cancel()
            self._beat = None
        try:
            self._loop.remove_reader(self._fd)
        except (RuntimeError, ValueError, OSError):
            pass
        pending, self._by_fd = list(self._by_fd.values()), {}
        for h in pending:
            if not self._own:
                try:
                    self.engine.remove(h)
                except (ValueError, OSError):
                    pass
            h.future.cancel()
        if self._own:
            self.engine.close()

    def __enter__(self) -> LoopHeartbeat:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
