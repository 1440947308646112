"""Concurrent sockets per user, across every web process: each open conversation
socket holds a lease in the audio store's Redis (a sorted set per user, the
socket's channel scored by when its lease ends). A socket past
SOCKETS_PER_USER_MAX is refused with 4409. Each process renews its sockets'
leases in one pipeline every LEASE_S / 3; the leases of a process that died
lapse by themselves within LEASE_S. With no Redis (embedded defaults) the
process's own count is the whole truth."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import weakref
from collections import defaultdict

import redis.asyncio as aredis
from django.conf import settings

from .cancel import raise_if_cancelled

log = logging.getLogger(__name__)

LEASE_S = 90.0
CLOSE_TOO_MANY_SOCKETS = 4409

# KEYS[1] the user's set; ARGV: now, lease end, channel, max. 1 if the lease was taken.
ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], math.ceil(ARGV[2] - ARGV[1]) + 1)
return 1
"""


def lease_key(user_id: int) -> str:
    return f"sockets:user:{user_id}"


class SocketLeases:
    def __init__(self, url: str) -> None:
        self.url = url
        # asyncio clients bind to their loop: one per loop (a web process has one)
        self.clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aredis.Redis]
        self.clients = weakref.WeakKeyDictionary()
        self.held: defaultdict[int, set[str]] = defaultdict(set)  # this process's
        self.renewer: asyncio.Task | None = None

    def _redis(self) -> aredis.Redis:
        loop = asyncio.get_running_loop()
        client = self.clients.get(loop)
        if client is None:
            client = self.clients[loop] = aredis.Redis.from_url(
                self.url, socket_timeout=2, socket_connect_timeout=2
            )
        return client

    async def acquire(self, *, user_id: int, channel: str) -> bool:
        limit = settings.SOCKETS_PER_USER_MAX
        if not limit:
            return True
        if not self.url:
            taken = len(self.held[user_id]) < limit
        else:
            now = time.time()
            try:
                taken = bool(
                    await self._redis().eval(
                        ACQUIRE, 1, lease_key(user_id), now, now + LEASE_S, channel, limit
                    )
                )
            except Exception as exc:  # Redis is away: admit (its own errors say so)
                log.warning("socket lease unavailable: %r", exc)
                taken = True
        if taken:
            self.held[user_id].add(channel)
            self._start()
        return taken

    async def release(self, *, user_id: int, channel: str) -> None:
        channels = self.held.get(user_id)
        if channels is None or channel not in channels:
            return
        channels.discard(channel)
        if not channels:
            del self.held[user_id]
        if self.url:
            try:
                await self._redis().zrem(lease_key(user_id), channel)
            except Exception as exc:  # the lease lapses by itself
                log.warning("socket lease not released: %r", exc)

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.renewer is not None and self.renewer.get_loop() is not loop:
            self.renewer.cancel()  # a loop of an earlier test, gone or going
            self.renewer = None
        if self.url and (self.renewer is None or self.renewer.done()):
            self.renewer = asyncio.get_running_loop().create_task(
                self.renew_forever(), name="socket-leases", context=contextvars.Context()
            )

    async def renew_forever(self) -> None:
        while self.held:
            raise_if_cancelled()
            await asyncio.sleep(LEASE_S / 3)
            try:
                await self.renew()
            except Exception as exc:  # the next round tries again, before the lease ends
                log.warning("socket leases not renewed: %r", exc)

    async def renew(self) -> None:
        end = time.time() + LEASE_S
        async with self._redis().pipeline(transaction=False) as pipe:
            for user_id, channels in list(self.held.items()):
                pipe.zadd(lease_key(user_id), dict.fromkeys(channels, end))
                pipe.expire(lease_key(user_id), int(LEASE_S) + 1)
            await pipe.execute()


_leases: SocketLeases | None = None


def socket_leases() -> SocketLeases:
    global _leases
    if _leases is None:
        _leases = SocketLeases(settings.AUDIO_STORE_URL)
    return _leases
