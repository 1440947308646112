"""The Redis channel layer, made to ride out a Redis restart or freeze.

channels_redis keeps group memberships in Redis only, and a failed read ends
the consumer that waited on it: a Redis restart closed every socket with 1011,
and had they lived, they would have heard nothing more (their groups were gone).
This layer:

- bounds every wait: blocking reads of `BRPOP_TIMEOUT_S` under a 2 s socket
  timeout (settings), so a frozen Redis fails a send or a read within 2 s;
- keeps a read that failed waiting instead of failing its socket: it retries
  every `RETRY_S` until Redis answers;
- remembers this process's memberships, and once Redis answers again after a
  failure, adds them all back (one pipeline per chunk) and tells each channel's
  `on_rejoin` callback, with which a socket resyncs from the database what it
  may have missed (session.py).

One per process, like any layer; every method runs on the process's loop."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable

from channels_redis.core import RedisChannelLayer
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from apps.observability import metrics

from .cancel import raise_if_cancelled

log = logging.getLogger(__name__)

BRPOP_TIMEOUT_S = 1
RETRY_S = 0.5
RESYNC_CONCURRENCY = 16
LAYER_ERRORS = (RedisError, OSError, TimeoutError)


def reconnect_once() -> Retry:
    """After a Redis restart every pooled connection is dead, and the first use of
    each fails: retry a broken connection once, at once. A timeout (a frozen
    Redis) is not retried: it fails within the socket timeout."""
    return Retry(ExponentialBackoff(cap=0.2, base=0.05), 1)


class ChannelLayer(RedisChannelLayer):
    brpop_timeout = BRPOP_TIMEOUT_S

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for host in self.hosts:  # pooled connections a restart broke: reconnect once
            host.setdefault("retry", reconnect_once())
            host.setdefault("retry_on_error", [RedisConnectionError])
        self.memberships: defaultdict[str, set[str]] = defaultdict(set)  # channel -> groups
        self.rejoin_callbacks: dict[str, Callable[[], Awaitable[None]]] = {}
        self.lost = False  # a read failed: rejoin once Redis answers
        self.rejoining: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None

    async def group_add(self, group: str, channel: str) -> None:
        self.memberships[channel].add(group)  # first: a failed add is redone on rejoin
        await super().group_add(group, channel)

    async def group_discard(self, group: str, channel: str) -> None:
        groups = self.memberships.get(channel)
        if groups is not None:
            groups.discard(group)
            if not groups:
                del self.memberships[channel]
                self.rejoin_callbacks.pop(channel, None)
        await super().group_discard(group, channel)

    def on_rejoin(self, channel: str, callback: Callable[[], Awaitable[None]]) -> None:
        self.rejoin_callbacks[channel] = callback

    def forget(self, channel: str) -> None:
        """The channel's consumer is gone (its groups expire in Redis by themselves)."""
        self.memberships.pop(channel, None)
        self.rejoin_callbacks.pop(channel, None)

    async def _brpop_with_clean(self, index, channel, timeout):
        """channels_redis reads a channel in a loop of BRPOP_TIMEOUT_S reads until a
        message comes. Under a socket timeout redis-py sends each command through
        `asyncio.wait_for`, which on Python 3.11 can lose a cancellation (cancel.py);
        the loop then read on forever, and the socket's consumer never ended (seen:
        test teardowns that hung for 300 s). A lost cancellation ends the read here,
        within one read. A message popped meanwhile is safe in channels_redis's
        backup queue."""
        raise_if_cancelled()
        member = await super()._brpop_with_clean(index, channel, timeout)
        raise_if_cancelled()
        return member

    async def receive(self, channel: str) -> dict:
        while True:
            try:
                if self.lost:
                    await self.rejoin()
                return await super().receive(channel)
            except LAYER_ERRORS as exc:
                if not self.lost:
                    log.warning("channel layer unreachable (%r): sockets wait for it", exc)
                    metrics.CHANNEL_LAYER_LOSSES.inc()
                self.lost = True
                await asyncio.sleep(RETRY_S)

    async def rejoin(self) -> None:
        """Once per loss, by whichever read comes first: every membership back,
        then each socket's resync. Raises while Redis is still away."""
        loop = asyncio.get_running_loop()
        if self.rejoining is None or self.rejoining[0] is not loop:  # a lock binds to its loop
            self.rejoining = (loop, asyncio.Lock())
        async with self.rejoining[1]:
            if not self.lost:
                return  # another read did it
            await self.connection(0).ping()  # raises while Redis is still away
            pairs = [(g, c) for c, groups in list(self.memberships.items()) for g in groups]
            for group, channel in pairs:
                await super().group_add(group, channel)
            self.lost = False
        log.warning("channel layer back: %d memberships restored", len(pairs))
        callbacks = list(self.rejoin_callbacks.items())
        asyncio.get_running_loop().create_task(self.resync(callbacks))

    async def resync(self, callbacks: list[tuple[str, Callable[[], Awaitable[None]]]]) -> None:
        """Each socket reads what it missed from the database, RESYNC_CONCURRENCY at
        a time (every socket of the process at once would be a query storm)."""
        limit = asyncio.Semaphore(RESYNC_CONCURRENCY)

        async def one(channel: str, callback) -> None:
            async with limit:
                try:
                    await callback()
                except Exception:
                    log.warning("resync of %s failed", channel, exc_info=True)

        await asyncio.gather(*(one(channel, callback) for channel, callback in callbacks))
