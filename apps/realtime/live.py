"""The web process's live state, written in batches.

Frames never wait for the store: each open utterance keeps all of its audio
in process memory (at most VAD_MAX_UTTERANCE_MS, 640 kB at 20 s) and one
writer per process sends what is new for every open utterance in one
pipeline, every AUDIO_FLUSH_MS, and at once when an STT job needs its audio
(the job is enqueued only after the store holds it). The same batch records
each open utterance and streaming reply with the process that owns it, and
the process's heartbeat (`live:owner:<owner>`, in the `live:owners` set), so
that another process can tell what a dead one left behind.

A failed write loses nothing: the audio stays in memory and goes with the
next batch; a store that lost an utterance's key (a Redis restart) gets the
whole buffer again. Each utterance's owner hears of a failure once per
streak, through its `on_error`."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import socket
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from django.conf import settings

from apps.pipeline.audio_store import (
    TTL_SECONDS,
    Batch,
    MemoryAudioStore,
    RedisAudioStore,
    audio_store,
)

from .cancel import raise_if_cancelled

log = logging.getLogger(__name__)

OWNER = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
EXPIRE_EVERY_S = 30.0  # an open utterance's key gets its TTL again this often


def utterance_record_key(utterance_id: str) -> str:
    return f"live:utterance:{utterance_id}"


def reply_record_key(reply_id: str) -> str:
    return f"live:reply:{reply_id}"


def owned_key(owner: str) -> str:
    return f"live:owned:{owner}"


@dataclass(eq=False)
class OpenAudio:
    """One open utterance's audio: all of it, and how much the store holds."""

    key: str
    record_key: str
    on_error: Callable[[Exception], None]
    pcm: bytearray = field(default_factory=bytearray)
    stored: int = 0  # bytes the store holds
    writing: int = 0  # bytes in the batch being written
    rewrite: bool = False  # the store lost the key: send it all again
    expires_set_at: float = 0.0
    waiters: list[tuple[int, Callable[[], None]]] = field(default_factory=list)
    failing: bool = False


class LiveWriter:
    """One per process (per event loop); `live_writer()` returns it."""

    def __init__(self, store: MemoryAudioStore | RedisAudioStore, *, owner: str = OWNER) -> None:
        self.store = store
        self.owner = owner
        self.audio: dict[str, OpenAudio] = {}  # by utterance id
        # ended utterances whose audio left memory, their final not known yet:
        # utterance id -> (record key, when it left)
        self.released: dict[str, tuple[str, float]] = {}
        self.dirty: dict[int, OpenAudio] = {}  # audio with bytes the store lacks
        self.in_flight: list[OpenAudio] = []  # in the batch being written
        self.records: dict[str, dict[str, str]] = {}  # dirty live records
        self.removed: list[str] = []
        self.flags: list[tuple[str, int]] = []
        self.heartbeat_at = 0.0
        self.wake = asyncio.Event()
        self.written = asyncio.Event()  # set after each successful flush
        self.task: asyncio.Task | None = None
        self.failures = 0
        self.heartbeat_s = settings.LIVE_HEARTBEAT_S
        self.owner_ttl = int(3 * settings.LIVE_HEARTBEAT_S) + 1

    # --- what sockets call (all sync: no frame waits) --------------------------

    def audio_open(
        self, *, key: str, utterance_id: str, record: dict[str, str], on_error
    ) -> OpenAudio:
        audio = OpenAudio(key=key, record_key=utterance_record_key(utterance_id), on_error=on_error)
        self.audio[utterance_id] = audio
        self.records[audio.record_key] = {**record, "owner": self.owner, "state": "open"}
        self._start()
        return audio

    def audio_append(self, audio: OpenAudio, data: bytes) -> int:
        audio.pcm += data
        self.dirty[id(audio)] = audio
        return len(audio.pcm)

    def audio_end(self, utterance_id: str, record: dict[str, str]) -> None:
        """Speech ended: no more audio; the record stays until the final is known.
        The audio stays in memory too, in case the store loses it before then,
        for LIVE_AUDIO_KEEP_S at most once the store holds all of it."""
        audio = self.audio.get(utterance_id)
        if audio is not None:
            self.records[audio.record_key] = {**record, "state": "ended"}
            asyncio.get_running_loop().call_later(
                settings.LIVE_AUDIO_KEEP_S, self._release, utterance_id
            )

    def _release(self, utterance_id: str) -> None:
        audio = self.audio.get(utterance_id)
        if audio is None:
            return
        if audio.stored < len(audio.pcm) or audio.waiters or audio.rewrite:  # not stored yet
            asyncio.get_running_loop().call_later(1.0, self._release, utterance_id)
            return
        audio.pcm, audio.stored = bytearray(), 0  # a late job for it runs at once
        del self.audio[utterance_id]
        self.released[utterance_id] = (audio.record_key, time.monotonic())
        stale = time.monotonic() - TTL_SECONDS  # its live record has expired by now
        while self.released:  # oldest first (insertion order)
            oldest = next(iter(self.released))
            if self.released[oldest][1] >= stale:
                break
            del self.released[oldest]

    def audio_forget(self, utterance_id: str) -> None:
        """The utterance's final (or empty) transcript is stored: nothing left to recover."""
        audio = self.audio.pop(utterance_id, None)
        record_key = audio.record_key if audio is not None else None
        if audio is None and utterance_id in self.released:
            record_key = self.released.pop(utterance_id)[0]
        if record_key is not None:
            self.records.pop(record_key, None)
            self.removed.append(record_key)

    def when_stored(self, audio: OpenAudio, then: Callable[[], None]) -> None:
        """Call `then` once the store holds every byte of `audio` so far."""
        if audio.stored >= len(audio.pcm) and not audio.rewrite:
            then()
            return
        # It runs in the caller's context (its socket's request id goes with the job).
        audio.waiters.append((len(audio.pcm), partial(contextvars.copy_context().run, then)))
        self.wake.set()

    def reply_open(self, *, reply_id: str, conversation_id: str) -> None:
        self.records[reply_record_key(reply_id)] = {
            "conversation": conversation_id,
            "owner": self.owner,
            "started_at": str(time.time()),
        }
        self._start()

    def reply_close(self, reply_id: str) -> None:
        key = reply_record_key(reply_id)
        self.records.pop(key, None)
        self.removed.append(key)

    def flag(self, key: str, ttl: int) -> None:
        self.flags.append((key, ttl))

    async def settle(self, timeout_s: float = 2.0) -> None:
        """Write what is pending now (a socket closes), waiting at most `timeout_s`."""
        if not self.dirty or self.task is None or self.task.done():
            return
        self.written.clear()
        self.wake.set()
        try:
            await asyncio.wait_for(self.written.wait(), timeout_s)
        except TimeoutError:
            pass  # the store is down: the writer keeps trying

    # --- the writer ------------------------------------------------------------

    def _start(self) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(
                self.run(), name="live-writer", context=contextvars.Context()
            )  # the process's, not the first socket's: its log lines carry no socket's ids

    async def run(self) -> None:
        interval = settings.AUDIO_FLUSH_MS / 1000
        while True:
            raise_if_cancelled()
            try:
                await asyncio.wait_for(self.wake.wait(), interval * (1 + min(self.failures, 9)))
            except TimeoutError:
                pass
            self.wake.clear()
            await self.flush()

    async def flush(self) -> None:
        batch = self._batch()
        if not batch:
            return
        try:
            lengths = await self.store.write_batch(batch)
        except Exception as exc:  # the store is down: keep everything, try again
            self._failed(batch, exc)
            return
        self._written(lengths)

    def _batch(self) -> Batch:
        batch = Batch(owner=self.owner, owner_ttl=self.owner_ttl)
        now = time.monotonic()
        self.in_flight, self.dirty = list(self.dirty.values()), {}
        for audio in self.in_flight:
            if audio.rewrite:
                audio.writing = len(audio.pcm)
                batch.rewrites.append((audio.key, bytes(audio.pcm)))
            elif len(audio.pcm) > audio.stored:
                audio.writing = len(audio.pcm)
                batch.appends.append((audio.key, bytes(audio.pcm[audio.stored :])))
                if not audio.stored or now - audio.expires_set_at > EXPIRE_EVERY_S:
                    batch.expiring.append(audio.key)  # a TTL once, then now and then
                    audio.expires_set_at = now
        batch.records, self.records = self.records, {}
        batch.removed, self.removed = self.removed, []
        batch.flags, self.flags = self.flags, []
        due = now - self.heartbeat_at >= self.heartbeat_s
        batch.heartbeat = due or bool(batch.records)
        return batch

    def _written(self, lengths: list[int]) -> None:
        self.heartbeat_at = time.monotonic()
        self.failures = 0
        self.written.set()
        appended = iter(lengths)
        loop = asyncio.get_running_loop()
        written, self.in_flight = self.in_flight, []
        for audio in written:
            if not audio.writing:
                continue
            if audio.rewrite:
                audio.rewrite = False
            elif next(appended) != audio.writing:  # the key was lost: send it all again
                audio.rewrite, audio.writing = True, 0
                self.dirty[id(audio)] = audio
                self.wake.set()
                continue
            audio.stored, audio.writing = audio.writing, 0
            audio.failing = False
            ready = [then for end, then in audio.waiters if end <= audio.stored]
            audio.waiters = [(end, then) for end, then in audio.waiters if end > audio.stored]
            for then in ready:
                loop.call_soon(then)  # each job its own callback: a big batch stays short

    def _failed(self, batch: Batch, exc: Exception) -> None:
        self.failures += 1
        if self.failures == 1:
            log.warning("live state write failed (%s); keeping it in memory", exc)
        self.records = {**batch.records, **self.records}
        self.removed = batch.removed + self.removed
        self.flags = batch.flags + self.flags
        for audio in self.in_flight:
            audio.writing = 0
            self.dirty[id(audio)] = audio
        self.in_flight = []
        for audio in self.audio.values():
            if not audio.failing and audio.stored < len(audio.pcm):
                audio.failing = True
                audio.on_error(exc)


_writers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def live_writer() -> LiveWriter:
    """The running loop's writer (one per web process)."""
    loop = asyncio.get_running_loop()
    writer = _writers.get(loop)
    if writer is None:
        writer = _writers[loop] = LiveWriter(audio_store())
    return writer
