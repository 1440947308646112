"""Graceful drain of a web process (deploy/README.md, docs/protocol.md section 1).

A pod that is about to stop runs its preStop hook, which creates the file that
READINESS_DRAIN_FILE names. From then on /readyz answers 503 (health.py), so no
new traffic is routed here, and this process closes its conversation sockets
with **1012** (service restart), spread evenly over DRAIN_CLOSE_S: clients
reconnect to other pods a few at a time, not in one thundering herd, and resume
with `resume_from`. Each close runs the consumer's usual disconnect, which keeps
what was said: an open utterance is finished from its audio. A socket that
connects while the process drains is closed with 1012 at once.

One Drain per process (`drain` below), started on the first socket's event
loop; it looks for the file once a second (one stat). If the file goes away,
the drain stops and the process serves again."""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from collections.abc import Awaitable, Callable
from typing import Protocol

from django.conf import settings

log = logging.getLogger(__name__)

CLOSE_SERVICE_RESTART = 1012
# Codes IANA registers for servers that autobahn's sendClose refuses, with their reasons.
IANA_CLOSE_REASONS = {1012: b"server restarting", 1013: b"try again later"}
POLL_S = 1.0


class Closable(Protocol):
    async def close(self, code: int | None = None, reason: str | None = None) -> None: ...


class Drain:
    def __init__(self, path: str, spread_s: float, poll_s: float = POLL_S) -> None:
        self.path = path
        self.spread_s = spread_s
        self.poll_s = poll_s
        self.draining = False
        self.sockets: weakref.WeakSet[Closable] = weakref.WeakSet()
        self.watcher: asyncio.Task | None = None

    def join(self, socket: Closable) -> bool:
        """Count `socket` in; False while draining (close it with 1012)."""
        if self.path and self.watcher is None:
            self.watcher = asyncio.get_running_loop().create_task(self.watch())
        if self.draining:
            return False
        self.sockets.add(socket)
        return True

    def leave(self, socket: Closable) -> None:
        self.sockets.discard(socket)

    def requested(self) -> bool:
        return os.path.exists(self.path)

    async def watch(self) -> None:
        while True:
            while not self.requested():
                await asyncio.sleep(self.poll_s)
            self.draining = True
            sockets = list(self.sockets)
            log.warning(
                "draining: closing %d sockets with %d over %.0f s",
                len(sockets), CLOSE_SERVICE_RESTART, self.spread_s,
            )  # fmt: skip
            await close_spread(sockets, self.spread_s, _close, still=self.requested)
            while self.requested():
                await asyncio.sleep(self.poll_s)
            self.draining = False
            log.warning("drain file removed: serving again")

    async def shutdown(self, spread_s: float, wait_s: float) -> int:
        """The process is stopping (SIGTERM or Ctrl-C; with Kubernetes the preStop
        drain has usually closed everything by then): close what is still open
        with 1012 over `spread_s`, then wait up to `wait_s` for those sockets'
        disconnects, which keep what was said, to finish. Returns how many were closed."""
        self.draining = True
        sockets = list(self.sockets)
        if sockets:
            log.warning(
                "shutting down: closing %d sockets with %d over %.1f s",
                len(sockets), CLOSE_SERVICE_RESTART, spread_s,
            )  # fmt: skip
        closed = await close_spread(sockets, spread_s, _close)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while self.sockets and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.sockets:
            log.warning("shutting down: %d sockets did not finish closing", len(self.sockets))
        return closed


async def close_spread(
    sockets: list[Closable],
    spread_s: float,
    close: Callable[[Closable], Awaitable[None]],
    still: Callable[[], bool] = lambda: True,
) -> int:
    """Close `sockets` one by one, evenly spaced over `spread_s` (the first at
    once), while `still()` holds. Returns how many were closed."""
    gap = spread_s / len(sockets) if sockets else 0.0
    for index, socket in enumerate(sockets):
        if index:
            await asyncio.sleep(gap)
        if not still():
            return index
        try:
            await close(socket)
        except Exception:  # one socket's failure must not stop the drain
            log.exception("closing a socket while draining failed")
    return len(sockets)


async def _close(socket: Closable) -> None:
    await socket.close(code=CLOSE_SERVICE_RESTART, reason="server restarting")


def daphne_close_codes_allow_service_restart() -> None:
    """Let Daphne send 1012 and 1013 (admission.py). It closes through autobahn's
    `sendClose`, which takes 1000 and 3000-4999 only (an application may not send
    the codes RFC 6455 keeps for the protocol) and raised at 1012, although IANA
    registers 1012, Service Restart, and 1013, Try Again Later, for exactly this,
    and browsers accept them. Daphne 4.2's `serverClose` also drops the reason.
    For these two this sends the close frame through autobahn's own lower-level
    `sendCloseFrame`; every other code takes Daphne's path unchanged. Called once
    at start-up (config/asgi.py)."""
    from daphne.ws_protocol import WebSocketProtocol

    original = WebSocketProtocol.serverClose
    if getattr(original, "allows_service_restart", False):
        return

    def server_close(self, code=None):
        reason = IANA_CLOSE_REASONS.get(code)
        if reason is None:
            return original(self, code)
        self.sendCloseFrame(code=code, reasonUtf8=reason, isReply=False)

    server_close.allows_service_restart = True  # type: ignore[attr-defined]
    WebSocketProtocol.serverClose = server_close


def daphne_shutdown_closes_sockets() -> None:
    """On SIGTERM or SIGINT Daphne stops the reactor, and its "before shutdown" step
    cancels every application: a consumer cancelled so never runs its disconnect, no
    close frame goes out and the open utterance is lost. This runs the drain's
    `shutdown` first (SHUTDOWN_CLOSE_S to close, SHUTDOWN_WAIT_S for the disconnects),
    then Daphne's own step for whatever is left. Called once at start-up (config/asgi.py)."""
    from daphne.server import Server
    from twisted.internet import defer

    original = Server.kill_all_applications
    if getattr(original, "closes_sockets_first", False):
        return

    def kill_all_applications(self):
        closing = asyncio.ensure_future(
            drain.shutdown(settings.SHUTDOWN_CLOSE_S, settings.SHUTDOWN_WAIT_S)
        )
        deferred = defer.Deferred.fromFuture(closing)
        deferred.addErrback(lambda failure: log.error("shutdown drain failed: %s", failure))
        deferred.addBoth(lambda _: original(self))
        return deferred

    kill_all_applications.closes_sockets_first = True  # type: ignore[attr-defined]
    Server.kill_all_applications = kill_all_applications


drain = Drain(settings.READINESS_DRAIN_FILE, settings.DRAIN_CLOSE_S)
