"""Daily quotas, reserved before the work and settled after.

Each user has a daily allowance of speaking time (milliseconds) and reply
tokens (`User.audio_seconds_quota`, `User.tokens_quota`; 0 is unlimited). The
live count of what a user has taken today is one counter per (user, UTC day,
kind) in the audio store's Redis, shared by every web process; with no Redis
(embedded defaults) it lives in the process. `reserve` takes from it
atomically (one Lua script: it checks the limit and adds in the same step), so
two sockets of one user cannot both spend the last minute; `adjust` gives back
what a reservation did not use, or adds what it overran.

What was used is persisted per day in `DailyUsage` (the final's and the
reply's own transactions, apps/conversations/services.py). A counter Redis has
lost (a restart, a new day) is seeded from that row the first time it is asked
for: reservations in flight at that moment are forgotten, at most one audio
chunk per socket and one reply's estimate per running reply.

Callers treat an unreachable ledger as "allowed" and log it: an outage of ours
does not cut a user off; the work is still persisted and counted when the
ledger is back."""

from __future__ import annotations

import datetime as dt
import threading
from typing import Literal

import redis
import redis.asyncio as aredis
from channels.db import database_sync_to_async
from django.conf import settings

from apps.realtime.per_loop import redis_per_loop

from .models import DailyUsage

Kind = Literal["audio_ms", "tokens"]
AUDIO_USED = "You have used today's speaking time. It renews at midnight UTC."
TOKENS_USED = "You have used today's reply tokens. They renew at midnight UTC."
KEY_TTL_S = 2 * 86400  # a day's counter outlives its day, for sockets that cross midnight

# KEYS[1] the counter; ARGV: amount, limit (0: none), seed ('' if not read), ttl.
# Returns what was granted (0 to amount; all of it when unlimited), or -1 when
# the counter is missing and no seed was given (the caller reads the database).
RESERVE = """
local spent = redis.call('GET', KEYS[1])
if not spent then
  if ARGV[3] == '' then return -1 end
  spent = ARGV[3]
  redis.call('SET', KEYS[1], spent, 'EX', ARGV[4])
end
spent = tonumber(spent)
local amount, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
if limit > 0 then amount = math.max(0, math.min(amount, limit - spent)) end
if amount > 0 then
  redis.call('INCRBY', KEYS[1], amount)
  redis.call('EXPIRE', KEYS[1], ARGV[4])
end
return amount
"""
# KEYS[1] the counter; ARGV[1] what to add (negative: give back). A missing
# counter is left missing: its seed from the database has the settled figure.
ADJUST = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local now = redis.call('INCRBY', KEYS[1], ARGV[1])
if now < 0 then redis.call('SET', KEYS[1], 0, 'KEEPTTL') end
return 1
"""


def today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


def counter_key(user_id: int, day: dt.date, kind: Kind) -> str:
    """Named by the database too: its users' ids are what the counters count."""
    return f"{namespace()}:{user_id}:{day.isoformat()}:{kind}"


def namespace() -> str:
    return f"quota:{settings.DATABASES['default']['NAME']}"


def seed_read(*, user_id: int, day: dt.date, kind: Kind) -> int:
    """What the user used that day, as persisted (a database read, on a thread)."""
    row = DailyUsage.objects.filter(user_id=user_id, day=day).first()
    if row is None:
        return 0
    return round(row.audio_seconds * 1000) if kind == "audio_ms" else row.tokens


class MemoryLedger:
    """One process's counters (embedded defaults): the same contract as Redis's."""

    def __init__(self) -> None:
        self.counters: dict[str, int] = {}
        self.lock = threading.Lock()

    async def reserve(self, key: str, amount: int, limit: int, seed: int | None) -> int:
        with self.lock:
            spent = self.counters.get(key)
            if spent is None:
                if seed is None:
                    return -1
                spent = self.counters[key] = seed
            if limit > 0:
                amount = max(0, min(amount, limit - spent))
            self.counters[key] = spent + amount
            return amount

    async def adjust(self, key: str, delta: int) -> None:
        with self.lock:
            if key in self.counters:
                self.counters[key] = max(0, self.counters[key] + delta)

    async def spent(self, key: str) -> int | None:
        return self.counters.get(key)

    def forget_sync(self, keys: list[str]) -> None:
        with self.lock:
            for key in keys:
                self.counters.pop(key, None)

    def clear_sync(self) -> None:
        with self.lock:
            self.counters.clear()


class RedisLedger:
    def __init__(self, url: str) -> None:
        self.url = url
        self.clients = redis_per_loop(url)

    def _redis(self) -> aredis.Redis:
        return self.clients.get()

    async def reserve(self, key: str, amount: int, limit: int, seed: int | None) -> int:
        seed_arg = "" if seed is None else str(seed)
        return int(await self._redis().eval(RESERVE, 1, key, amount, limit, seed_arg, KEY_TTL_S))

    async def adjust(self, key: str, delta: int) -> None:
        await self._redis().eval(ADJUST, 1, key, delta)

    async def spent(self, key: str) -> int | None:
        value = await self._redis().get(key)
        return None if value is None else int(value)

    def _sync_client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2)

    def forget_sync(self, keys: list[str]) -> None:
        with self._sync_client() as client:
            client.delete(*keys)

    def clear_sync(self) -> None:
        """Every counter of this database (a test run's fresh database reuses user ids)."""
        with self._sync_client() as client:
            keys = list(client.scan_iter(f"{namespace()}:*", count=1000))
            if keys:
                client.delete(*keys)


_ledger: MemoryLedger | RedisLedger | None = None


def ledger() -> MemoryLedger | RedisLedger:
    global _ledger
    if _ledger is None:
        url = settings.AUDIO_STORE_URL
        _ledger = RedisLedger(url) if url else MemoryLedger()
    return _ledger


async def quota_reserve(*, user_id: int, kind: Kind, amount: int, limit: int) -> int:
    """Take up to `amount` of today's allowance; what was granted (all of it when
    `limit` is 0, unlimited). The first reservation of a day, or after Redis
    lost its counters, reads the persisted figure to start from."""
    if not limit or amount <= 0:
        return max(0, amount)
    day = today()
    key = counter_key(user_id, day, kind)
    store = ledger()
    granted = await store.reserve(key, amount, limit, None)
    if granted < 0:
        seed = await database_sync_to_async(seed_read)(user_id=user_id, day=day, kind=kind)
        granted = await store.reserve(key, amount, limit, seed)
    return granted


async def quota_adjust(*, user_id: int, kind: Kind, delta: int, day: dt.date) -> None:
    """Settle a reservation of `day`: give back what it did not use (delta < 0),
    or add what it overran."""
    if delta:
        await ledger().adjust(counter_key(user_id, day, kind), delta)


async def quota_left(*, user_id: int, kind: Kind, limit: int) -> int | None:
    """What is left of today's allowance (None: unlimited)."""
    if not limit:
        return None
    day = today()
    spent = await ledger().spent(counter_key(user_id, day, kind))
    if spent is None:
        spent = await database_sync_to_async(seed_read)(user_id=user_id, day=day, kind=kind)
    return max(0, limit - spent)


def quota_forget(*, user_ids: list[int], day: dt.date) -> None:
    """Drop the users' live counters of `day` (staff reset their usage): the next
    reservation reads the persisted figure again. Sync, for the admin."""
    keys = [counter_key(u, day, kind) for u in user_ids for kind in ("audio_ms", "tokens")]
    if keys:
        ledger().forget_sync(keys)
