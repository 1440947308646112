"""Query budgets on the hot paths, counted on every thread of this process
(test_consumer.QueryCounter): frames, including those that open an utterance,
and group events run no query; a spoken turn, and a socket's open and hello,
stay within small budgets. Persona, conversation and history come from the
context cache (apps/conversations/context.py), so none of them is a query."""

import asyncio
import json
from unittest import mock

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.db import connection

from apps.accounts.ledger import quota_reserve
from apps.accounts.services import session_key_create
from apps.conversations.models import Message
from apps.realtime.events import event, group_name
from tests.audio import pcm_of

from .test_consumer import (  # noqa: F401  (fixtures)
    SILENCE_FRAME,
    QueryCounter,
    connect,
    conversation,
    fast_engines,
    hello,
    settle,
    socket,
    user,
)

pytestmark = pytest.mark.usefixtures("transactional_db")

# Measured 6 in services mode (Postgres; the STT worker is another process, uncounted)
# and 8 on SQLite, embedded, where each transaction's BEGIN is a statement too:
# transcript_finalize 3 + BEGIN (message insert with its seq computed and returned by
# the INSERT, segment insert, usage update); reply_prepare 1 (the reply's insert, the
# same way; persona and history from the cache); reply_finish 2 + BEGIN (the reply's
# update, with the first audio's timing when it came first, and the usage update).
# When the STT worker made the final (no candidate in time), embedded also counts its
# redelivery check: 9. Embedded also counts the TTS worker's thread: one UPDATE per part
# spoken (its speech seconds and cost added to the reply; this echo reply has 2 parts):
# 10, or 11. A little headroom, no more.
VOICE_TURN_QUERY_BUDGET = {"postgresql": 8, "sqlite": 12}
# The socket's user (the session's) and hello's one query (the turns to replay with the
# last turn); the conversation and persona come from the cache. Measured 2 in both modes
# (the session itself comes from the cache in services mode, from the database embedded: 3).
SOCKET_OPEN_QUERY_BUDGET = {"postgresql": 2, "sqlite": 3}
CACHED_TABLES = ('"personas_persona"', '"conversations_conversation"')


def reads_of_cached_tables(queries: QueryCounter) -> list[str]:
    return [
        sql
        for _, sql in queries.statements
        if sql.lstrip().upper().startswith("SELECT") and any(t in sql for t in CACHED_TABLES)
    ]


async def warm_ledger(account) -> None:
    """Start the user's quota counters of the day (ledger.py): the first socket and the
    first reply of a user's day read their DailyUsage row once, to start from it."""
    await quota_reserve(user_id=account.pk, kind="audio_ms", amount=1, limit=10**9)
    await quota_reserve(user_id=account.pk, kind="tokens", amount=1, limit=10**9)


def frames_of(pcm: bytes) -> list[bytes]:
    size = len(SILENCE_FRAME)
    return [pcm[i : i + size] for i in range(0, len(pcm) - size + 1, size)]


async def test_speech_frames_and_group_events_run_no_queries(conversation, connect, settings):  # noqa: F811
    settings.AUDIO_RATE_BURST_S = 20
    communicator = await connect()
    await hello(communicator, resume_from=1)
    await settle(communicator)
    speech = pcm_of("speechbrain_spk1_snt1.wav")

    # when speech arrives (opening an utterance: quota check, live record) and group
    # events reach the socket, with STT jobs recorded instead of run
    with mock.patch("apps.realtime.speech.enqueue"):
        with QueryCounter() as queries:
            for frame in frames_of(speech):
                await communicator.send_to(bytes_data=frame)
            sent_back = await settle(communicator)
            layer = get_channel_layer()
            group = group_name(conversation.id)
            await layer.group_send(group, event("reply.delta", reply_id="r-x", text="hi"))
            await layer.group_send(group, event("error", code="stt_unavailable", message="m"))
            await settle(communicator)
        # closed with the STT jobs still recorded: the open utterance's final would
        # otherwise run after this test, in the next one's count
        await communicator.disconnect(timeout=10)

    # then the utterance opened, and nothing touched the database
    assert [e["type"] for e in sent_back][:1] == ["speech.start"]
    assert len(queries) == 0, queries.report()


async def test_a_spoken_turn_stays_within_its_query_budget(connect, settings, live_worker, user):  # noqa: F811
    settings.AUDIO_RATE_BURST_S = 20
    await warm_ledger(user)
    communicator = await connect()
    await hello(communicator, resume_from=1)
    await settle(communicator)
    pcm = pcm_of("speechbrain_spk1_snt1.wav") + bytes(len(SILENCE_FRAME) * 15)

    with QueryCounter() as queries:
        for frame in frames_of(pcm):
            await communicator.send_to(bytes_data=frame)
        seen = []
        while not any(e.get("type") == "reply.done" for e in seen):
            output = await communicator.receive_output(timeout=60)
            if output.get("text"):
                seen.append(json.loads(output["text"]))
        await asyncio.sleep(0.5)  # anything late (first-audio timing) is counted too

    assert any(e["type"] == "transcript.final" for e in seen)
    assert len(queries) <= VOICE_TURN_QUERY_BUDGET[connection.vendor], queries.report()
    # the first audio's timing was stored all the same (with the reply, or after it)
    done = next(e for e in seen if e["type"] == "reply.done")
    reply = await sync_to_async(Message.objects.get)(pk=done["reply_id"])
    assert reply.first_token_to_first_audio_ms is not None
    assert reads_of_cached_tables(queries) == [], queries.report()
    history_reads = [sql for _, sql in queries.statements if sql.startswith("SELECT")]
    assert history_reads == [], queries.report()  # no read at all: the cache answered


async def test_a_socket_open_and_hello_stay_within_their_query_budget(conversation, user):  # noqa: F811
    # given a signed-in user, and a conversation whose context the cache has
    # (conversation_start put it there)
    communicator = socket(conversation.id, await sync_to_async(session_key_create)(user=user))
    await warm_ledger(user)
    with QueryCounter() as queries:
        # when a socket opens and says hello
        connected, _ = await communicator.connect(timeout=10)
        ready = await hello(communicator, resume_from=0)
        await settle(communicator)  # the greeting's replay
    await communicator.disconnect(timeout=10)

    # then
    assert connected and ready["persona"]["name"] == "Tester"
    assert len(queries) <= SOCKET_OPEN_QUERY_BUDGET[connection.vendor], queries.report()
    assert reads_of_cached_tables(queries) == [], queries.report()
