"""Per-utterance audio buffers, shared by the web process (which appends
frames) and the STT workers (which read windows by offset), and the
short-lived flags of live conversations (a reply claimed, a reply stopped,
an utterance ended). Redis in production, so audio crosses the network once;
process memory otherwise. The web process uses the async methods, with
native async Redis: no thread hop (Django's cache API would take one)."""

import asyncio
import functools
import threading
import time
import weakref

import redis
import redis.asyncio as aredis
from django.conf import settings

TTL_SECONDS = 600


def utterance_key(conversation_id: str, utterance_id: str) -> str:
    return f"audio:{conversation_id}:{utterance_id}"


class MemoryAudioStore:
    def __init__(self) -> None:
        self._buffers: dict[str, bytearray] = {}
        self._flags: dict[str, float] = {}  # key -> monotonic expiry
        self._lock = threading.Lock()

    async def append(self, key: str, data: bytes) -> int:
        with self._lock:
            buffer = self._buffers.setdefault(key, bytearray())
            buffer += data
            return len(buffer)

    def read(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        with self._lock:
            return bytes(self._buffers.get(key, b"")[start:end])

    def delete(self, key: str) -> None:
        with self._lock:
            self._buffers.pop(key, None)

    async def adelete(self, key: str) -> None:
        self.delete(key)

    def flag_add(self, key: str, ttl: int) -> bool:
        """Raise the flag unless it is up already; True if this call raised it."""
        with self._lock:
            now = time.monotonic()
            if self._flags.get(key, 0) > now:
                return False
            self._flags[key] = now + ttl
            return True

    def flag_set(self, key: str, ttl: int) -> None:
        with self._lock:
            self._flags[key] = time.monotonic() + ttl

    def flag_get(self, key: str) -> bool:
        with self._lock:
            return self._flags.get(key, 0) > time.monotonic()

    async def aflag_add(self, key: str, ttl: int) -> bool:
        return self.flag_add(key, ttl)

    async def aflag_set(self, key: str, ttl: int) -> None:
        self.flag_set(key, ttl)

    async def aflag_get(self, key: str) -> bool:
        return self.flag_get(key)


class RedisAudioStore:
    def __init__(self, url: str) -> None:
        self._url = url
        self._sync = redis.Redis.from_url(url)
        # An async client belongs to the event loop it was made on: one per loop,
        # forgotten with the loop (keyed by the loop itself, not its reusable id).
        self._async: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _client(self) -> aredis.Redis:
        loop = asyncio.get_running_loop()
        client = self._async.get(loop)
        if client is None:
            client = self._async[loop] = aredis.Redis.from_url(self._url)
        return client

    async def append(self, key: str, data: bytes) -> int:
        async with self._client().pipeline(transaction=False) as pipe:
            pipe.append(key, data)
            pipe.expire(key, TTL_SECONDS)
            length, _ = await pipe.execute()
        return length

    def read(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        # GETRANGE's end is inclusive; -1 is the last byte.
        return self._sync.getrange(key, start, -1 if end is None else end - 1)

    def delete(self, key: str) -> None:
        self._sync.delete(key)

    async def adelete(self, key: str) -> None:
        await self._client().delete(key)

    def flag_get(self, key: str) -> bool:
        return bool(self._sync.exists(key))

    async def aflag_add(self, key: str, ttl: int) -> bool:
        return bool(await self._client().set(key, 1, ex=ttl, nx=True))

    async def aflag_set(self, key: str, ttl: int) -> None:
        await self._client().set(key, 1, ex=ttl)

    async def aflag_get(self, key: str) -> bool:
        return bool(await self._client().exists(key))


@functools.cache
def audio_store() -> MemoryAudioStore | RedisAudioStore:
    if settings.AUDIO_STORE_URL:
        return RedisAudioStore(settings.AUDIO_STORE_URL)
    return MemoryAudioStore()
