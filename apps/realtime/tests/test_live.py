"""The LiveWriter: open utterances' audio buffered in the process and written
in batches, with the live records another process needs. Runs on the mode's
own store: process memory on embedded defaults, Redis in services mode."""

import asyncio
import socket
import uuid

import pytest
import redis

from apps.pipeline.audio_store import MemoryAudioStore, RedisAudioStore, audio_store
from apps.realtime.live import LiveWriter, owned_key, reply_record_key, utterance_record_key

FRAME = bytes(range(256)) * 12 + bytes(128)  # 3200 bytes, not all zero


def open_audio(writer: LiveWriter, errors: list | None = None):
    utterance_id = uuid.uuid4().hex
    audio = writer.audio_open(
        key=f"audio:test:{utterance_id}",
        utterance_id=utterance_id,
        record={"conversation": "c1", "start_ms": "0"},
        on_error=(errors if errors is not None else []).append,
    )
    return utterance_id, audio


def record_of(store, key: str) -> dict:
    if isinstance(store, MemoryAudioStore):
        return store.records.get(key, {})
    raw = redis.Redis.from_url(store._url).hgetall(key)
    return {k.decode(): v.decode() for k, v in raw.items()}


@pytest.fixture
def store(settings):
    settings.AUDIO_FLUSH_MS = 20
    return audio_store()


async def test_frames_are_written_in_batches_and_jobs_wait_for_their_audio(store):
    writer = LiveWriter(store, owner=f"test-{uuid.uuid4().hex[:6]}")
    (_, first), (_, second) = open_audio(writer), open_audio(writer)
    ran: list[int] = []

    # when frames of two utterances arrive and a job needs the first one's audio
    for _ in range(5):
        writer.audio_append(first, FRAME)
        writer.audio_append(second, FRAME)
    assert store.read(first.key) == b""  # nothing written by a frame itself
    writer.when_stored(first, lambda: ran.append(len(store.read(first.key))))
    await asyncio.sleep(0.2)

    # then one write put every byte of both in the store before the job ran
    assert ran == [5 * len(FRAME)]
    assert store.read(first.key) == FRAME * 5
    assert store.read(second.key) == FRAME * 5
    # and a job for audio already stored runs at once
    writer.when_stored(first, lambda: ran.append(-1))
    assert ran[-1] == -1
    writer.task.cancel()


async def test_live_records_name_their_owner_until_forgotten(store):
    owner = f"test-{uuid.uuid4().hex[:6]}"
    writer = LiveWriter(store, owner=owner)
    utterance_id, audio = open_audio(writer)
    writer.task.cancel()  # this test drives the flushes itself
    writer.reply_open(reply_id="r1", conversation_id="c1")
    writer.audio_append(audio, FRAME)
    await writer.flush()

    assert record_of(store, utterance_record_key(utterance_id))["owner"] == owner
    assert record_of(store, reply_record_key("r1"))["owner"] == owner
    if isinstance(store, MemoryAudioStore):
        assert record_of(store, f"live:owner:{owner}")
    else:
        client = redis.Redis.from_url(store._url)
        assert client.exists(f"live:owner:{owner}")
        assert client.sismember(owned_key(owner), utterance_record_key(utterance_id))

    writer.audio_forget(utterance_id)
    writer.reply_close("r1")
    await writer.flush()
    assert record_of(store, utterance_record_key(utterance_id)) == {}
    assert record_of(store, reply_record_key("r1")) == {}


async def test_a_store_that_lost_the_audio_gets_all_of_it_again(store):
    writer = LiveWriter(store)
    _, audio = open_audio(writer)
    writer.task.cancel()  # this test drives the flushes itself
    writer.audio_append(audio, FRAME)
    await writer.flush()
    store.delete(audio.key)  # as a Redis restart would

    writer.audio_append(audio, FRAME[:100])
    await writer.flush()  # the append finds the key gone ...
    await writer.flush()  # ... and the whole buffer is written again

    assert store.read(audio.key) == FRAME + FRAME[:100]


async def test_a_dead_store_loses_nothing_and_tells_the_owner_once(store, settings):
    closed = socket.socket()  # bound, never listening: every connect is refused
    closed.bind(("127.0.0.1", 0))
    dead = RedisAudioStore(f"redis://127.0.0.1:{closed.getsockname()[1]}/0")
    writer = LiveWriter(dead)
    errors: list = []
    _, audio = open_audio(writer, errors)
    writer.task.cancel()  # this test drives the flushes itself
    ran: list[bool] = []
    writer.audio_append(audio, FRAME)
    writer.when_stored(audio, lambda: ran.append(True))

    await writer.flush()
    writer.audio_append(audio, FRAME)
    await writer.flush()

    assert len(errors) == 1 and ran == []  # told once; the job still waits
    writer.store = store  # the store is back
    await writer.flush()
    await asyncio.sleep(0)  # the job runs as a callback of its own
    assert ran == [True]
    assert store.read(audio.key) == FRAME * 2


async def test_an_ended_utterance_frees_its_memory_once_stored(store, settings):
    settings.LIVE_AUDIO_KEEP_S = 0.05
    writer = LiveWriter(store)
    utterance_id, audio = open_audio(writer)
    writer.task.cancel()  # this test drives the flushes itself
    writer.audio_append(audio, FRAME)
    writer.audio_end(utterance_id, {"end_ms": "100"})
    await asyncio.sleep(0.1)
    assert len(audio.pcm) == len(FRAME)  # not stored yet: kept

    await writer.flush()
    await asyncio.sleep(1.2)
    assert len(audio.pcm) == 0 and store.read(audio.key) == FRAME
    assert utterance_id not in writer.audio  # flushes no longer look at it
    ran = []
    writer.when_stored(audio, lambda: ran.append(True))  # a late final job runs at once
    assert ran == [True]
    writer.audio_forget(utterance_id)  # the final came: its live record goes
    await writer.flush()
    assert record_of(store, utterance_record_key(utterance_id)) == {}
