"""One epoll :class:`~fastlive.monitor.Monitor` per event loop, its fd on the
loop with ``add_reader``: the kernel wakes the loop when a watched peer is
gone (FIN, RST, a socket error, or an armed keepalive / TCP_USER_TIMEOUT
running out), and the loop resolves that connection's futures.  Nothing runs
per connection while peers are alive: no thread, no task, no timer.

Local close.  Closing a socket makes the kernel forget its epoll
registration without an event, so a close on this side is watched for
separately: the transport's protocol gets a wrapper around its
``connection_lost`` (an instance attribute, removed again when the watch
ends), which first collects what the kernel already reported for the socket
(a FIN that raced the close is still PEER_CLOSED) and otherwise resolves the
watch with :data:`LOCAL_CLOSE`.  Where no wrapper can be set (a bare socket or
fd, a protocol with ``__slots__``) the Monitor's own audit finds the close:
while registrations exist its timerfd fires every 0.5 s and the wait that
sees it checks the socket identity (SO_COOKIE) of the next 1024
registrations, so a closed (or reused) fd turns into :data:`LOCAL_CLOSE`
within 0.5 s x ceil(N / 1024).  Either way a watch never outlives its
socket and never fires for another socket that got the same fd number.

When the last watch of a loop ends, the reader is removed and the Monitor
closed (its epoll fd and eventfd released); the next watch makes a new one.
"""
from __future__ import annotations

import asyncio
import errno as _errno
import functools
import logging
import os
import threading
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..keepalive import detect_within
from ..monitor import Death, Monitor
from ..verdict import Flag, Method, Status, Verdict
from .target import Target, check_within, resolve

__all__ = ["LOCAL_CLOSE", "LoopWatcher", "closed_locally", "watcher_for",
           "watch", "peer_gone", "verdict_of_exc"]

log = logging.getLogger("fastlive.aio")

#: The verdict for a connection closed on this side while it was watched
#: (the transport closed or aborted, or the socket / fd closed).
LOCAL_CLOSE = Verdict(Status.CLOSED, Method.EPOLL, _errno.EBADF)

_EXC_STATUS = {
    _errno.ECONNRESET: Status.RESET, _errno.ECONNABORTED: Status.RESET,
    _errno.EPIPE: Status.RESET, _errno.ETIMEDOUT: Status.TIMED_OUT,
    _errno.EHOSTUNREACH: Status.UNREACHABLE, _errno.ENETUNREACH: Status.UNREACHABLE,
    _errno.EHOSTDOWN: Status.UNREACHABLE, _errno.ENETDOWN: Status.UNREACHABLE,
}


def closed_locally(verdict: Verdict) -> bool:
    """Whether a watch ended because this side closed the connection."""
    return verdict.status is Status.CLOSED and verdict.errno == _errno.EBADF


def verdict_of_exc(exc: Optional[BaseException]) -> Verdict:
    """The verdict for a transport's ``connection_lost(exc)`` when the kernel
    reported nothing: the socket error the transport's recv/send got, else a
    local close."""
    if isinstance(exc, OSError) and exc.errno:
        return Verdict(_EXC_STATUS.get(exc.errno, Status.ERROR), Method.SO_ERROR, exc.errno)
    return LOCAL_CLOSE


# Verdicts are immutable: one object per distinct (status, method, errno,
# tcp_state, flags), so a burst of deaths builds no dataclass per death.
_VERDICTS: Dict[Tuple[Any, ...], Verdict] = {}


def _verdict_of(d: Death) -> Verdict:
    key = (d.status, d.method, d.errno, d.tcp_state, d.flags)
    v = _VERDICTS.get(key)
    if v is None:
        got = getattr(d, "verdict", None)
        v = got if isinstance(got, Verdict) else Verdict(d.status, d.method, d.errno, None,
                                                        Flag(d.flags))
        if len(_VERDICTS) < 4096:
            _VERDICTS[key] = v
    return v


class _Watch:
    """One watched socket (one Monitor registration) and its waiters."""

    __slots__ = ("fd", "ident", "sock", "futures", "proto", "hooked", "done", "superseded",
                 "pending")

    def __init__(self, fd: int, ident: Tuple[int, int], sock: Any) -> None:
        self.fd = fd
        self.ident = ident
        self.sock = sock
        # each waiter's future and its done callback (removed before the
        # result is set, so a delivery schedules nothing but the wake-up)
        self.futures: List[Tuple[asyncio.Future[Verdict], Callable[..., None]]] = []
        self.proto: Any = None
        self.hooked = False
        self.done = False
        self.superseded = False   # the Monitor reports it (behind its back); never remove()
        self.pending: Optional[Verdict] = None   # reported CLOSED; connection_lost may say why


class _LostHook:
    """Installed as ``protocol.connection_lost``: tells the watcher first,
    then calls the protocol's own method."""

    __slots__ = ("orig", "prev", "had", "subs", "__weakref__")

    def __init__(self, orig: Callable[[Optional[BaseException]], Any], prev: Any, had: bool) -> None:
        self.orig = orig
        self.prev = prev
        self.had = had
        self.subs: List[Tuple[LoopWatcher, _Watch]] = []

    def __call__(self, exc: Optional[BaseException]) -> Any:
        for w, rec in list(self.subs):
            try:
                w._connection_lost(rec, exc)
            except Exception:       # never keep the protocol from its own connection_lost
                log.exception("fastlive.aio: connection_lost hook failed")
        return self.orig(exc)


def _hook(proto: Any, w: LoopWatcher, rec: _Watch) -> bool:
    d = getattr(proto, "__dict__", None)
    if d is None:
        return False
    cur = d.get("connection_lost")
    if isinstance(cur, _LostHook):
        cur.subs.append((w, rec))
        return True
    orig = getattr(proto, "connection_lost", None)
    if not callable(orig):
        return False
    hook = _LostHook(orig, cur, "connection_lost" in d)
    hook.subs.append((w, rec))
    try:
        proto.connection_lost = hook
    except (AttributeError, TypeError):
        return False
    return True


def _unhook(proto: Any, rec: _Watch) -> None:
    d = getattr(proto, "__dict__", None)
    cur = d.get("connection_lost") if d is not None else None
    if cur.__class__ is not _LostHook:
        return
    subs = cur.subs
    if len(subs) != 1 or subs[0][1] is not rec:     # (the common case: one watch)
        cur.subs = subs = [s for s in subs if s[1] is not rec]
        if subs:
            return
    try:
        if cur.had:
            proto.connection_lost = cur.prev
        else:
            del proto.connection_lost
    except (AttributeError, TypeError):
        pass


class LoopWatcher:
    """The per-loop watcher behind :func:`peer_gone` (see the module
    docstring).  Use it from the loop's thread only; get it with
    :func:`watcher_for`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.get_ident()
        self._mon: Optional[Monitor] = None
        self._reader_fd = -1
        self._by_ident: Dict[Tuple[int, int], _Watch] = {}
        self._by_fd: Dict[int, _Watch] = {}
        self._unhooked = 0      # watches without a close hook (the Monitor's audit covers them)

    # -- the Monitor on the loop -------------------------------------------
    def _monitor(self) -> Monitor:
        if self._mon is None:
            mon = Monitor()
            fd = mon.fileno()
            try:
                self._loop.add_reader(fd, self._on_ready)
            except BaseException:
                mon.close()
                raise
            self._mon, self._reader_fd = mon, fd
        return self._mon

    def _release_if_idle(self) -> None:
        if self._by_ident or self._mon is None:
            return
        mon, self._mon = self._mon, None
        try:
            self._loop.remove_reader(self._reader_fd)
        except (RuntimeError, ValueError, OSError):   # the loop is closed already
            pass
        self._reader_fd = -1
        mon.close()

    def __len__(self) -> int:
        """Sockets being watched on this loop."""
        return len(self._by_ident)

    @property
    def monitor_fd(self) -> int:
        """The Monitor's epoll fd on the loop (-1 while nothing is watched)."""
        return self._reader_fd

    # -- watching ------------------------------------------------------------
    def watch(self, target: Target, within: Optional[float]) -> asyncio.Future[Verdict]:
        """Register ``target`` (from :func:`~fastlive.aio.target.resolve`)
        once per socket - one Monitor registration however many waiters -
        and return a new future for this waiter."""
        fut: asyncio.Future[Verdict] = self._loop.create_future()
        if target.closing or target.fd < 0:
            fut.set_result(LOCAL_CLOSE)
            return fut
        fd = target.fd
        try:
            ident = (fd, os.fstat(fd).st_ino)
        except OSError as e:
            raise ValueError(f"conn: fd {fd} is not open ({e.strerror})") from None
        rec = self._by_ident.get(ident)
        if rec is None:
            mon = self._monitor()
            rec = _Watch(fd, ident, target.sock)
            try:
                mon.add(target.sock, within, key=rec)
            except OSError as e:
                self._release_if_idle()
                raise ValueError(f"conn: not a connected TCP socket ({e.strerror or e})") from None
            old = self._by_fd.get(fd)
            if old is not None:          # its fd was closed and reused: the Monitor reports it
                old.superseded = True
                self._by_ident.pop(old.ident, None)
                self._by_fd.pop(fd, None)
            self._by_ident[ident] = rec
            self._by_fd[fd] = rec
            if target.protocol is not None and _hook(target.protocol, self, rec):
                rec.proto, rec.hooked = target.protocol, True
            else:
                self._unhooked += 1
        elif within is not None:
            detect_within(fd, within)    # a second watcher with a bound: arm it too
        cb = functools.partial(self._future_done, rec)
        rec.futures.append((fut, cb))
        fut.add_done_callback(cb)
        return fut

    def _future_done(self, rec: _Watch, fut: asyncio.Future[Verdict]) -> None:
        if not fut.cancelled() or rec.done:
            return
        rec.futures = [fc for fc in rec.futures if fc[0] is not fut]
        if rec.futures:
            return
        if not rec.superseded and self._mon is not None:
            self._mon.remove(rec.fd)    # the fd still names rec's socket (else superseded)
        self._end(rec)

    def _end(self, rec: _Watch, release: bool = True) -> None:
        """Forget ``rec`` (its Monitor registration is gone already); with
        ``release`` close the Monitor if that was the last watch."""
        rec.done = True
        if self._by_ident.get(rec.ident) is rec:
            del self._by_ident[rec.ident]
        if self._by_fd.get(rec.fd) is rec:
            del self._by_fd[rec.fd]
        if rec.hooked:
            _unhook(rec.proto, rec)
            rec.proto = None
        else:
            self._unhooked -= 1
        rec.sock = None
        if release:
            self._release_if_idle()

    def _finish(self, rec: _Watch, verdict: Verdict, release: bool = True) -> None:
        futs, rec.futures = rec.futures, []
        self._end(rec, release)
        for f, cb in futs:
            if not f.done():
                f.remove_done_callback(cb)    # nothing left for it to do
                f.set_result(verdict)

    def _on_ready(self) -> None:
        mon = self._mon
        if mon is None:
            return
        try:
            deaths = mon.wait(0)
        except ValueError:          # closed under us
            return
        # Every death of this wait() is delivered here, in this one callback:
        # the waiters' wake-ups are all queued before the loop runs anything else.
        for d in deaths:
            rec = d.key
            if rec.__class__ is not _Watch or rec.done:
                continue
            v = LOCAL_CLOSE if d.behind_back else _verdict_of(d)
            if rec.hooked and v.status is Status.CLOSED and not v.errno:
                # The transport's recv took the socket's error (ECONNRESET...)
                # first, so the kernel now reports a plain hangup; the
                # transport's connection_lost(exc), already scheduled, says why.
                rec.pending = v
                self._loop.call_soon(self._settle, rec, 2)
                continue
            self._finish(rec, v, False)
        self._release_if_idle()

    def _settle(self, rec: _Watch, hops: int) -> None:
        if rec.done or rec.pending is None:
            return
        if hops > 1:
            self._loop.call_soon(self._settle, rec, hops - 1)
        else:
            self._finish(rec, rec.pending)

    def _connection_lost(self, rec: _Watch, exc: Optional[BaseException]) -> None:
        if threading.get_ident() != self._thread:
            # a transport of another loop (not detectable up front under uvloop)
            self._loop.call_soon_threadsafe(self._connection_lost, rec, exc)
            return
        if rec.done:
            return
        if rec.pending is not None:     # already reported (and unregistered) by the kernel
            self._finish(rec, verdict_of_exc(exc) if isinstance(exc, OSError) else rec.pending)
            return
        self._on_ready()            # what the kernel already reported comes first
        if rec.done or rec.pending is not None:
            if rec.pending is not None:
                self._finish(rec, verdict_of_exc(exc) if isinstance(exc, OSError) else rec.pending)
            return
        if self._mon is not None and not rec.superseded:
            self._mon.remove(rec.fd)    # the transport closes the socket after this call
        self._finish(rec, verdict_of_exc(exc))


_watchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopWatcher] = (
    weakref.WeakKeyDictionary())


def _running_loop(what: str) -> asyncio.AbstractEventLoop:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError(f"{what} needs a running event loop: call it from a coroutine or a "
                           "callback of the loop that runs the connection") from None


def watcher_for(loop: Optional[asyncio.AbstractEventLoop] = None) -> LoopWatcher:
    """The running loop's watcher (made on first use)."""
    if loop is None:
        loop = _running_loop("watcher_for()")
    w = _watchers.get(loop)
    if w is None:
        for old in [lp for lp in _watchers if lp.is_closed()]:
            _watchers.pop(old, None)
        w = _watchers[loop] = LoopWatcher(loop)
    return w


def watch(conn: Any, *, within: Optional[float] = None) -> asyncio.Future[Verdict]:
    """Watch ``conn`` from the running loop; the future's result is the
    :class:`~fastlive.verdict.Verdict` when the peer is gone (or
    :data:`LOCAL_CLOSE`).  Cancel the future to stop watching.  The
    callback form of :func:`peer_gone` (``watch(w).add_done_callback(...)``)."""
    loop = _running_loop("watch()")
    w = check_within(within)
    return watcher_for(loop).watch(resolve(conn, loop), w)


async def peer_gone(conn: Any, *, within: Optional[float] = None) -> Verdict:
    """Wait until the peer of ``conn`` is gone and return the verdict.

    ``conn``: an ``asyncio.StreamWriter``, a transport (asyncio's or
    uvloop's, SSL included: its socket is still TCP), a socket or an fd.
    FIN, RST and socket errors are reported as soon as the kernel sees them;
    ``within`` (seconds, 2..32767) also arms keepalive and TCP_USER_TIMEOUT
    so that a silent death (cable pulled, host gone) is reported within that
    bound (:func:`~fastlive.keepalive.detect_within`).  Cancelling the await
    stops watching (the keepalive settings stay).  A connection closed on
    this side returns :data:`LOCAL_CLOSE` (:func:`closed_locally`).

    ValueError / TypeError for a ``conn`` that is not a TCP connection (UDP,
    unix, pipe), a transport of another loop or a bad ``within``;
    RuntimeError outside a running loop.
    """
    return await watch(conn, within=within)
