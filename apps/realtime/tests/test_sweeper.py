"""The sweeper's rules (sweeper.py) against a Redis of this test's own: which
owners count as dead, that one process sweeps each, and the backstop for replies
that outlived any deadline."""

from datetime import timedelta

import pytest
from django.utils import timezone

from apps.conversations.models import Message
from apps.conversations.tests.factories import ConversationFactory, MessageFactory
from apps.pipeline.audio_store import RedisAudioStore
from apps.realtime.sweeper import Sweeper, stale_replies_interrupt
from tests import live

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="module")
def store():
    port = live.free_port()
    redis = live.start_redis(port)
    try:
        yield RedisAudioStore(f"redis://127.0.0.1:{port}/4")
    finally:
        live.stop_by_pid(redis)


def owner_add(store, owner: str, *, alive: bool, records: dict) -> None:
    sync = store._sync
    sync.sadd("live:owners", owner)
    if alive:
        sync.set(f"live:owner:{owner}", 1, ex=30)
    for key, record in records.items():
        sync.hset(key, mapping=record)
        sync.sadd(f"live:owned:{owner}", key)


def test_an_owner_is_swept_once_silent_on_two_looks_and_a_live_one_never(store, settings):
    settings.LIVE_HEARTBEAT_S = 2.0
    reply = MessageFactory(role="assistant", source="llm", status="streaming")
    owner_add(store, "dead", alive=False, records={f"live:reply:{reply.id}": {"owner": "dead"}})
    owner_add(store, "alive", alive=True, records={"live:reply:other": {"owner": "alive"}})
    sweeper, rival = Sweeper(store), Sweeper(store)

    # a first look: silent once is not dead (a Redis blip)
    assert sweeper.sweep(now=100.0).owners == []
    # a look LIVE_HEARTBEAT_S later: dead, swept, by one process only
    assert sweeper.sweep(now=102.5).owners == ["dead"]
    rival.sweep(now=100.0)
    assert rival.sweep(now=103.0).owners == []
    reply.refresh_from_db()
    assert (reply.status, reply.error_code) == ("interrupted", "server_lost")
    assert store._sync.smembers("live:owners") == {b"alive"}
    assert store._sync.exists(f"live:reply:{reply.id}", "live:owned:dead") == 0
    assert store._sync.exists("live:reply:other") == 1  # a live owner's records stay


def test_an_owner_that_beats_again_is_not_swept(store, settings):
    settings.LIVE_HEARTBEAT_S = 2.0
    owner_add(store, "blip", alive=False, records={"live:reply:x": {"owner": "blip"}})
    sweeper = Sweeper(store)
    sweeper.sweep(now=200.0)
    store._sync.set("live:owner:blip", 1, ex=30)  # Redis came back, it wrote again
    assert sweeper.sweep(now=203.0).owners == []
    assert "blip" not in sweeper.silent_since  # forgotten
    assert store._sync.exists("live:reply:x") == 1


def test_the_backstop_interrupts_replies_streaming_past_any_deadline(settings):
    settings.LLM_DEADLINE_S = 60.0
    conversation = ConversationFactory()
    stale = MessageFactory(conversation=conversation, role="assistant", source="llm",
                           status="streaming")  # fmt: skip
    fresh = MessageFactory(conversation=conversation, role="assistant", source="llm",
                           status="streaming")  # fmt: skip
    Message.objects.filter(pk=stale.pk).update(created_at=timezone.now() - timedelta(minutes=5))

    assert stale_replies_interrupt() == 1

    stale.refresh_from_db()
    fresh.refresh_from_db()
    assert (stale.status, fresh.status) == ("interrupted", "streaming")
