import asyncio
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from unittest import mock

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import IntegrityError, connections, transaction

from apps.accounts.tests.factories import UserFactory, usage_of
from apps.conversations import services
from apps.conversations.models import Conversation, Message, TranscriptSegment
from apps.conversations.selectors import (
    conversation_page_for_user,
    history_for_reply,
    turns_for_resume,
)
from apps.conversations.services import (
    conversation_start,
    message_record_first_audio,
    replay_events,
    reply_begin,
    reply_finish,
    text_message_add,
    transcript_finalize,
)
from apps.personas.tests.factories import PersonaFactory
from apps.realtime.events import group_name

from .factories import ConversationFactory, MessageFactory, TranscriptSegmentFactory

pytestmark = pytest.mark.django_db


class GroupListener:
    """A channel subscribed to a conversation's group on the (in-memory) channel
    layer: what the sockets of that conversation would receive."""

    def __init__(self, conversation_id) -> None:
        self.layer = get_channel_layer()
        self.channel = async_to_sync(self.layer.new_channel)()
        async_to_sync(self.layer.group_add)(group_name(conversation_id), self.channel)

    def drain(self) -> list[dict]:
        async def receive_all() -> list[dict]:
            received = []
            while True:
                try:
                    received.append(await asyncio.wait_for(self.layer.receive(self.channel), 0.05))
                except TimeoutError:
                    return received

        return async_to_sync(receive_all)()


@pytest.fixture(autouse=True)
def clean_layer(settings):
    # Listen on an in-memory layer in both test modes: these tests check what the
    # services publish, not the transport (the e2e tests cover Redis).
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    yield
    async_to_sync(get_channel_layer().flush)()


@pytest.fixture
def conversation():
    return ConversationFactory()


@pytest.fixture
def listener(conversation):
    return GroupListener(conversation.id)


def last_seq(conversation) -> int:
    seqs = Message.objects.filter(conversation=conversation).values_list("seq", flat=True)
    return max(seqs, default=0)


def conversation_list_for_user(*, user, query=""):
    return conversation_page_for_user(user=user, query=query, size=50).items


def finalize(conversation, utterance_id="utt-1", text="Hello there", **overrides):
    return transcript_finalize(
        **{
            "conversation_id": conversation.id,
            "utterance_id": utterance_id,
            "text": text,
            "confidence": 0.9,
            "start_ms": 1000,
            "end_ms": 2500,
            "speech_end_at": None,
            "provider": "faster_whisper",
            **overrides,
        }
    )


def finish(message, *, status=Message.Status.COMPLETE, text="Fine, thanks.", **overrides):
    return reply_finish(
        **{
            "reply": message,
            "text": text,
            "status": status,
            "prompt_tokens": 30,
            "completion_tokens": 12,
            "final_to_first_token_ms": 120,
            "reply_total_ms": 900,
            **overrides,
        }
    )


# --- conversation_start -----------------------------------------------------------------


def test_conversation_start_stores_the_greeting_as_seq_1():
    persona = PersonaFactory(greeting="Ahoy!")

    conversation = conversation_start(user=UserFactory(), persona=persona)

    greeting = conversation.messages.get()
    assert (greeting.seq, greeting.role, greeting.source, greeting.status, greeting.text) == (
        1,
        "assistant",
        "greeting",
        "complete",
        "Ahoy!",
    )
    assert last_seq(conversation) == 1


# --- transcript_finalize ------------------------------------------------------------------


def test_transcript_finalize_stores_message_and_segment_with_the_next_seq(
    conversation, listener, django_capture_on_commit_callbacks
):
    # given two stored turns
    MessageFactory(conversation=conversation)
    MessageFactory(conversation=conversation)

    # when
    with django_capture_on_commit_callbacks(execute=True):
        message = finalize(
            conversation, text="  What's the weather?  ", speech_end_at=time.time() - 0.25
        )

    # then
    assert (message.seq, message.role, message.source, message.text) == (
        3,
        "user",
        "voice",
        "What's the weather?",
    )
    assert message.provider == "faster_whisper"
    assert 250 <= message.speech_end_to_final_ms < 10_000
    segment = TranscriptSegment.objects.get()
    assert segment.message == message
    assert (segment.seq, segment.utterance_id, segment.start_ms, segment.end_ms) == (
        3,
        "utt-1",
        1000,
        2500,
    )
    assert (segment.text, segment.confidence) == ("What's the weather?", 0.9)
    assert last_seq(conversation) == 3


def test_transcript_finalize_counts_the_audio_seconds(conversation):
    finalize(conversation, start_ms=1000, end_ms=3750)

    assert usage_of(conversation.user)[0] == pytest.approx(2.75)


def test_transcript_final_is_published_only_after_commit(
    conversation, listener, django_capture_on_commit_callbacks
):
    # when
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        message = finalize(conversation, speech_end_at=time.time())
        # then: not before the commit
        assert listener.drain() == []
    assert len(callbacks) == 2  # the context cache's update, then the event

    # then: after it
    [published] = listener.drain()
    assert published["type"] == "transcript.final"
    assert published["utterance_id"] == "utt-1"
    assert published["seq"] == message.seq
    assert published["text"] == "Hello there"
    assert published["source"] == "voice"
    assert published["message_id"] == str(message.id)
    assert published["speech_end_to_final_ms"] == message.speech_end_to_final_ms


def test_nothing_is_published_when_the_transaction_rolls_back(
    conversation, listener, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        with pytest.raises(RuntimeError), transaction.atomic():
            finalize(conversation)
            raise RuntimeError("something after it failed")

    assert callbacks == []
    assert listener.drain() == []
    assert not Message.objects.exists()


def test_transcript_finalize_twice_changes_and_publishes_nothing(
    conversation, listener, django_capture_on_commit_callbacks
):
    # given
    with django_capture_on_commit_callbacks(execute=True):
        first = finalize(conversation)
    listener.drain()

    # when the same utterance is finalized again (a retried task)
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        second = finalize(conversation, text="a different transcript", end_ms=9000)

    # then
    assert second == first
    assert Message.objects.count() == 1
    assert TranscriptSegment.objects.count() == 1
    assert callbacks == []
    assert listener.drain() == []
    assert last_seq(conversation) == 1
    assert usage_of(conversation.user)[0] == pytest.approx(1.5)  # counted once


@pytest.mark.parametrize("text", ["", "   \n "])
def test_empty_transcript_stores_nothing_and_publishes_transcript_empty(
    conversation, listener, django_capture_on_commit_callbacks, text
):
    with django_capture_on_commit_callbacks(execute=True):
        result = finalize(conversation, text=text)

    assert result is None
    assert not Message.objects.exists()
    assert not TranscriptSegment.objects.exists()
    assert last_seq(conversation) == 0
    assert listener.drain() == [{"type": "transcript.empty", "utterance_id": "utt-1"}]


def test_events_go_only_to_their_conversations_group(
    conversation, listener, django_capture_on_commit_callbacks
):
    other = ConversationFactory()

    with django_capture_on_commit_callbacks(execute=True):
        finalize(other)

    assert listener.drain() == []


# --- text_message_add ---------------------------------------------------------------------


def test_text_message_add_stores_and_publishes_a_final(
    conversation, listener, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        message = text_message_add(conversation_id=conversation.id, text="Typed words")

    assert (message.seq, message.role, message.source, message.text) == (
        1,
        "user",
        "text",
        "Typed words",
    )
    assert not TranscriptSegment.objects.exists()
    [published] = listener.drain()
    assert published == {
        "type": "transcript.final",
        "utterance_id": None,
        "seq": 1,
        "text": "Typed words",
        "source": "text",
        "message_id": str(message.id),
    }


# --- reply_begin / reply_finish ----------------------------------------------------------


def test_reply_begin_reserves_a_seq_and_publishes_nothing(
    conversation, listener, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        reply = reply_begin(conversation_id=conversation.id, provider="echo")

    assert (reply.seq, reply.role, reply.source, reply.status, reply.text) == (
        1,
        "assistant",
        "llm",
        "streaming",
        "",
    )
    assert reply.provider == "echo"
    assert callbacks == []
    assert listener.drain() == []


def test_reply_finish_complete_stores_the_reply_counts_tokens_and_publishes_done(
    conversation, listener, django_capture_on_commit_callbacks
):
    # given
    reply = reply_begin(conversation_id=conversation.id, provider="echo")

    # when
    with django_capture_on_commit_callbacks(execute=True):
        finish(reply, audio_parts=2)

    # then
    reply.refresh_from_db()
    assert (reply.status, reply.text, reply.prompt_tokens, reply.completion_tokens) == (
        "complete",
        "Fine, thanks.",
        30,
        12,
    )
    assert (reply.final_to_first_token_ms, reply.reply_total_ms) == (120, 900)
    assert usage_of(conversation.user)[1] == 42
    [published] = listener.drain()
    assert published["type"] == "reply.done"
    assert (published["reply_id"], published["seq"], published["text"]) == (
        str(reply.id),
        reply.seq,
        "Fine, thanks.",
    )
    assert (published["status"], published["audio_parts"], published["error_code"]) == (
        "complete",
        2,
        "",
    )


def test_reply_finish_interrupted_keeps_the_partial_text_and_publishes_interrupted(
    conversation, listener, django_capture_on_commit_callbacks
):
    reply = reply_begin(conversation_id=conversation.id, provider="echo")

    with django_capture_on_commit_callbacks(execute=True):
        finish(
            reply,
            status=Message.Status.INTERRUPTED,
            text="Well, I",
            prompt_tokens=30,
            completion_tokens=2,
        )

    reply.refresh_from_db()
    assert (reply.status, reply.text) == ("interrupted", "Well, I")
    assert usage_of(conversation.user)[1] == 32
    [published] = listener.drain()
    assert published["type"] == "reply.interrupted"
    assert (published["seq"], published["text"], published["status"]) == (
        reply.seq,
        "Well, I",
        "interrupted",
    )


def test_reply_finish_failed_publishes_done_with_the_error_code(
    conversation, listener, django_capture_on_commit_callbacks
):
    reply = reply_begin(conversation_id=conversation.id, provider="openai")

    with django_capture_on_commit_callbacks(execute=True):
        finish(
            reply,
            status=Message.Status.FAILED,
            text="",
            prompt_tokens=0,
            completion_tokens=0,
            error_code="llm_timeout",
        )

    [published] = listener.drain()
    assert (published["type"], published["status"], published["error_code"]) == (
        "reply.done",
        "failed",
        "llm_timeout",
    )


def test_reply_finish_stores_the_first_audio_timing_that_came_before_the_end(conversation):
    reply = reply_begin(conversation_id=conversation.id, provider="echo")

    finish(reply, first_token_to_first_audio_ms=240)

    reply.refresh_from_db()
    assert reply.first_token_to_first_audio_ms == 240


def test_a_first_audio_timing_stored_on_its_own_is_kept_by_reply_finish(conversation):
    # given a first audio that came while the reply was being stored
    reply = reply_begin(conversation_id=conversation.id, provider="echo")
    message_record_first_audio(message_id=reply.id, first_token_to_first_audio_ms=310)

    # when the reply is stored without one
    finish(reply)

    # then
    reply.refresh_from_db()
    assert reply.first_token_to_first_audio_ms == 310


def test_reply_finish_of_an_unknown_reply_raises(conversation):
    ghost = Message(id=uuid.uuid4(), conversation=conversation, seq=99)

    with pytest.raises(Message.DoesNotExist):
        finish(ghost)


def test_a_seq_taken_by_a_concurrent_writer_is_stored_again_with_the_next(conversation):
    # given another writer that stored seq 1 while this one's INSERT picked 1 too
    # (Postgres: neither saw the other's row), so the unique constraint refused it
    MessageFactory(conversation=conversation, text="the other writer")
    real_insert = services._turn_insert
    calls = []

    def raced(message):
        if not calls:
            calls.append("raced")
            cause = Exception("duplicate key")  # what psycopg raises names the constraint
            cause.diag = SimpleNamespace(constraint_name="message_unique_seq")  # type: ignore[attr-defined]
            raise IntegrityError("duplicate key") from cause
        return real_insert(message)

    with mock.patch.object(services, "_turn_insert", raced):
        message = text_message_add(conversation_id=conversation.id, text="mine")

    assert message.seq == 2 and calls == ["raced"]
    assert last_seq(conversation) == 2


@pytest.mark.django_db(transaction=True)
def test_writers_at_once_get_distinct_seqs_in_order():
    # given one conversation and eight writers (threads, each its own connection)
    conversation = ConversationFactory()
    start = threading.Barrier(8)

    def writer(n: int) -> list[int]:
        try:
            start.wait(timeout=30)
            return [
                text_message_add(conversation_id=conversation.id, text=f"{n}-{i}").seq
                for i in range(3)
            ]
        finally:
            connections.close_all()

    # when they all store turns at once (on Postgres they pick the same seqs and the
    # unique constraint sends all but one to store again)
    with ThreadPoolExecutor(8) as pool:
        seqs = [seq for got in pool.map(writer, range(8)) for seq in got]

    # then every turn has its own seq, 1 to 24, each writer's in its own order
    assert sorted(seqs) == list(range(1, 25))
    assert last_seq(conversation) == 24


def test_any_other_integrity_error_is_not_retried(conversation):
    with (
        pytest.raises(IntegrityError),
        mock.patch.object(
            services, "_turn_insert", side_effect=IntegrityError("something else")
        ) as insert,
    ):
        text_message_add(conversation_id=conversation.id, text="x")

    assert insert.call_count == 1


def test_token_usage_adds_up_across_replies(conversation):
    for _ in range(3):
        finish(reply_begin(conversation_id=conversation.id, provider="echo"))

    assert usage_of(conversation.user)[1] == 3 * 42


# --- seq ---------------------------------------------------------------------------------


def test_seqs_are_unique_and_increasing_across_mixed_calls():
    # given
    conversation = conversation_start(user=UserFactory(), persona=PersonaFactory(greeting="Hi!"))
    cid = conversation.id

    # when
    made = [
        text_message_add(conversation_id=cid, text="typed"),
        (first_reply := reply_begin(conversation_id=cid, provider="echo")),
        finalize(conversation, utterance_id="u1", text="spoken"),
        reply_begin(conversation_id=cid, provider="echo"),
        finalize(conversation, utterance_id="u2", text="spoken again"),
    ]
    finish(first_reply)
    finalize(conversation, utterance_id="u1", text="retried")  # changes nothing
    finalize(conversation, utterance_id="u3", text="")  # stores nothing

    # then
    assert [message.seq for message in made] == [2, 3, 4, 5, 6]
    seqs = list(Message.objects.filter(conversation=conversation).values_list("seq", flat=True))
    assert seqs == [1, 2, 3, 4, 5, 6]
    assert last_seq(conversation) == 6


def test_seqs_are_per_conversation(conversation):
    other = ConversationFactory()

    text_message_add(conversation_id=conversation.id, text="one")
    message = text_message_add(conversation_id=other.id, text="other")

    assert message.seq == 1


# --- replay_events / turns_for_resume ----------------------------------------------------


@pytest.fixture
def stored_turns(conversation):
    """greeting(1), typed(2), reply(3), spoken(4), interrupted reply(5), streaming reply(6)."""
    MessageFactory(conversation=conversation, role="assistant", source="greeting", text="Hi!")
    MessageFactory(conversation=conversation, text="typed")
    MessageFactory(conversation=conversation, role="assistant", source="llm", text="reply one")
    TranscriptSegmentFactory(
        message__conversation=conversation, utterance_id="u-spoken", message__text="spoken"
    )
    MessageFactory(
        conversation=conversation,
        role="assistant",
        source="llm",
        status="interrupted",
        text="reply t",
    )
    MessageFactory(
        conversation=conversation, role="assistant", source="llm", status="streaming", text=""
    )
    return conversation


def seqs_after(conversation, seq: int) -> list[int]:
    return [m.seq for m in turns_for_resume(conversation_id=conversation.id, seq=seq)[0]]


def test_turns_for_resume_excludes_streaming_replies_and_earlier_seqs(stored_turns):
    assert seqs_after(stored_turns, 0) == [1, 2, 3, 4, 5]
    assert seqs_after(stored_turns, 3) == [4, 5]
    assert seqs_after(stored_turns, 5) == []
    assert seqs_after(stored_turns, 99) == []


def test_turns_for_resume_finds_the_last_turn_streaming_or_not(
    stored_turns, django_assert_num_queries
):
    # the last turn is the streaming reply (6), whatever the client has seen
    for seq in (0, 5, 6):
        with django_assert_num_queries(1):  # one query when seq is not past the last turn
            _, last = turns_for_resume(conversation_id=stored_turns.id, seq=seq)
        assert (last.seq, last.status) == (6, "streaming")
    with django_assert_num_queries(2):  # past it (a client from elsewhere): a second query
        assert turns_for_resume(conversation_id=stored_turns.id, seq=99)[1].seq == 6
    assert turns_for_resume(conversation_id=ConversationFactory().id, seq=0) == ([], None)


def test_turns_for_resume_only_reads_its_conversation(stored_turns):
    MessageFactory(conversation=ConversationFactory())

    assert len(seqs_after(stored_turns, 0)) == 5


def test_replay_events_in_seq_order_marked_replayed(stored_turns, django_assert_num_queries):
    # given
    with django_assert_num_queries(1):  # the segment comes with its message
        messages, _ = turns_for_resume(conversation_id=stored_turns.id, seq=0)
        # when
        events = replay_events(messages=messages)

    # then
    assert [(e["type"], e["seq"]) for e in events] == [
        ("reply.done", 1),
        ("transcript.final", 2),
        ("reply.done", 3),
        ("transcript.final", 4),
        ("reply.interrupted", 5),
    ]
    assert all(e["replayed"] is True for e in events)
    assert [e["text"] for e in events] == ["Hi!", "typed", "reply one", "spoken", "reply t"]
    assert events[0]["source"] == "greeting"
    assert (events[1]["source"], events[1]["utterance_id"]) == ("text", None)
    assert (events[3]["source"], events[3]["utterance_id"]) == ("voice", "u-spoken")
    assert events[4]["status"] == "interrupted"


def test_replay_events_of_nothing_is_nothing():
    assert replay_events(messages=[]) == []


# --- history_for_reply ----------------------------------------------------------------------


def test_history_for_reply_keeps_the_newest_turns_within_the_budget_oldest_first(conversation):
    # given six turns of 40 characters: each costs 40 // 4 + 4 = 14 tokens
    for n in range(6):
        MessageFactory(
            conversation=conversation,
            role="user" if n % 2 == 0 else "assistant",
            text=f"turn {n} ".ljust(40, "."),
        )

    # when / then
    picked = history_for_reply(conversation_id=conversation.id, budget_tokens=3 * 14)
    assert [m.seq for m in picked] == [4, 5, 6]
    picked = history_for_reply(conversation_id=conversation.id, budget_tokens=3 * 14 - 1)
    assert [m.seq for m in picked] == [5, 6]
    picked = history_for_reply(conversation_id=conversation.id, budget_tokens=10_000)
    assert [m.seq for m in picked] == [1, 2, 3, 4, 5, 6]
    assert [m.role for m in picked[:2]] == ["user", "assistant"]


def test_history_for_reply_always_has_the_latest_turn_even_over_budget(conversation):
    MessageFactory(conversation=conversation, text="old")
    latest = MessageFactory(conversation=conversation, text="x" * 4000)

    picked = history_for_reply(conversation_id=conversation.id, budget_tokens=10)

    assert [turn.seq for turn in picked] == [latest.seq]


def test_history_for_reply_skips_streaming_and_empty_turns(conversation):
    said = MessageFactory(conversation=conversation, text="said")
    MessageFactory(
        conversation=conversation, role="assistant", source="llm", status="interrupted", text=""
    )
    reply_begin(conversation_id=conversation.id, provider="echo")

    picked = history_for_reply(conversation_id=conversation.id, budget_tokens=1000)

    assert picked == [(said.seq, "user", "said")]


# --- conversation_list_for_user -------------------------------------------------------------


def test_conversation_list_for_user_is_only_theirs_newest_first():
    user = UserFactory()
    older = ConversationFactory(user=user)
    newer = ConversationFactory(user=user)
    ConversationFactory()

    listed = list(conversation_list_for_user(user=user))

    assert listed == [newer, older]


def test_conversation_list_search_by_persona_name_and_message_text():
    # given
    user = UserFactory()
    with_rex = ConversationFactory(user=user, persona=PersonaFactory(name="Captain Rex"))
    MessageFactory(conversation=with_rex, text="Tell me about the sea")
    with_ada = ConversationFactory(user=user, persona=PersonaFactory(name="Ada"))
    MessageFactory(conversation=with_ada, text="What is a prime number?")
    MessageFactory(conversation=with_ada, text="And the next prime?")
    foreign = ConversationFactory(persona=with_rex.persona)
    MessageFactory(conversation=foreign, text="prime suspects")

    # then
    assert list(conversation_list_for_user(user=user, query="captain")) == [with_rex]
    assert list(conversation_list_for_user(user=user, query="PRIME")) == [with_ada]  # once
    assert list(conversation_list_for_user(user=user, query="nothing like it")) == []
    assert set(conversation_list_for_user(user=user, query="")) == {with_rex, with_ada}


def test_conversation_list_counts_messages():
    user = UserFactory()
    conversation = ConversationFactory(user=user)
    for _ in range(3):
        MessageFactory(conversation=conversation)
    ConversationFactory(user=user)

    counts = {c.pk: c.message_count for c in conversation_list_for_user(user=user)}

    assert counts == {
        conversation.pk: 3,
        Conversation.objects.exclude(pk=conversation.pk).get().pk: 0,
    }


def test_conversation_list_search_still_counts_every_message():
    user = UserFactory()
    conversation = ConversationFactory(user=user)
    MessageFactory(conversation=conversation, text="the needle")
    MessageFactory(conversation=conversation, text="hay")
    MessageFactory(conversation=conversation, text="more hay")

    [found] = conversation_list_for_user(user=user, query="needle")

    assert found.message_count == 3
