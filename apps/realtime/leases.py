"""Concurrent sockets per user and in the whole fleet, across every web process:
each open conversation socket holds a lease in the audio store's Redis (a sorted
set per user and one of every socket, the socket's channel scored by when its
lease ends). A socket past SOCKETS_PER_USER_MAX is refused with 4409; one past
the fleet's STT capacity (`fleet_max`, admission.py) with 1013. Each process
renews its sockets' leases in one pipeline every LEASE_S / 3; the leases of a
process that died lapse by themselves within LEASE_S. With no Redis (embedded
defaults) the process's own count is the whole truth."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import defaultdict
from typing import Literal

import redis.asyncio as aredis
from django.conf import settings

from .cancel import raise_if_cancelled
from .per_loop import redis_per_loop

log = logging.getLogger(__name__)

LEASE_S = 90.0
CLOSE_TOO_MANY_SOCKETS = 4409

# KEYS[1] the user's set, KEYS[2] every socket's; ARGV: now, lease end, channel, the
# user's max, the fleet's max (0: none). 1: the lease was taken; 0: the user has their
# most; 2: the fleet is full. Checked and taken in one step: a burst cannot overshoot.
ACQUIRE = """
local ttl = math.ceil(ARGV[2] - ARGV[1]) + 1
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
local user_max, fleet_max = tonumber(ARGV[4]), tonumber(ARGV[5])
if user_max > 0 and redis.call('ZCARD', KEYS[1]) >= user_max then return 0 end
if fleet_max > 0 and redis.call('ZCARD', KEYS[2]) >= fleet_max then return 2 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[2], ttl)
return 1
"""
ALL_KEY = "sockets:all"
Outcome = Literal["taken", "user_full", "fleet_full"]
OUTCOMES: dict[int, Outcome] = {1: "taken", 0: "user_full", 2: "fleet_full"}


def lease_key(user_id: int) -> str:
    return f"sockets:user:{user_id}"


class SocketLeases:
    def __init__(self, url: str) -> None:
        self.url = url
        self.clients = redis_per_loop(url)
        self.held: defaultdict[int, set[str]] = defaultdict(set)  # this process's
        self.renewer: asyncio.Task | None = None

    def _redis(self) -> aredis.Redis:
        return self.clients.get()

    async def acquire(self, *, user_id: int, channel: str, fleet_max: int = 0) -> Outcome:
        """Take a lease for the socket, unless the user or the fleet (`fleet_max`
        sockets in all; 0: no limit) has its most."""
        limit = settings.SOCKETS_PER_USER_MAX
        if not limit and not fleet_max:
            return "taken"
        if not self.url:
            outcome: Outcome = "taken"
            if limit and len(self.held[user_id]) >= limit:
                outcome = "user_full"
            elif fleet_max and sum(map(len, self.held.values())) >= fleet_max:
                outcome = "fleet_full"
        else:
            now = time.time()
            try:
                code = await self._redis().eval(
                    ACQUIRE, 2, lease_key(user_id), ALL_KEY,
                    now, now + LEASE_S, channel, limit, fleet_max,
                )  # fmt: skip
                outcome = OUTCOMES[int(code)]
            except Exception as exc:  # Redis is away: admit (its own errors say so)
                log.warning("socket lease unavailable: %r", exc)
                outcome = "taken"
        if outcome == "taken":
            self.held[user_id].add(channel)
            self._start()
        return outcome

    async def release(self, *, user_id: int, channel: str) -> None:
        channels = self.held.get(user_id)
        if channels is None or channel not in channels:
            return
        channels.discard(channel)
        if not channels:
            del self.held[user_id]
        if self.url:
            try:
                async with self._redis().pipeline(transaction=False) as pipe:
                    pipe.zrem(lease_key(user_id), channel)
                    pipe.zrem(ALL_KEY, channel)
                    await pipe.execute()
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
            every: dict[str, float] = {}
            for user_id, channels in list(self.held.items()):
                pipe.zadd(lease_key(user_id), dict.fromkeys(channels, end))
                pipe.expire(lease_key(user_id), int(LEASE_S) + 1)
                every.update(dict.fromkeys(channels, end))
            if every:
                pipe.zadd(ALL_KEY, every)
                pipe.expire(ALL_KEY, int(LEASE_S) + 1)
            await pipe.execute()


_leases: SocketLeases | None = None


def socket_leases() -> SocketLeases:
    global _leases
    if _leases is None:
        _leases = SocketLeases(settings.AUDIO_STORE_URL)
    return _leases
