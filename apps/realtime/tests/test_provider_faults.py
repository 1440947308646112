"""Provider faults through the real reply path (docs/reliability.md, "Provider
faults"): a socket of the whole ASGI stack (WebsocketCommunicator on
config.asgi.application) talks to a persona whose LLM is the OpenAI engine pointed at
the local fault-injecting fake (apps/pipeline/tests/fake_openai.py). Each test
injects a fault, checks what the client is sent, what is stored and how many
requests reached the fake, then heals the fake and takes another turn on the same
socket.

The LLM runs on this process's loop in both modes. STT and TTS run where the mode
runs them: on in-process worker threads (embedded), or in services mode on a Celery
worker of this module's own whose OpenAI endpoint is the same fake. That worker and
this process use a broker and a channel layer on Redis databases of their own, so the
session's worker (which knows no fake endpoint) never takes this module's tasks, and
other test runs on the same Redis reach none of its sockets. `transactional_db`: the
services run on other threads and processes, which only see committed data."""

import asyncio
import copy
import json
import logging
import random
import time
import uuid

import pytest
import redis
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator

from apps.accounts.services import session_key_create
from apps.accounts.tests.factories import UserFactory
from apps.conversations.models import Message
from apps.conversations.services import conversation_start
from apps.observability.metrics import PROVIDER_CIRCUIT
from apps.personas.tests.factories import PersonaFactory
from apps.pipeline.providers import breaker, openai_llm, registry
from apps.pipeline.providers.base import CLIENT_MESSAGES, approx_tokens
from apps.pipeline.tests import fake_openai
from apps.pipeline.vad import BYTES_PER_MS
from config.asgi import application
from tests import live
from tests.audio import pcm_of

pytestmark = pytest.mark.usefixtures("transactional_db")

TIMEOUT = 20  # seconds to wait for one event
REPLY = "".join(fake_openai.REPLY_TOKENS)  # "Hello there, nice to meet you."
CUT_TEXT = "".join(fake_openai.REPLY_TOKENS[:3])  # the fake's "cut": 3 tokens, then closed
FRAME = 100 * BYTES_PER_MS  # 100 ms of audio a frame
DEADLINE_S = 8.0
# Imported here, not on the first reply: importing the SDK takes seconds.
assert openai_llm.OpenAILLM.kind == "openai"


def other_redis_db(url: str, offset: int) -> str:
    base, db = url.rsplit("/", 1)
    return f"{base}/{(int(db) + offset) % 16}"


@pytest.fixture(scope="module")
def fake():
    with fake_openai.FakeOpenAI() as server:
        yield server


@pytest.fixture(scope="module")
def stt_tts_worker(fake, live_env, services_mode, django_db_setup):
    """Services mode: a Celery worker whose OpenAI STT/TTS endpoint is the fake, with a
    broker and a channel layer on Redis databases of their own (None in embedded mode)."""
    if not services_mode:
        yield None
        return
    from django.conf import settings

    broker_url = other_redis_db(settings.CELERY_BROKER_URL, 7)
    layer_url = other_redis_db(settings.CHANNEL_LAYER_URL, 11)
    for url in (broker_url, layer_url):
        redis.Redis.from_url(url).flushdb()  # left by a killed run
    env = {
        **live_env,
        "CELERY_BROKER_URL": broker_url,
        "CHANNEL_LAYER_URL": layer_url,
        "OPENAI_BASE_URL": fake.base_url,
        "LLM_API_KEY": "test-key",
        "LLM_MAX_RETRIES": "1",
        "LLM_TIMEOUT_S": "2",
    }
    worker = live.start_worker(env)
    worker.broker_url, worker.layer_url = broker_url, layer_url
    yield worker
    worker.stop()


@pytest.fixture(autouse=True)
def llm_at_the_fake(settings, fake, stt_tts_worker):
    """The OpenAI engines at the fake (2 retries, 1 s an attempt, 8 s a reply; the
    breaker opens after 3 failed replies for 1.5 s), built afresh for each test."""
    settings.LLM_KIND = "openai"
    settings.LLM_BASE_URL = settings.OPENAI_BASE_URL = fake.base_url
    settings.LLM_API_KEY = "test-key"
    settings.LLM_MAX_RETRIES = 2
    settings.LLM_TIMEOUT_S = 1.0
    settings.LLM_DEADLINE_S = DEADLINE_S
    settings.LLM_BREAKER_FAILURES = 3
    settings.LLM_BREAKER_COOLDOWN_S = 1.5
    if stt_tts_worker is not None:
        settings.CELERY_BROKER_URL = stt_tts_worker.broker_url
        layers = copy.deepcopy(settings.CHANNEL_LAYERS)
        layers["default"]["CONFIG"]["hosts"][0]["address"] = stt_tts_worker.layer_url
        settings.CHANNEL_LAYERS = layers
    fake.heal()
    fake.retry_after = "1"
    fake.fault_after_tokens = None
    fake.delay_s = 3.0
    fake.requests.clear()
    registry._cached.cache_clear()
    breaker._breakers.clear()
    yield
    registry._cached.cache_clear()
    breaker._breakers.clear()
    fake.heal()


@pytest.fixture
def user():
    # An id no other test run's user has: `user.<id>` groups end sockets on a logout.
    return UserFactory(id=random.randrange(10**6, 2**31))


def conversation_of(user, **persona):
    fields = {"llm_kind": "openai", "tts_kind": "espeak", "greeting": "Hi.", **persona}
    return conversation_start(user=user, persona=PersonaFactory(**fields))


@pytest.fixture
async def connect(user):
    """Open a greeted socket as `user` on a new conversation (persona fields as given)."""
    opened: list[WebsocketCommunicator] = []

    async def open_socket(**persona) -> WebsocketCommunicator:
        conversation = await sync_to_async(conversation_of)(user, **persona)
        key = await sync_to_async(session_key_create)(user=user)
        communicator = WebsocketCommunicator(
            application,
            f"/ws/conversations/{conversation.id}/",
            headers=[(b"origin", b"http://localhost"), (b"cookie", f"sessionid={key}".encode())],
        )
        connected, _ = await communicator.connect(timeout=TIMEOUT)
        assert connected
        opened.append(communicator)
        communicator.conversation = conversation
        await communicator.send_json_to({"type": "hello", "resume_from": 1})
        ready = await communicator.receive_json_from(timeout=TIMEOUT)
        assert ready["type"] == "ready", ready
        return communicator

    yield open_socket
    for communicator in opened:
        await communicator.disconnect(timeout=TIMEOUT)


async def until(communicator, ends, *, timeout: float = TIMEOUT) -> list[dict]:
    """The socket's events (binary audio frames skipped) up to the first for which
    `ends(event)` is true, that one included."""
    events: list[dict] = []
    while not events or not ends(events[-1]):
        output = await communicator.receive_output(timeout=timeout)
        if output["type"] == "websocket.close":
            raise AssertionError(f"socket closed with {output.get('code')}: {events}")
        if output.get("text") is not None:
            events.append(json.loads(output["text"]))
    return events


def reply_end(seq: int = 0):
    """The stored end of a reply after turn `seq`: reply.done or reply.interrupted."""
    return lambda e: e["type"] in ("reply.done", "reply.interrupted") and e["seq"] > seq


async def turn(communicator, text: str = "Say hello.") -> tuple[list[dict], float]:
    """A typed turn: every event up to the reply's stored end, and the seconds from
    its transcript.final (the reply's start) to the first `error` (or to the end)."""
    await communicator.send_json_to({"type": "text", "text": text})
    [*_, final] = await until(communicator, lambda e: e["type"] == "transcript.final")
    started = time.monotonic()
    events, errored = [], None
    while not events or not reply_end(final["seq"])(events[-1]):
        events += await until(communicator, lambda e: True)
        if events[-1]["type"] == "error" and errored is None:
            errored = time.monotonic()
    return events, (errored or time.monotonic()) - started


def of_type(events: list[dict], type_: str) -> list[dict]:
    return [e for e in events if e["type"] == type_]


async def stored_reply(reply_id: str) -> Message:
    return await Message.objects.aget(id=reply_id)


async def assert_failed_with(events: list[dict], code: str) -> dict:
    """The client heard `code` with its plain sentence, and the reply is stored failed
    (nothing was streamed, so no tokens are charged)."""
    [error] = of_type(events, "error")
    assert error == {"type": "error", "code": code, "message": CLIENT_MESSAGES[code]}
    [end] = [e for e in events if reply_end()(e)]
    assert (end["type"], end["status"], end["error_code"], end["text"]) == (
        "reply.done", "failed", code, "",
    )  # fmt: skip
    assert not of_type(events, "reply.delta")
    reply = await stored_reply(end["reply_id"])
    assert (reply.status, reply.error_code, reply.text) == (Message.Status.FAILED, code, "")
    assert reply.prompt_tokens == reply.completion_tokens == 0
    return end


async def assert_next_turn_works(communicator, fake) -> None:
    """The fake is healthy again: the same socket gets a whole reply."""
    fake.heal()
    before = fake.chat_requests()
    events, _ = await turn(communicator, "Are you back?")
    assert not of_type(events, "error")
    [done] = of_type(events, "reply.done")
    assert (done["status"], done["text"], done["error_code"]) == ("complete", REPLY, "")
    assert fake.chat_requests() == before + 1


def assert_no_traceback(caplog) -> None:
    """An expected provider fault is a warning with its cause, never log.exception."""
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]


# --- LLM faults ------------------------------------------------------------------------------


async def test_a_429_with_retry_after_is_retried_after_it_and_the_reply_completes(
    connect, fake, caplog
):
    # given an endpoint that answers 429 (Retry-After: 1) twice, then normally
    fake.fault, fake.fault_requests = "rate_limit", 2
    communicator = await connect()

    # when the user types
    events, took_s = await turn(communicator)

    # then the reply came on the third request, at least 2 × Retry-After later
    assert fake.chat_requests() == 3
    assert not of_type(events, "error")
    [done] = of_type(events, "reply.done")
    assert (done["status"], done["text"]) == ("complete", REPLY)
    assert 2.0 <= took_s < DEADLINE_S
    assert_no_traceback(caplog)
    print(f"\nfigure: 429 x2 then ok: {fake.chat_requests()} requests, reply in {took_s:.2f} s")


async def test_a_429_that_persists_exhausts_the_retries_and_the_client_hears_rate_limited(
    connect, fake, caplog
):
    # given an endpoint that always answers 429, Retry-After: 0.2
    fake.fault, fake.retry_after = "rate_limit", "0.2"
    communicator = await connect()

    # when the user types
    events, took_s = await turn(communicator)

    # then 1 + 2 retries, and the client is told in plain words
    assert fake.chat_requests() == 3
    await assert_failed_with(events, "llm_rate_limited")
    assert took_s < DEADLINE_S
    assert_no_traceback(caplog)
    print(f"\nfigure: 429 always: {fake.chat_requests()} requests, error in {took_s:.2f} s")

    # and a Retry-After longer than the reply's deadline is not waited for
    fake.requests.clear()
    fake.retry_after = "30"
    events, took_s = await turn(communicator)
    assert fake.chat_requests() == 1
    await assert_failed_with(events, "llm_rate_limited")
    assert took_s < DEADLINE_S
    print(f"figure: 429 Retry-After 30: 1 request, error in {took_s:.2f} s")

    await assert_next_turn_works(communicator, fake)


async def test_a_500_is_retried_with_backoff_then_the_client_hears_unavailable(
    connect, fake, caplog
):
    fake.fault = "server_error"
    communicator = await connect()

    events, took_s = await turn(communicator)

    assert fake.chat_requests() == 3
    await assert_failed_with(events, "llm_unavailable")
    # the SDK's backoff, 0.5 s then 1 s, each less up to 25 % jitter
    assert 0.375 + 0.75 <= took_s < DEADLINE_S
    assert_no_traceback(caplog)
    print(f"\nfigure: 500 always: {fake.chat_requests()} requests, error in {took_s:.2f} s")
    await assert_next_turn_works(communicator, fake)


async def test_a_timeout_is_retried_then_the_client_hears_llm_timeout(connect, fake, caplog):
    # given an endpoint that answers nothing for 3 s, with 1 s an attempt
    fake.fault = "slow"
    communicator = await connect()

    events, took_s = await turn(communicator)

    assert fake.chat_requests() == 3
    await assert_failed_with(events, "llm_timeout")
    assert 3 * 1.0 <= took_s < DEADLINE_S
    assert_no_traceback(caplog)
    print(f"\nfigure: timeout always: {fake.chat_requests()} requests, error in {took_s:.2f} s")
    await assert_next_turn_works(communicator, fake)


async def test_a_malformed_stream_is_an_error_event_not_a_crash(connect, fake, caplog):
    # given an endpoint whose stream's first data line is not JSON
    fake.fault = "malformed"
    communicator = await connect()

    events, took_s = await turn(communicator)

    # then nothing had reached the user, so each attempt was retried; then a plain error
    assert fake.chat_requests() == 3
    await assert_failed_with(events, "llm_unavailable")
    assert_no_traceback(caplog)
    assert any("bad stream" in r.getMessage() for r in caplog.records)  # the cause: logs only
    print(f"\nfigure: malformed always: {fake.chat_requests()} requests, error in {took_s:.2f} s")
    await assert_next_turn_works(communicator, fake)


async def test_a_stream_cut_mid_reply_is_stored_interrupted_with_its_text(connect, fake, caplog):
    # given an endpoint that streams 3 tokens, then drops the connection
    fake.fault = "cut"
    communicator = await connect()

    events, took_s = await turn(communicator)

    # then it is not retried (the user saw text); the client gets the deltas, a plain
    # error, and the reply stored as interrupted (with seq), with what was said
    assert fake.chat_requests() == 1
    assert "".join(d["text"] for d in of_type(events, "reply.delta")) == CUT_TEXT
    [error] = of_type(events, "error")
    assert (error["code"], error["message"]) == (
        "llm_unavailable", CLIENT_MESSAGES["llm_unavailable"],
    )  # fmt: skip
    [end] = [e for e in events if reply_end()(e)]
    assert end["type"] == "reply.interrupted" and end["seq"] == 3
    assert (end["status"], end["error_code"], end["text"]) == (
        "interrupted", "llm_unavailable", CUT_TEXT,
    )  # fmt: skip
    assert events.index(error) < events.index(end)
    reply = await stored_reply(end["reply_id"])
    assert (reply.status, reply.text, reply.error_code) == (
        Message.Status.INTERRUPTED, CUT_TEXT, "llm_unavailable",
    )  # fmt: skip
    # and charged, estimated (the usage chunk never came)
    assert reply.completion_tokens == approx_tokens(CUT_TEXT)
    assert reply.prompt_tokens > 0
    assert_no_traceback(caplog)
    print(f"\nfigure: cut after 3 tokens: 1 request, error in {took_s:.2f} s")
    await assert_next_turn_works(communicator, fake)


async def test_a_stream_cut_before_its_first_token_is_retried(connect, fake):
    fake.fault, fake.fault_requests, fake.fault_after_tokens = "cut", 1, 0
    communicator = await connect()

    events, _ = await turn(communicator)

    assert fake.chat_requests() == 2
    assert not of_type(events, "error")
    [done] = of_type(events, "reply.done")
    assert (done["status"], done["text"]) == ("complete", REPLY)


async def test_the_breaker_opens_after_3_failed_replies_then_recovers_after_its_cooldown(
    connect, fake, settings, caplog
):
    # given an endpoint that always fails, and no retries (one request a reply)
    settings.LLM_MAX_RETRIES = 0
    fake.fault = "server_error"
    communicator = await connect()
    circuit = PROVIDER_CIRCUIT.labels("llm", "openai")

    # when 3 replies fail
    for _ in range(3):
        events, _ = await turn(communicator)
        await assert_failed_with(events, "llm_unavailable")
    assert fake.chat_requests() == 3
    opened_at = time.monotonic()

    # then the circuit is open: the next reply fails at once, without a request
    assert circuit._value.get() == 2
    assert any("circuit of llm openai opened" in r.getMessage() for r in caplog.records)
    events, fast_s = await turn(communicator)
    await assert_failed_with(events, "llm_unavailable")
    assert fake.chat_requests() == 3

    # when the endpoint is healthy again and the cooldown is over
    fake.heal()
    await asyncio.sleep(max(0.0, settings.LLM_BREAKER_COOLDOWN_S - (time.monotonic() - opened_at)))

    # then one trial reply goes through and closes the circuit
    events, _ = await turn(communicator)
    [done] = of_type(events, "reply.done")
    assert (done["status"], done["text"]) == ("complete", REPLY)
    assert fake.chat_requests() == 4
    assert circuit._value.get() == 0
    assert any("circuit of llm openai closed" in r.getMessage() for r in caplog.records)
    recovered_s = time.monotonic() - opened_at
    assert_no_traceback(caplog)
    print(f"\nfigure: breaker open, error in {fast_s * 1000:.0f} ms; recovered {recovered_s:.2f} s")


# --- STT and TTS faults ----------------------------------------------------------------------


async def test_a_failing_tts_endpoint_reaches_the_client_and_the_reply_still_completes(
    connect, fake
):
    # given a persona spoken by the OpenAI TTS engine, whose endpoint answers 500
    fake.fault, fake.fault_paths = "server_error", ("/v1/audio/speech",)
    communicator = await connect(tts_kind="openai")

    # when the user types
    events, _ = await turn(communicator)
    [done] = of_type(events, "reply.done")

    def part_ends(events: list[dict]) -> list[dict]:
        return [e for e in events if e["type"] == "reply.audio.start" and e.get("last")]

    while len(part_ends(events)) < done["audio_parts"]:  # audio may come after reply.done
        events += await until(communicator, lambda e: e["type"] == "reply.audio.start")
    parts = part_ends(events)

    # then the client hears tts_unavailable, in plain words, once for each part, and
    # each part ends with an empty last piece; the text reply is whole
    assert (done["status"], done["text"]) == ("complete", REPLY)
    errors = of_type(events, "error")
    assert errors and len(errors) == done["audio_parts"]
    assert {(e["code"], e["message"]) for e in errors} == {
        ("tts_unavailable", CLIENT_MESSAGES["tts_unavailable"])
    }
    assert all(p["bytes"] == 0 for p in parts)
    assert len([r for r in fake.requests if r["path"] == "/v1/audio/speech"]) >= 1

    # and once the endpoint is healthy, the next reply is spoken
    fake.heal()
    events, _ = await turn(communicator, "Again, please.")
    [done] = of_type(events, "reply.done")
    assert done["status"] == "complete" and not of_type(events, "error")


async def test_a_failing_stt_endpoint_reaches_the_client_and_the_socket_stays_usable(
    connect, fake, settings
):
    # given a persona heard by the OpenAI STT engine, whose endpoint answers 500
    settings.AUDIO_RATE_BURST_S = 10
    fake.fault, fake.fault_paths = "server_error", ("/v1/audio/transcriptions",)
    communicator = await connect(stt_kind="openai")

    # when the user speaks a sentence, then is silent
    pcm = pcm_of("speechbrain_spk1_snt1.wav") + bytes(1500 * BYTES_PER_MS)
    for offset in range(0, len(pcm), FRAME):
        await communicator.send_to(bytes_data=pcm[offset : offset + FRAME])
    events = await until(
        communicator, lambda e: e["type"] in ("transcript.empty", "transcript.final")
    )

    # then the client hears stt_unavailable in plain words, and the utterance ends empty
    assert events[-1]["type"] == "transcript.empty"
    errors = of_type(events, "error")
    assert errors and {(e["code"], e["message"]) for e in errors} == {
        ("stt_unavailable", CLIENT_MESSAGES["stt_unavailable"])
    }
    assert any(r["path"] == "/v1/audio/transcriptions" for r in fake.requests)

    # and the socket stays usable: a typed turn is answered
    events, _ = await turn(communicator, "Can you read me?")
    [done] = of_type(events, "reply.done")
    assert (done["status"], done["text"]) == ("complete", REPLY)


async def test_log_records_are_captured(caplog):
    # caplog sees the application's loggers (a guard for assert_no_traceback)
    logging.getLogger("apps.pipeline.services").warning("probe %s", uuid.uuid4())
    assert any(r.getMessage().startswith("probe ") for r in caplog.records)
