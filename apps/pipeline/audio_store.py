"""Per-utterance audio buffers, shared by the web process (which appends
frames) and the STT workers (which read windows by offset). Redis in
production, so audio crosses the network once; process memory otherwise."""

import functools
import threading

import redis
import redis.asyncio as aredis
from django.conf import settings

TTL_SECONDS = 600


def utterance_key(conversation_id: str, utterance_id: str) -> str:
    return f"audio:{conversation_id}:{utterance_id}"


class MemoryAudioStore:
    def __init__(self) -> None:
        self._buffers: dict[str, bytearray] = {}
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


class RedisAudioStore:
    def __init__(self, url: str) -> None:
        self._url = url
        self._sync = redis.Redis.from_url(url)
        self._async: dict[int, aredis.Redis] = {}

    def _client(self) -> aredis.Redis:
        import asyncio

        loop_id = id(asyncio.get_running_loop())
        if loop_id not in self._async:
            self._async[loop_id] = aredis.Redis.from_url(self._url)
        return self._async[loop_id]

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


@functools.cache
def audio_store() -> MemoryAudioStore | RedisAudioStore:
    if settings.AUDIO_STORE_URL:
        return RedisAudioStore(settings.AUDIO_STORE_URL)
    return MemoryAudioStore()
