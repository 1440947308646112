"""ConversationConsumer in process: the whole ASGI stack (origin check, session
auth, routing) through channels.testing.WebsocketCommunicator, with the echo LLM and
espeak-ng TTS. The channel layer and the workers are the mode's own: on embedded
defaults the in-memory layer and in-process worker threads; in services mode the
Redis layer, Redis audio store and a real Celery worker (`live_worker`, requested by
each test whose turn needs a worker: STT or TTS), so this module passes run alone.

`transactional_db`: the consumer's services run on database_sync_to_async threads
(and, in services mode, in the worker process), which only see committed data."""

import asyncio
import json
import threading
import uuid
from unittest import mock

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.db.backends import utils as db_utils

from apps.accounts.services import session_key_create
from apps.accounts.tests.factories import UserFactory, usage_of, usage_set
from apps.conversations.models import Message
from apps.conversations.services import conversation_start
from apps.conversations.tests.factories import MessageFactory
from apps.personas.tests.factories import PersonaFactory
from apps.pipeline.audio_store import audio_store, utterance_key
from apps.pipeline.vad import BYTES_PER_MS
from config.asgi import application
from tests.audio import pcm_of

pytestmark = pytest.mark.usefixtures("transactional_db")

GREETING = "Hello, I am the test persona."
SILENCE_FRAME = bytes(100 * BYTES_PER_MS)  # 100 ms of zeros
TIMEOUT = 10  # seconds to wait for one event


@pytest.fixture(autouse=True)
def fast_engines(settings):
    settings.LLM_KIND = "echo"
    settings.TTS_KIND = "espeak"
    yield
    layer = get_channel_layer()
    if hasattr(layer, "hosts"):  # Redis: empty its database, without closing the pools
        # of other loops from this one (the publisher thread's loop has its own)
        import redis

        for host in layer.hosts:
            redis.Redis.from_url(host["address"]).flushdb()
    else:
        async_to_sync(layer.flush)()


@pytest.fixture
def user():
    return UserFactory()


@pytest.fixture
def conversation(user):
    persona = PersonaFactory(
        name="Tester", slug="tester", greeting=GREETING, llm_kind="echo", tts_kind="espeak"
    )
    return conversation_start(user=user, persona=persona)


def socket(conversation_id, session_key: str | None) -> WebsocketCommunicator:
    headers = [(b"origin", b"http://localhost")]
    if session_key:
        headers.append((b"cookie", f"sessionid={session_key}".encode()))
    return WebsocketCommunicator(
        application, f"/ws/conversations/{conversation_id}/", headers=headers
    )


@pytest.fixture
async def connect(conversation, user):
    """Open a socket (as `user` on `conversation` unless told otherwise); closed at the end."""
    opened: list[WebsocketCommunicator] = []

    async def open_socket(conversation_id=None, *, as_user=user) -> WebsocketCommunicator:
        key = await sync_to_async(session_key_create)(user=as_user) if as_user else None
        communicator = socket(conversation_id or conversation.id, key)
        connected, _ = await communicator.connect(timeout=TIMEOUT)
        assert connected
        opened.append(communicator)
        return communicator

    yield open_socket
    for communicator in opened:
        await communicator.disconnect(timeout=TIMEOUT)


async def hello(communicator, **fields) -> dict:
    await communicator.send_json_to({"type": "hello", **fields})
    ready = await communicator.receive_json_from(timeout=TIMEOUT)
    assert ready["type"] == "ready", ready
    return ready


async def settle(communicator) -> list[dict]:
    """Wait until the consumer has handled everything sent so far (it handles one
    message at a time, in order): ping, and return what came before the pong."""
    marker = uuid.uuid4().hex
    await communicator.send_json_to({"type": "ping", "t": marker})
    before = []
    while (message := await communicator.receive_json_from(timeout=TIMEOUT)) != {
        "type": "pong",
        "t": marker,
    }:
        before.append(message)
    return before


async def closed_with(communicator) -> int:
    output = await communicator.receive_output(timeout=TIMEOUT)
    assert output["type"] == "websocket.close", output
    return output["code"]


async def reply_turn(communicator) -> tuple[list[dict], list[bytes]]:
    """Everything the socket gets for one reply: events until reply.done, and
    every announced sentence's audio (which may come before or after it)."""
    events: list[dict] = []
    audio: list[bytes] = []
    done = None
    while (
        done is None or sum(e["type"] == "reply.audio.start" for e in events) < done["audio_parts"]
    ):
        output = await communicator.receive_output(timeout=TIMEOUT)
        if "bytes" in output and output["bytes"] is not None:
            audio.append(output["bytes"])
            continue
        message = json.loads(output["text"])
        events.append(message)
        if message["type"] == "reply.done":
            done = message
    # the last announced sentence's bytes
    expected = sum(e["bytes"] for e in events if e["type"] == "reply.audio.start")
    while sum(len(chunk) for chunk in audio) < expected:
        output = await communicator.receive_output(timeout=TIMEOUT)
        audio.append(output["bytes"])
    return events, audio


class QueryCounter:
    """Counts SQL statements run on ANY thread.

    The consumer never touches the ORM on the event loop: its services run on
    database_sync_to_async's worker thread, with that thread's own connection.
    CaptureQueriesContext / django_assert_max_num_queries only see the current
    thread's connection (connections are thread-local), so they would count 0
    whatever happens. Every statement Django runs, on every thread and
    connection, goes through CursorWrapper.execute/executemany (the debug
    wrapper calls them too), so patching those on the class counts them all."""

    def __init__(self) -> None:
        self.statements: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._patches = []

    def _wrap(self, original):
        counter = self

        def counted(cursor, sql, *args, **kwargs):
            with counter._lock:
                counter.statements.append((threading.current_thread().name, str(sql)))
            return original(cursor, sql, *args, **kwargs)

        return counted

    def __enter__(self) -> "QueryCounter":
        for name in ("execute", "executemany"):
            original = getattr(db_utils.CursorWrapper, name)
            patcher = mock.patch.object(db_utils.CursorWrapper, name, self._wrap(original))
            patcher.start()
            self._patches.append(patcher)
        return self

    def __exit__(self, *exc) -> None:
        for patcher in self._patches:
            patcher.stop()

    def __len__(self) -> int:
        return len(self.statements)

    def report(self) -> str:
        return "\n".join(f"[{thread}] {sql}" for thread, sql in self.statements)


# --- Handshake ---------------------------------------------------------------------------


async def test_anonymous_socket_gets_an_error_and_4401(conversation, connect):
    communicator = await connect(as_user=None)

    error = await communicator.receive_json_from(timeout=TIMEOUT)

    assert (error["type"], error["code"], error["fatal"]) == ("error", "unauthenticated", True)
    assert await closed_with(communicator) == 4401


async def test_someone_elses_conversation_gets_4403(conversation, connect):
    stranger = await sync_to_async(UserFactory)()
    communicator = await connect(as_user=stranger)

    error = await communicator.receive_json_from(timeout=TIMEOUT)

    assert (error["code"], error["fatal"]) == ("forbidden", True)
    assert await closed_with(communicator) == 4403


async def test_unknown_conversation_gets_4404(connect):
    communicator = await connect(uuid.uuid4())

    error = await communicator.receive_json_from(timeout=TIMEOUT)

    assert (error["code"], error["fatal"]) == ("not_found", True)
    assert await closed_with(communicator) == 4404


@pytest.mark.parametrize(
    "origin", [b"https://evil.example", b"null", b"http://localhost.evil.example", None]
)
async def test_a_foreign_null_or_missing_origin_is_refused_before_the_socket_opens(
    conversation, user, origin
):
    key = await sync_to_async(session_key_create)(user=user)
    headers = [(b"cookie", f"sessionid={key}".encode())]
    if origin is not None:
        headers.append((b"origin", origin))
    communicator = WebsocketCommunicator(
        application, f"/ws/conversations/{conversation.id}/", headers=headers
    )

    connected, _ = await communicator.connect(timeout=TIMEOUT)

    assert not connected


async def test_a_bad_session_cookie_gets_4401(conversation):
    communicator = socket(conversation.id, "not-a-session-key-0123456789")
    assert (await communicator.connect(timeout=TIMEOUT))[0]
    error = await communicator.receive_json_from(timeout=TIMEOUT)
    assert (error["code"], error["fatal"]) == ("unauthenticated", True)
    assert await closed_with(communicator) == 4401


async def test_protocol_2_is_refused_with_4400(connect):
    communicator = await connect()

    await communicator.send_json_to({"type": "hello", "protocol": 2})

    error = await communicator.receive_json_from(timeout=TIMEOUT)
    assert (error["code"], error["fatal"]) == ("unsupported_protocol", True)
    assert await closed_with(communicator) == 4400


# --- hello, replay, resume -------------------------------------------------------------------


async def test_hello_gets_ready_then_the_greeting_replayed(conversation, connect):
    communicator = await connect()

    ready = await hello(communicator)
    greeting = await communicator.receive_json_from(timeout=TIMEOUT)

    assert ready["protocol"] == 1
    assert ready["conversation_id"] == str(conversation.id)
    assert ready["persona"] == {
        "name": "Tester", "slug": "tester", "avatar": "🙂",
        "avatar_url": "/personas/tester/avatar.png",
    }  # fmt: skip
    assert ready["last_seq"] == 1
    assert ready["audio"]["sample_rate"] == 16000
    assert ready["engines"]["llm"] == "echo" and ready["llm_is_offline_echo"] is True
    assert greeting["type"] == "reply.done"
    assert (greeting["seq"], greeting["text"], greeting["source"], greeting["replayed"]) == (
        1,
        GREETING,
        "greeting",
        True,
    )
    assert await communicator.receive_nothing(timeout=0.2)


async def test_resume_from_skips_what_was_seen(conversation, connect):
    # given turns 2 and 3 after the greeting
    def more_turns():
        MessageFactory(conversation=conversation, text="typed before")
        MessageFactory(conversation=conversation, role="assistant", source="llm", text="answered")

    await sync_to_async(more_turns)()
    communicator = await connect()

    # when
    ready = await hello(communicator, resume_from=2)

    # then
    assert ready["last_seq"] == 3
    replayed = await communicator.receive_json_from(timeout=TIMEOUT)
    assert (replayed["type"], replayed["seq"], replayed["text"]) == ("reply.done", 3, "answered")
    assert await communicator.receive_nothing(timeout=0.2)


async def test_resume_from_the_last_seq_replays_nothing(connect):
    communicator = await connect()

    ready = await hello(communicator, resume_from=1)

    assert ready["last_seq"] == 1
    assert await communicator.receive_nothing(timeout=0.2)


async def test_messages_before_hello_are_refused(connect):
    communicator = await connect()

    await communicator.send_json_to({"type": "ping"})
    error = await communicator.receive_json_from(timeout=TIMEOUT)
    await communicator.send_to(bytes_data=SILENCE_FRAME)

    assert error["code"] == "hello_required"
    assert await communicator.receive_nothing(timeout=0.2)  # throttled: once a second


async def test_ping_pong(connect):
    communicator = await connect()
    await hello(communicator, resume_from=1)

    await communicator.send_json_to({"type": "ping", "t": 12345.5})
    pong = await communicator.receive_json_from(timeout=TIMEOUT)
    await communicator.send_json_to({"type": "ping"})
    bare = await communicator.receive_json_from(timeout=TIMEOUT)

    assert pong == {"type": "pong", "t": 12345.5}
    assert bare == {"type": "pong", "t": None}


async def test_protocol_errors_keep_the_socket_open(connect):
    communicator = await connect()
    await hello(communicator, resume_from=1)

    await communicator.send_to(text_data="{nope")
    assert (await communicator.receive_json_from(timeout=TIMEOUT))["code"] == "bad_json"
    await communicator.send_to(bytes_data=b"\x00")
    assert (await communicator.receive_json_from(timeout=TIMEOUT))["code"] == "bad_audio_frame"
    await communicator.send_json_to({"type": "text", "text": "  "})
    assert (await communicator.receive_json_from(timeout=TIMEOUT))["code"] == "bad_message"

    await communicator.send_json_to({"type": "ping", "t": 1})
    assert (await communicator.receive_json_from(timeout=TIMEOUT))["type"] == "pong"


# --- A typed turn ---------------------------------------------------------------------------


async def test_typed_text_is_stored_shown_and_answered_with_text_and_audio(
    conversation, connect, live_worker
):
    # given
    communicator = await connect()
    await hello(communicator, resume_from=1)

    # when
    await communicator.send_json_to({"type": "text", "text": "  What is the time?  "})

    # then the typed turn comes back as a final transcript
    final = await communicator.receive_json_from(timeout=TIMEOUT)
    assert final["type"] == "transcript.final"
    assert (final["seq"], final["text"], final["source"], final["utterance_id"]) == (
        2,
        "What is the time?",
        "text",
        None,
    )
    # then the reply streams, is spoken sentence by sentence, and is stored
    events, audio = await reply_turn(communicator)
    deltas = [e for e in events if e["type"] == "reply.delta"]
    [done] = [e for e in events if e["type"] == "reply.done"]
    starts = [e for e in events if e["type"] == "reply.audio.start"]
    assert len(deltas) > 3
    assert "".join(d["text"] for d in deltas) == done["text"]
    assert 'You said: "What is the time?"' in done["text"]
    assert {d["reply_id"] for d in deltas} == {done["reply_id"]}
    assert (done["seq"], done["status"]) == (3, "complete")
    assert done["audio_parts"] >= 1
    assert [s["index"] for s in starts] == list(range(done["audio_parts"]))
    assert all(s["bytes"] > 0 and s["engine"] == "espeak" for s in starts)
    assert sum(len(chunk) for chunk in audio) == sum(s["bytes"] for s in starts)
    assert events.index(deltas[0]) < events.index(done)

    stored = await sync_to_async(
        lambda: list(
            Message.objects.filter(conversation=conversation).values_list(
                "seq", "role", "source", "status"
            )
        )
    )()
    assert stored == [
        (1, "assistant", "greeting", "complete"),
        (2, "user", "text", "complete"),
        (3, "assistant", "llm", "complete"),
    ]
    assert (await sync_to_async(usage_of)(conversation.user))[1] > 0


async def test_a_second_socket_sees_the_turn_too(conversation, connect, live_worker):
    speaker, listener = await connect(), await connect()
    await hello(speaker, resume_from=1)
    await hello(listener, resume_from=1)

    await speaker.send_json_to({"type": "text", "text": "Hello both"})

    seen = []
    while not seen or seen[-1]["type"] != "reply.done":
        output = await listener.receive_output(timeout=TIMEOUT)
        if output.get("text"):
            seen.append(json.loads(output["text"]))
    assert seen[0]["type"] == "transcript.final" and seen[0]["text"] == "Hello both"
    assert seen[-1]["seq"] == 3
    await reply_turn(speaker)


async def test_text_over_quota_is_refused_and_not_stored(conversation, connect, user):
    def use_it_all():
        user.tokens_quota = 10
        user.save(update_fields=["tokens_quota"])
        usage_set(user, tokens=10)

    await sync_to_async(use_it_all)()
    communicator = await connect()
    await hello(communicator, resume_from=1)

    await communicator.send_json_to({"type": "text", "text": "anyone there?"})

    error = await communicator.receive_json_from(timeout=TIMEOUT)
    assert error["code"] == "quota_exceeded"
    assert await communicator.receive_nothing(timeout=0.3)
    assert await sync_to_async(Message.objects.count)() == 1


# --- Audio in ---------------------------------------------------------------------------------


async def speak_sentence(conversation, connect, settings, enqueue):
    """Stream a spoken sentence (and 1 s of silence) to a greeted socket whose
    STT jobs go to the `enqueue` mock; return the socket, its events and the jobs."""
    settings.AUDIO_RATE_BURST_S = 10
    communicator = await connect()
    await hello(communicator, resume_from=1)
    pcm = pcm_of("speechbrain_spk1_snt1.wav") + bytes(1000 * BYTES_PER_MS)
    for offset in range(0, len(pcm), len(SILENCE_FRAME)):
        await communicator.send_to(bytes_data=pcm[offset : offset + len(SILENCE_FRAME)])
    events = await settle(communicator)
    return communicator, pcm, events, [call.kwargs for call in enqueue.call_args_list]


async def test_a_spoken_sentence_opens_and_closes_an_utterance_and_queues_a_candidate(
    conversation, connect, settings
):
    # when a clip arrives in 100 ms frames (STT jobs recorded instead of run)
    with mock.patch("apps.realtime.speech.enqueue") as enqueue:
        communicator, pcm, events, _ = await speak_sentence(
            conversation, connect, settings, enqueue
        )
        await communicator.disconnect()
    jobs = [call.kwargs for call in enqueue.call_args_list]

    # then one utterance opened and closed
    assert [e["type"] for e in events] == ["speech.start", "speech.end"]
    start, end = events
    assert start["utterance_id"] == end["utterance_id"]
    assert end["reason"] == "silence"
    # one partial once STT_FIRST_PARTIAL_MS of audio is buffered (no second one while it
    # is in flight: its transcript.partial never comes back here); a candidate at each
    # pause, on the final's queue; the last pause became the end
    purposes = [job["purpose"] for job in jobs]
    assert purposes[0] == "partial" and jobs[0]["queue"] == "stt_partial"
    first_ms = settings.STT_FIRST_PARTIAL_MS
    assert first_ms * BYTES_PER_MS <= jobs[0]["end_byte"] < (first_ms + 200) * BYTES_PER_MS
    candidates = [job for job in jobs if job["purpose"] == "candidate"]
    assert candidates and all(job["queue"] == "stt" for job in candidates)
    last = candidates[-1]
    assert (last["conversation_id"], last["utterance_id"]) == (
        str(conversation.id),
        start["utterance_id"],
    )
    buffered = audio_store().read(utterance_key(str(conversation.id), start["utterance_id"]))
    assert len(buffered) == end["duration_ms"] * BYTES_PER_MS
    silence_after_pause = settings.VAD_END_SILENCE_MS - settings.VAD_PAUSE_MS
    assert len(buffered) - last["end_byte"] == silence_after_pause * BYTES_PER_MS
    assert 2000 * BYTES_PER_MS < len(buffered) < len(pcm)
    assert buffered == pcm[last["start_ms"] * BYTES_PER_MS :][: len(buffered)]
    # the socket closed while the final waited for the candidate: a fresh final is queued
    assert purposes[-1] == "final" and jobs[-1]["speech_end_at"] is not None


async def test_the_candidate_at_the_pause_becomes_the_final(conversation, connect, settings):
    # given an utterance that ended after a pause, its candidate still out
    with mock.patch("apps.realtime.speech.enqueue") as enqueue:
        communicator, _, _, jobs = await speak_sentence(conversation, connect, settings, enqueue)
        candidate = [job for job in jobs if job["purpose"] == "candidate"][-1]

        # when the worker hands the candidate back (and an older, stale one)
        for end_byte in (candidate["end_byte"] - 3200, candidate["end_byte"]):
            await get_channel_layer().group_send(
                f"conversation.{conversation.id}",
                {
                    "type": "transcript.candidate",
                    "utterance_id": candidate["utterance_id"],
                    "end_byte": end_byte,
                    "text": f"The child almost hurt the dog {end_byte}.",
                    "confidence": 0.9,
                    "provider": "faster_whisper",
                },
            )

        # then the current one is stored and pushed as the final, with no second transcription
        final = json.loads(await communicator.receive_from(timeout=5))
        await communicator.disconnect()
    assert final["type"] == "transcript.final"
    assert final["text"] == f"The child almost hurt the dog {candidate['end_byte']}."
    stored = await sync_to_async(Message.objects.get)(pk=final["message_id"])
    assert stored.speech_end_to_final_ms is not None and stored.source == "voice"
    assert [job["purpose"] for job in jobs].count("final") == 0
    assert "final" not in [call.kwargs["purpose"] for call in enqueue.call_args_list]


async def test_without_a_candidate_in_time_a_fresh_final_is_queued(conversation, connect, settings):
    settings.STT_CANDIDATE_WAIT_S = 0.2
    with mock.patch("apps.realtime.speech.enqueue") as enqueue:
        communicator, *_ = await speak_sentence(conversation, connect, settings, enqueue)
        for _ in range(50):  # the candidate wait (0.2 s), then the final once its audio is stored
            await asyncio.sleep(0.1)
            purposes = [call.kwargs["purpose"] for call in enqueue.call_args_list]
            if "final" in purposes:
                break
        await communicator.disconnect()
    assert purposes[-1] == "final" and purposes.count("final") == 1


async def test_an_audio_flood_is_rate_limited_with_one_error(connect, settings):
    communicator = await connect()
    await hello(communicator, resume_from=1)
    await settle(communicator)

    for _ in range(int(settings.AUDIO_RATE_BURST_S * 10) + 20):  # 2 s more than the burst
        await communicator.send_to(bytes_data=SILENCE_FRAME)
    sent_back = await settle(communicator)

    assert [e["code"] for e in sent_back] == ["rate_limited"]  # throttled: once a second


# --- Query budgets on the hot path --------------------------------------------------------------

# Measured 16 on SQLite: quota check 1; text_message_add 4 (BEGIN, seq select + update,
# insert); reply_prepare 7 (persona, history, BEGIN, seq select + update, insert); first
# audio timing 1; reply_finish 4 (BEGIN, select, update, usage update). COMMITs are not
# cursor statements. A little headroom, no more.
TEXT_TURN_QUERY_BUDGET = 18


async def test_streaming_silence_runs_no_queries(connect, settings):
    # given a greeted socket (burst room for 3 s sent at once)
    settings.AUDIO_RATE_BURST_S = 5
    communicator = await connect()
    await hello(communicator, resume_from=1)
    await settle(communicator)  # hello's work is over

    # when 3 s of silence arrive
    with QueryCounter() as queries:
        for _ in range(30):
            await communicator.send_to(bytes_data=SILENCE_FRAME)
        sent_back = await settle(communicator)

    # then
    assert sent_back == []  # no error (rate limit, frame checks) and no speech.start
    assert len(queries) == 0, queries.report()


async def test_the_query_counter_sees_queries_on_other_threads(connect):
    """The budget tests would pass vacuously if the counter missed the consumer's threads."""
    communicator = await connect()

    with QueryCounter() as queries:
        await hello(communicator)
        await communicator.receive_json_from(timeout=TIMEOUT)  # the greeting

    assert len(queries) >= 1
    assert all(thread != threading.current_thread().name for thread, _ in queries.statements)


async def test_a_typed_turn_stays_within_its_query_budget(connect, live_worker):
    communicator = await connect()
    await hello(communicator, resume_from=1)
    await settle(communicator)

    with QueryCounter() as queries:
        await communicator.send_json_to({"type": "text", "text": "Count my queries please."})
        await communicator.receive_json_from(timeout=TIMEOUT)  # transcript.final
        await reply_turn(communicator)
        await asyncio.sleep(0.2)  # anything late (first-audio timing) is counted too

    assert len(queries) <= TEXT_TURN_QUERY_BUDGET, queries.report()
