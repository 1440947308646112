"""A spoken turn through the real socket, STT, echo LLM and TTS (espeak) stores
what it used and cost on its turns: the utterance's audio seconds on the user's
turn, the tokens' price and every part's speech seconds on the reply."""

import asyncio
import json
import time

import pytest
from asgiref.sync import sync_to_async

from apps.conversations import costs
from apps.conversations.models import Message
from tests.audio import pcm_of

from .test_consumer import (  # noqa: F401  (fixtures)
    SILENCE_FRAME,
    connect,
    conversation,
    fast_engines,
    hello,
    settle,
    user,
)

pytestmark = pytest.mark.usefixtures("transactional_db")

# Priced here, where the reply is stored (this process); the STT and TTS engines keep
# their default price, 0, as a worker process (services mode) has its own settings.
ECHO_PRICED = '{"llm": {"echo": {"in_per_1m": 1.0, "out_per_1m": 2.0}}}'


async def test_a_spoken_turn_stores_its_audio_tokens_speech_and_cost(
    connect,  # noqa: F811
    settings,
    live_worker,
):
    # given
    settings.AUDIO_RATE_BURST_S = 20
    settings.COST_PRICES = ECHO_PRICED
    communicator = await connect()
    await hello(communicator, resume_from=1)
    await settle(communicator)
    pcm = pcm_of("speechbrain_spk1_snt1.wav") + bytes(len(SILENCE_FRAME) * 15)
    frame = len(SILENCE_FRAME)

    # when a sentence is spoken, and its reply played
    for i in range(0, len(pcm) - frame + 1, frame):
        await communicator.send_to(bytes_data=pcm[i : i + frame])
    seen: list[dict] = []
    audio_bytes = 0
    done = None
    while done is None or sum(e["type"] == "reply.audio.start" for e in seen) < done["audio_parts"]:
        output = await communicator.receive_output(timeout=60)
        if output.get("bytes") is not None:
            continue
        message = json.loads(output["text"])
        seen.append(message)
        if message["type"] == "reply.audio.start":
            audio_bytes += message["bytes"]
            sample_rate = message["sample_rate"]
        if message["type"] == "reply.done":
            done = message

    # then the user's turn holds its utterance's seconds
    final = next(e for e in seen if e["type"] == "transcript.final")
    turn = await sync_to_async(Message.objects.select_related("segment").get)(
        pk=final["message_id"]
    )
    assert turn.stt_audio_seconds == (turn.segment.end_ms - turn.segment.start_ms) / 1000
    assert turn.stt_audio_seconds > 1.0 and turn.cost_usd == 0  # faster_whisper: 0
    # and the reply the seconds of speech the socket was sent, and its tokens' price
    spoken_s = audio_bytes / 2 / sample_rate
    deadline = time.monotonic() + 20
    while True:
        reply = await sync_to_async(Message.objects.get)(pk=done["reply_id"])
        if abs(reply.tts_audio_seconds - spoken_s) < 0.001 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)  # the last part's UPDATE follows its audio
    assert reply.tts_audio_seconds == pytest.approx(spoken_s, abs=0.001)
    assert reply.prompt_tokens > 0 and reply.completion_tokens > 0
    assert reply.cost_usd == costs.prices().llm_usd(
        kind="echo", prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens
    )
    assert reply.cost_usd > 0
