"""A persona's own engine settings reach the engines, end to end: a real Daphne (and,
in services mode, a real Celery worker) whose deployment defaults are faster-whisper,
the echo stand-in with model "deployment-model", and Piper, and whose OpenAI-compatible
endpoint is the local fake server (apps/pipeline/tests/fake_openai.py). Every persona
value tested differs from those defaults; the fake server's request log shows what
reached the OpenAI engines.

The server is this module's own (`tests.live.start_daphne` with the fake's URL in its
environment: the engines read LLM_BASE_URL / OPENAI_BASE_URL when they are built). In
services mode its tasks go to a worker of its own, with the same environment, on a
broker of its own, so the session's worker (which knows no fake endpoint) never takes
them."""

import json

import pytest
import redis

from apps.conversations.models import Message, TranscriptSegment
from apps.personas.tests.factories import PersonaFactory
from apps.pipeline.talk_client import TalkClient
from apps.pipeline.tests import fake_openai
from tests import live
from tests.audio import pcm_of

from .conftest import socket_opener
from .helpers import assert_no_error, speak

DEPLOYMENT = {  # this server's defaults for a persona that sets nothing
    "STT_KIND": "faster_whisper",
    "LLM_KIND": "echo",
    "LLM_MODEL": "deployment-model",
    "TTS_KIND": "piper",
}
OPENAI_DEFAULT_VOICE = "alloy"  # what the OpenAI TTS engine asks for when no voice is set
OPENAI_PCM_RATE = 24_000  # the fake (like OpenAI) answers /audio/speech with 24 kHz PCM16
CHAT, SPEECH, TRANSCRIPTIONS = (
    "/v1/chat/completions",
    "/v1/audio/speech",
    "/v1/audio/transcriptions",
)


def other_redis_db(url: str, offset: int = 4) -> str:
    """The same Redis server, a logical database `offset` above the one in `url`."""
    base, db = url.rsplit("/", 1)
    return f"{base}/{(int(db) + offset) % 16}"


@pytest.fixture(scope="module")
def fake():
    with fake_openai.FakeOpenAI() as server:
        yield server


@pytest.fixture(scope="module")
def engines_server(live_env, services_mode, fake):
    """A Daphne with DEPLOYMENT and the fake endpoint; in services mode `.worker` is its
    Celery worker. Stopped at the end of the module."""
    from django.conf import settings

    env = {
        **live_env,
        **DEPLOYMENT,
        "LLM_BASE_URL": fake.base_url,
        "OPENAI_BASE_URL": fake.base_url,
        "LLM_API_KEY": "test-key",
        "LLM_MAX_RETRIES": "0",
        "LLM_TIMEOUT_S": "10",
    }
    worker = None
    if services_mode:
        env["CELERY_BROKER_URL"] = other_redis_db(settings.CELERY_BROKER_URL)
        redis.Redis.from_url(env["CELERY_BROKER_URL"]).flushdb()  # tasks left by a killed run
        worker = live.start_worker(env)
    try:
        server = live.start_daphne(env)
    except Exception:
        if worker is not None:
            worker.stop()
        raise
    server.worker = worker
    yield server
    server.stop()
    if worker is not None:
        worker.stop()


@pytest.fixture
def talk(engines_server, transactional_db, fake):
    """Open a socket to this module's server (see `talker`), with an empty request log."""
    clients: list[TalkClient] = []
    fake.fault = None
    fake.requests.clear()
    yield socket_opener(engines_server, clients)
    for client in clients:
        client.close()


def requests_to(fake, path: str) -> list[dict]:
    return [r for r in list(fake.requests) if r["path"] == path]


def typed_turn(client: TalkClient, text: str) -> tuple[dict, list[dict]]:
    """Send `text`; wait for its reply and every sentence's audio. Returns reply.done and
    the reply's reply.audio.start events."""
    after = len(client.received)
    client.send_json({"type": "text", "text": text})
    done = client.wait_for(lambda e: e["type"] == "reply.done", after=after, timeout=60).event
    for index in range(done["audio_parts"]):
        client.wait_for(
            lambda e, i=index: (
                e["type"] == "reply.audio.start"
                and e["reply_id"] == done["reply_id"]
                and e["index"] == i
            ),
            after=after,
            timeout=60,
        )
    client.wait_quiet(quiet=1.0)
    starts = [
        r.event
        for r in client.received[after:]
        if r.event["type"] == "reply.audio.start" and r.event["reply_id"] == done["reply_id"]
    ]
    return done, starts


def test_a_persona_that_sets_nothing_gets_the_deployment_defaults(talk, fake):
    # given a persona with no engine of its own
    PersonaFactory(slug="plain", stt_kind="", llm_kind="", llm_model="", tts_kind="", voice="")
    client = talk("plain")

    # when the user types
    done, starts = typed_turn(client, "Which engines answer me?")

    # then the deployment's engines answer: echo, spoken by Piper; the fake is not asked
    assert client.ready["engines"] == {"stt": "faster_whisper", "llm": "echo", "tts": "piper"}
    assert client.ready["llm_is_offline_echo"] is True
    assert done["text"].startswith("(echo)") and "Which engines answer me?" in done["text"]
    assert starts and {(s["engine"], s["sample_rate"]) for s in starts} == {("piper", 22_050)}
    assert Message.objects.get(pk=done["reply_id"]).provider == "echo"
    assert [r["path"] for r in fake.requests] == []
    assert_no_error(client)


def test_a_personas_llm_kind_model_temperature_and_max_tokens_reach_the_llm(talk, fake):
    # given a persona on the OpenAI-compatible LLM with its own model and parameters
    persona = PersonaFactory(
        slug="own-llm",
        system_prompt="You are the persona with its own model.",
        llm_kind="openai",
        llm_model="persona-model-1",
        temperature=1.3,
        max_tokens=77,
        tts_kind="espeak",
    )
    client = talk("own-llm")

    # when the user types
    done, starts = typed_turn(client, "Tell me about tides.")

    # then the reply comes from that endpoint, asked with the persona's values
    assert client.ready["engines"]["llm"] == "openai"
    assert client.ready["llm_is_offline_echo"] is False
    assert done["text"] == "".join(fake_openai.REPLY_TOKENS)
    [chat] = requests_to(fake, CHAT)
    sent = json.loads(chat["body"])
    assert sent["model"] == "persona-model-1" != DEPLOYMENT["LLM_MODEL"]
    assert (sent["temperature"], sent["max_tokens"], sent["stream"]) == (1.3, 77, True)
    assert sent["messages"][0] == {"role": "system", "content": persona.system_prompt}
    assert sent["messages"][-1] == {"role": "user", "content": "Tell me about tides."}
    assert chat["headers"]["authorization"] == "Bearer test-key"
    # and the stored reply says so, with the endpoint's token counts
    stored = Message.objects.get(pk=done["reply_id"])
    assert (stored.provider, stored.status, stored.text) == ("openai", "complete", done["text"])
    assert stored.prompt_tokens == fake_openai.PROMPT_TOKENS
    assert stored.completion_tokens == len(fake_openai.REPLY_TOKENS)
    # and it is spoken by the persona's TTS kind, not the deployment's
    assert starts and {s["engine"] for s in starts} == {"espeak"}
    assert_no_error(client)


def test_a_personas_stt_kind_reaches_speech_to_text(talk, fake):
    # given a persona on the OpenAI-compatible STT (the deployment's is faster-whisper)
    PersonaFactory(slug="own-stt", stt_kind="openai", llm_kind="echo", tts_kind="espeak")
    client = talk("own-stt")

    # when the user speaks
    events = speak(client, pcm_of("speechbrain_spk1_snt1.wav"))  # "THE CHILD ALMOST HURT ..."

    # then the endpoint transcribed the utterance: its transcript (not the words spoken,
    # which faster-whisper would hear) is the final, stored with that provider
    assert client.ready["engines"]["stt"] == "openai"
    [final] = [e for e in events if e["type"] == "transcript.final"]
    assert final["text"] == fake_openai.TRANSCRIPT
    calls = requests_to(fake, TRANSCRIPTIONS)
    assert calls, [r["path"] for r in fake.requests]
    assert all(b"RIFF" in call["body"] and b"WAVEfmt" in call["body"] for call in calls)
    segment = TranscriptSegment.objects.get(
        conversation=client.conversation, utterance_id=final["utterance_id"]
    )
    assert (segment.provider, segment.text) == ("openai", fake_openai.TRANSCRIPT)
    # and the reply answers that transcript
    [done] = [e for e in events if e["type"] == "reply.done"]
    assert fake_openai.TRANSCRIPT in done["text"]
    assert requests_to(fake, CHAT) == []  # the LLM is still the persona's echo
    assert_no_error(client)


def test_a_personas_voice_reaches_text_to_speech(talk, fake):
    # given a persona on the OpenAI-compatible TTS with a voice of its own
    PersonaFactory(slug="own-voice", llm_kind="echo", tts_kind="openai", voice="verse")
    client = talk("own-voice")

    # when the user types
    done, starts = typed_turn(client, "Say it in your own voice.")

    # then every sentence was synthesised by that endpoint in the persona's voice ...
    assert client.ready["engines"]["tts"] == "openai"
    speech = [json.loads(r["body"]) for r in requests_to(fake, SPEECH)]
    assert len(speech) == done["audio_parts"] >= 1
    assert {s["voice"] for s in speech} == {"verse"} and "verse" != OPENAI_DEFAULT_VOICE
    assert all(s["input"].strip() and s["input"].strip() in done["text"] for s in speech)
    # ... and what the socket got is that audio
    expected_bytes = int(fake.speech_seconds * OPENAI_PCM_RATE) * 2
    assert [s["index"] for s in starts] == list(range(done["audio_parts"]))
    assert {(s["engine"], s["sample_rate"], s["bytes"]) for s in starts} == {
        ("openai", OPENAI_PCM_RATE, expected_bytes)
    }
    received = sum(e["bytes"] for e in client.events("binary"))
    assert received == expected_bytes * len(starts)
    assert_no_error(client)
