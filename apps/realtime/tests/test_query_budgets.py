"""Query budgets on the hot paths, counted on every thread of this process
(test_consumer.QueryCounter): frames, including those that open an utterance,
and group events run no query; a spoken turn stays within a small budget."""

import asyncio
import json
from unittest import mock

import pytest
from channels.layers import get_channel_layer

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
    user,
)

pytestmark = pytest.mark.usefixtures("transactional_db")

# Measured 22 on SQLite, embedded (the in-process worker's queries counted too; 17 in services
# mode, where the worker is another process): the
# final's existence check 1; transcript_finalize 7 (BEGIN, lock, segment check, seq select
# + update, message and segment inserts, user lookup, usage update); reply_prepare 7;
# first-audio timing 1; reply_finish 4. A little headroom, no more.
VOICE_TURN_QUERY_BUDGET = 24


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
    with mock.patch("apps.realtime.speech.enqueue"), QueryCounter() as queries:
        for frame in frames_of(speech):
            await communicator.send_to(bytes_data=frame)
        sent_back = await settle(communicator)
        layer = get_channel_layer()
        group = group_name(conversation.id)
        await layer.group_send(group, event("reply.delta", reply_id="r-x", text="hi"))
        await layer.group_send(group, event("error", code="stt_unavailable", message="m"))
        await settle(communicator)

    # then the utterance opened, and nothing touched the database
    assert [e["type"] for e in sent_back][:1] == ["speech.start"]
    assert len(queries) == 0, queries.report()


async def test_a_spoken_turn_stays_within_its_query_budget(connect, settings, live_worker):  # noqa: F811
    settings.AUDIO_RATE_BURST_S = 20
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
    assert len(queries) <= VOICE_TURN_QUERY_BUDGET, queries.report()
