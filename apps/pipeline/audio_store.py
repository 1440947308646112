"""Per-utterance audio, reply audio, live state and the short-lived flags of
live conversations, shared by the web processes and the workers. Redis in
production, so audio crosses the network once; process memory otherwise.

The web process writes through `write_batch` (one pipeline for every open
utterance of the process, see apps/realtime/live.py) and reads flags with the
async methods, on native async Redis from one bounded connection pool per
process: a burst waits for a free connection instead of failing. Workers use
the sync methods."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
import weakref
from dataclasses import dataclass, field

import redis
import redis.asyncio as aredis
from django.conf import settings
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

TTL_SECONDS = 600
WRITE_CHUNK = 64  # commands in one pipeline of a live-state write
REPLY_AUDIO_TTL_SECONDS = 120


def utterance_key(conversation_id: str, utterance_id: str) -> str:
    return f"audio:{conversation_id}:{utterance_id}"


def reply_audio_key(reply_id: str, index: int) -> str:
    return f"reply-audio:{reply_id}:{index}"


@dataclass
class Batch:
    """One flush of a web process: audio appended to open utterances, whole
    buffers rewritten (after Redis lost them), live-state records set and
    removed, and the owner's heartbeat."""

    appends: list[tuple[str, bytes]] = field(default_factory=list)
    expiring: list[str] = field(default_factory=list)  # keys whose TTL is (re)set
    rewrites: list[tuple[str, bytes]] = field(default_factory=list)
    records: dict[str, dict[str, str]] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    flags: list[tuple[str, int]] = field(default_factory=list)  # (key, ttl)
    owner: str = ""  # the records' owner (live:owned:<owner>)
    owner_ttl: int = 10
    heartbeat: bool = False  # write the owner's heartbeat

    def __bool__(self) -> bool:
        return bool(
            self.appends
            or self.rewrites
            or self.records
            or self.removed
            or self.flags
            or self.heartbeat
        )


class MemoryAudioStore:
    def __init__(self) -> None:
        self._buffers: dict[str, bytearray] = {}
        self._blobs: dict[str, bytes] = {}
        self.records: dict[str, dict[str, str]] = {}
        self._flags: dict[str, float] = {}  # key -> monotonic expiry
        self._lock = threading.Lock()

    async def write_batch(self, batch: Batch) -> list[int]:
        with self._lock:
            lengths = []
            for key, data in batch.appends:
                buffer = self._buffers.setdefault(key, bytearray())
                buffer += data
                lengths.append(len(buffer))
            for key, data in batch.rewrites:
                self._buffers[key] = bytearray(data)
            for key, record in batch.records.items():
                self.records.setdefault(key, {}).update(record)
            for key in batch.removed:
                self.records.pop(key, None)
            for key, ttl in batch.flags:
                self._flags[key] = time.monotonic() + ttl
            if batch.heartbeat:
                self.records[f"live:owner:{batch.owner}"] = {"at": str(time.time())}
            return lengths

    def read(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        with self._lock:
            return bytes(self._buffers.get(key, b"")[start:end])

    def delete(self, key: str) -> None:
        with self._lock:
            self._buffers.pop(key, None)
            self._blobs.pop(key, None)

    async def adelete(self, key: str) -> None:
        self.delete(key)

    def put(self, key: str, data: bytes, ttl: int) -> None:
        with self._lock:
            self._blobs[key] = data

    async def aget(self, key: str) -> bytes | None:
        with self._lock:
            return self._blobs.get(key)

    def flag_set(self, key: str, ttl: int) -> None:
        with self._lock:
            self._flags[key] = time.monotonic() + ttl

    def flag_get(self, key: str) -> bool:
        with self._lock:
            return self._flags.get(key, 0) > time.monotonic()

    async def aflag_add(self, key: str, ttl: int) -> bool:
        """Raise the flag unless it is up already; True if this call raised it."""
        with self._lock:
            now = time.monotonic()
            if self._flags.get(key, 0) > now:
                return False
            self._flags[key] = now + ttl
            return True

    async def aflag_set(self, key: str, ttl: int) -> None:
        self.flag_set(key, ttl)

    async def aflag_get(self, key: str) -> bool:
        return self.flag_get(key)


class RedisAudioStore:
    def __init__(self, url: str) -> None:
        self._url = url
        self._sync = redis.Redis.from_url(
            url, socket_timeout=5, socket_connect_timeout=2,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1),
            retry_on_error=[RedisConnectionError],
        )  # fmt: skip
        # An async pool belongs to the event loop it was made on: one per loop,
        # forgotten with the loop (keyed by the loop itself, not its reusable id).
        self._async: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _client(self) -> aredis.Redis:
        loop = asyncio.get_running_loop()
        client = self._async.get(loop)
        if client is None:
            pool = aredis.BlockingConnectionPool.from_url(
                self._url,
                max_connections=settings.REDIS_POOL_MAX,
                timeout=settings.REDIS_POOL_TIMEOUT_S,
                socket_timeout=2,
                socket_connect_timeout=2,
                # a connection a Redis restart broke reconnects once, at once
                retry=AsyncRetry(ExponentialBackoff(cap=0.2, base=0.05), 1),
                retry_on_error=[RedisConnectionError],
            )
            client = self._async[loop] = aredis.Redis(connection_pool=pool)
        return client

    async def write_batch(self, batch: Batch) -> list[int]:
        """One round of pipelines, CHUNK commands at most each: building a
        pipeline is Python work on the loop, so a big batch yields between
        chunks instead of holding the loop for all of it."""
        commands: list[tuple] = [("APPEND", key, data) for key, data in batch.appends]
        commands += [("EXPIRE", key, TTL_SECONDS) for key in batch.expiring]
        commands += [("SET", key, data, "EX", TTL_SECONDS) for key, data in batch.rewrites]
        for key, record in batch.records.items():
            if record:
                commands.append(("HSET", key, *(x for pair in record.items() for x in pair)))
            commands.append(("EXPIRE", key, TTL_SECONDS))
        owned = f"live:owned:{batch.owner}"
        if batch.records:
            commands.append(("SADD", owned, *batch.records))
        if batch.removed:
            commands += [("DEL", *batch.removed), ("SREM", owned, *batch.removed)]
        commands += [("SET", key, 1, "EX", ttl) for key, ttl in batch.flags]
        if batch.heartbeat:
            commands.append(
                ("SET", f"live:owner:{batch.owner}", time.time(), "EX", batch.owner_ttl)
            )
            commands.append(("SADD", "live:owners", batch.owner))
        results: list = []
        for start in range(0, len(commands), WRITE_CHUNK):
            async with self._client().pipeline(transaction=False) as pipe:
                for command in commands[start : start + WRITE_CHUNK]:
                    pipe.execute_command(*command)
                results += await pipe.execute()
        return results[: len(batch.appends)]

    def read(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        # GETRANGE's end is inclusive; -1 is the last byte.
        data = self._sync.getrange(key, start, -1 if end is None else end - 1)
        return data if isinstance(data, bytes) else data.encode()  # no decode_responses

    def delete(self, key: str) -> None:
        self._sync.delete(key)

    async def adelete(self, key: str) -> None:
        await self._client().delete(key)

    def put(self, key: str, data: bytes, ttl: int) -> None:
        self._sync.set(key, data, ex=ttl)

    async def aget(self, key: str) -> bytes | None:
        data = await self._client().get(key)
        return data if data is None or isinstance(data, bytes) else data.encode()

    def flag_set(self, key: str, ttl: int) -> None:
        self._sync.set(key, 1, ex=ttl)

    def flag_get(self, key: str) -> bool:
        return bool(self._sync.exists(key))

    async def aflag_add(self, key: str, ttl: int) -> bool:
        return bool(await self._client().set(key, 1, ex=ttl, nx=True))

    async def aflag_set(self, key: str, ttl: int) -> None:
        await self._client().set(key, 1, ex=ttl)

    async def aflag_get(self, key: str) -> bool:
        return bool(await self._client().exists(key))

    # --- live state of other processes (apps/realtime/sweeper.py) ----------------

    def owners_silent(self) -> list[str]:
        """Web processes in `live:owners` whose heartbeat has expired."""
        owners = sorted(_text(o) for o in self._sync.smembers("live:owners"))
        if not owners:
            return []
        with self._sync.pipeline(transaction=False) as pipe:
            for owner in owners:
                pipe.exists(f"live:owner:{owner}")
            alive = pipe.execute()
        return [owner for owner, up in zip(owners, alive, strict=True) if not up]

    def owned_records(self, owner: str) -> dict[str, dict[str, str]]:
        keys = sorted(_text(k) for k in self._sync.smembers(f"live:owned:{owner}"))
        with self._sync.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(key)
            records = pipe.execute()
        return {
            key: {_text(k): _text(v) for k, v in record.items()}
            for key, record in zip(keys, records, strict=True)
        }

    def length(self, key: str) -> int:
        return int(self._sync.strlen(key))

    def flag_add(self, key: str, ttl: int) -> bool:
        return bool(self._sync.set(key, 1, ex=ttl, nx=True))

    def owner_forget(self, owner: str) -> None:
        """A dead owner's records are dealt with: drop them and it."""
        owned = f"live:owned:{owner}"
        keys = list(self._sync.smembers(owned))
        with self._sync.pipeline(transaction=False) as pipe:
            if keys:
                pipe.delete(*keys)
            pipe.delete(owned)
            pipe.srem("live:owners", owner)
            pipe.execute()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@functools.cache
def audio_store() -> MemoryAudioStore | RedisAudioStore:
    if settings.AUDIO_STORE_URL:
        return RedisAudioStore(settings.AUDIO_STORE_URL)
    return MemoryAudioStore()
