"""The offline reply model end to end: a spoken turn over a real socket to a real
Daphne whose replies come from `manage.py serve_llm` (SmolLM2-135M-Instruct on this
machine's CPU), the `local` LLM kind being the deployment default once LLM_LOCAL_URL
is set, as `make run` sets it. STT and TTS are the mode's own (worker threads inside
Daphne, or the session's Celery worker)."""

import time

import pytest

from apps.conversations.models import Message
from apps.personas.tests.factories import PersonaFactory
from apps.pipeline.sentences import _ends_sentence
from apps.pipeline.talk_client import TalkClient
from tests import live
from tests.audio import pcm_of

from .conftest import socket_opener
from .helpers import assert_no_error, speak

REPLY_DEADLINE_S = 20  # final transcript to reply.done, on 2 busy cores


@pytest.fixture(scope="module")
def local_server(live_env):
    """serve_llm, and a Daphne pointed at it with no other LLM setting."""
    llm = live.start_llm(live_env)
    try:
        env = {key: value for key, value in live_env.items() if not key.startswith("LLM_")}
        server = live.start_daphne({**env, "LLM_LOCAL_URL": llm.base_url})
    except Exception:
        llm.stop()
        raise
    yield server
    server.stop()
    llm.stop()


@pytest.fixture
def talk(local_server, live_worker, transactional_db):
    clients: list[TalkClient] = []
    yield socket_opener(local_server, clients)
    for client in clients:
        client.close()


def test_a_spoken_turn_is_answered_by_the_offline_model_and_spoken(talk):
    # given a persona that sets no LLM of its own
    PersonaFactory(
        slug="rex", name="Captain Rex", llm_kind="", tts_kind="espeak", max_tokens=256,
        system_prompt="You are Captain Rex, a jolly pirate captain who loves the sea.",
        temperature=0.9,
    )  # fmt: skip
    client = talk("rex")

    # when the user asks what the weather is like
    events = speak(client, pcm_of("cognitive-services-speech-sdk_whatstheweatherlike.wav"))

    # then the offline model answers, labelled as such
    assert client.ready["engines"]["llm"] == "local"
    assert client.ready["llm_is_offline_small"] is True
    assert client.ready["llm_is_offline_echo"] is False
    [final] = [e for e in events if e["type"] == "transcript.final"]
    assert "weather" in final["text"].lower()
    [done] = [e for e in events if e["type"] == "reply.done"]
    text = done["text"]
    # a reply of its own, not the user's words given back
    assert text.strip() and not text.startswith("(echo)")
    assert final["text"].lower().strip(" ?.") not in text.lower()
    # streamed token by token, at most two sentences
    deltas = [e for e in events if e["type"] == "reply.delta" and e["reply_id"] == done["reply_id"]]
    assert len(deltas) > 2 and "".join(d["text"] for d in deltas) == text
    assert sum(_ends_sentence(word) for word in text.split()[:-1]) <= 1
    # and spoken by TTS
    starts = [
        e for e in events if e["type"] == "reply.audio.start" and e["reply_id"] == done["reply_id"]
    ]
    assert starts and sum(s["bytes"] for s in starts) > 16_000  # more than 0.5 s of speech
    # stored with the engine that made it and what it cost
    message = Message.objects.get(pk=done["reply_id"])
    assert (message.provider, message.text) == ("local", text)
    assert message.completion_tokens > 0 and message.prompt_tokens > 0
    assert_no_error(client)


def test_the_reply_arrives_within_its_deadline(talk):
    PersonaFactory(slug="sage", name="Sage", llm_kind="", tts_kind="espeak",
                   system_prompt="You are Sage, a calm mindfulness coach.")  # fmt: skip
    client = talk("sage")

    after = len(client.received)
    client.send_json({"type": "text", "text": "I feel a bit tired today."})
    start = time.monotonic()
    done = client.wait_for(lambda e: e["type"] == "reply.done", after=after,
                           timeout=REPLY_DEADLINE_S).event  # fmt: skip

    assert time.monotonic() - start < REPLY_DEADLINE_S
    assert done["text"].strip() and "tired today" not in done["text"]
    assert_no_error(client)
