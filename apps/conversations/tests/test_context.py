"""The context cache (context.py): persona, conversation and history reads
come from it, every write keeps it right (or makes the next read a miss, never
a stale hit), and a failing cache leaves the database to answer."""

import subprocess
import sys
import textwrap
import time
import uuid
from unittest import mock

import pytest
from django.core.cache import caches
from django.db import connection
from django.test.utils import CaptureQueriesContext

from apps.accounts.tests.factories import UserFactory
from apps.conversations import context
from apps.conversations.context import READS, Turn
from apps.conversations.services import (
    conversation_delete,
    conversation_start,
    message_edit,
    reply_begin,
    reply_finish,
    text_message_add,
    transcript_finalize,
)
from apps.personas.services import persona_save
from apps.personas.tests.factories import PersonaFactory
from tests.live import ROOT, services_mode, subprocess_env

from .factories import ConversationFactory, MessageFactory

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def in_memory_layer(settings):
    # The services publish after commit; these tests check the cache, not the transport
    # (and a Redis layer used from this test's threads would outlive their loops).
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}


def reads(kind: str, result: str) -> float:
    return READS.labels(kind, result)._value.get()


class Reads:
    """How many reads of each result happened inside the block."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __enter__(self) -> "Reads":
        self.before = {r: reads(self.kind, r) for r in ("hit", "miss", "error")}
        return self

    def __exit__(self, *exc) -> None:
        self.counts = {r: reads(self.kind, r) - n for r, n in self.before.items()}


def queries_of(run) -> list[str]:
    with CaptureQueriesContext(connection) as captured:
        run()
    return [q["sql"] for q in captured.captured_queries if q["sql"].startswith("SELECT")]


def history(conversation, through_seq=0) -> list[tuple]:
    return [
        tuple(t)
        for t in context.history_turns(conversation_id=conversation.id, through_seq=through_seq)
    ]


@pytest.fixture
def conversation():
    persona = PersonaFactory(greeting="Hi there.", system_prompt="Be brief.")
    return conversation_start(user=UserFactory(), persona=persona)


def finish(reply, text="Sure."):
    return reply_finish(
        reply=reply,
        text=text,
        status="complete",
        prompt_tokens=1,
        completion_tokens=1,
        final_to_first_token_ms=1,
        reply_total_ms=2,
    )


# --- Persona and conversation -------------------------------------------------------------


def test_a_started_conversation_is_read_from_the_cache_with_no_query(conversation):
    with Reads("conversation") as conv, Reads("persona") as persona:
        selects = queries_of(lambda: context.conversation_context(conversation_id=conversation.id))
        found = context.conversation_context(conversation_id=conversation.id)

    assert selects == []
    assert (conv.counts["hit"], persona.counts["hit"]) == (2, 2)
    assert (found.user_id, found.persona.pk) == (conversation.user_id, conversation.persona_id)
    assert found.persona.system_prompt == "Be brief."


def test_a_conversation_the_cache_lacks_is_read_once_then_cached():
    made = ConversationFactory()  # stored behind the services' back: not cached

    with Reads("conversation") as conv:
        first = queries_of(lambda: context.conversation_context(conversation_id=made.id))
        second = queries_of(lambda: context.conversation_context(conversation_id=made.id))

    assert len(first) == 1 and second == []
    assert (conv.counts["miss"], conv.counts["hit"]) == (1, 1)


def test_an_unknown_conversation_is_none_and_a_deleted_one_is_forgotten(conversation):
    assert context.conversation_context(conversation_id=uuid.uuid4()) is None

    context.conversation_context(conversation_id=conversation.id)  # cached
    conversation_delete(conversation=conversation)

    assert context.conversation_context(conversation_id=conversation.id) is None


def test_a_staff_edit_is_written_through_and_used_by_the_next_read(conversation):
    # given a persona in the cache
    persona = context.conversation_context(conversation_id=conversation.id).persona

    # when staff save a change
    persona.system_prompt = "Speak like a sailor."
    persona.llm_model = "gpt-sea"
    persona_save(persona=persona)

    # then the next read has it, with no query
    with Reads("persona") as counted:
        selects = queries_of(lambda: context.persona_of(persona_id=persona.pk))
        fresh = context.persona_of(persona_id=persona.pk)
    assert selects == [] and counted.counts["hit"] == 2
    assert (fresh.system_prompt, fresh.llm_model) == ("Speak like a sailor.", "gpt-sea")


def test_a_reader_that_read_before_the_edit_cannot_overwrite_it(conversation):
    # given a reader that read the persona from the database before an edit...
    persona = conversation.persona
    stale = type(persona).objects.get(pk=persona.pk)
    context.persona_forget(persona_id=persona.pk)
    # ...and an edit, written through on commit
    persona.system_prompt = "New prompt."
    persona_save(persona=persona)

    # when the slow reader caches what it read (readers only add)
    context._persona_add(stale)

    # then the edit stands
    assert context.persona_of(persona_id=persona.pk).system_prompt == "New prompt."


def test_another_process_sees_an_admin_edit_on_its_next_read(conversation):
    """Across processes: only services mode shares the cache between processes
    (embedded defaults run one process, with its own memory)."""
    if not services_mode():
        assert caches["context"].__class__.__name__ == "LocMemCache"
        return
    # given a persona cached, then edited here
    context.persona_of(persona_id=conversation.persona_id)
    persona = conversation.persona
    persona.system_prompt = "Edited in the admin."
    persona_save(persona=persona)

    # when another process reads it
    code = textwrap.dedent(
        f"""
        import django; django.setup()
        from apps.conversations import context
        print(context.persona_of(persona_id="{persona.pk}").system_prompt)
        print(context.READS.labels("persona", "hit")._value.get())
        """
    )
    name = connection.settings_dict["NAME"]
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=subprocess_env(name),
        capture_output=True,
        text=True,
        timeout=120,
    )

    # then it has the edit, from the shared cache
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["Edited in the admin.", "1.0"]


# --- History --------------------------------------------------------------------------------


def test_stored_turns_keep_the_cached_history_up_to_date_with_no_query(conversation):
    cid = conversation.id
    # when turns are stored through the services
    text_message_add(conversation_id=cid, text="typed")
    transcript_finalize(
        conversation_id=cid,
        utterance_id="u1",
        text="spoken",
        confidence=None,
        start_ms=0,
        end_ms=1000,
        speech_end_at=None,
        provider="x",
    )
    reply = reply_begin(conversation_id=cid, provider="echo")  # streaming: not history
    finish(reply, text="An answer.")

    # then the history comes from the cache, complete, in order
    with Reads("history") as counted:
        selects = queries_of(lambda: history(conversation, through_seq=reply.seq - 1))
    assert selects == [] and counted.counts == {"hit": 1, "miss": 0, "error": 0}
    assert history(conversation) == [
        (1, "assistant", "Hi there."),
        (2, "user", "typed"),
        (3, "user", "spoken"),
        (4, "assistant", "An answer."),
    ]


def test_a_turn_stored_behind_the_caches_back_is_seen_by_the_seq_check(conversation):
    # given the history cached, then a turn the cache never heard of (a lost update)
    history(conversation)
    with mock.patch.object(context, "turn_stored"):
        text_message_add(conversation_id=conversation.id, text="unheard")

    # when a reply reserves the next seq and reads the history through the seq before it
    reply = reply_begin(conversation_id=conversation.id, provider="echo")
    with Reads("history") as counted:
        turns = history(conversation, through_seq=reply.seq - 1)

    # then the copy has not seen that turn: a miss, and the database answers
    assert counted.counts["miss"] == 1
    assert turns[-1] == (2, "user", "unheard")


def test_a_writer_behind_another_makes_a_miss_not_a_stale_hit(conversation):
    # given two writers of the same conversation: the first increments the generation,
    # and before it updates the copy the second writer increments it too
    history(conversation)
    second = MessageFactory.build(conversation=conversation, seq=3, text="second")
    cache = caches["context"]
    cache.incr(context._key("history-gen", conversation.id))  # the first writer's increment

    # when the second writer updates (its copy is two generations behind)
    context.turn_stored(message=second)

    # then the copy is not used: a miss
    with Reads("history") as counted:
        history(conversation)
    assert counted.counts["miss"] == 1


def test_a_reader_that_raced_a_write_makes_its_copy_a_miss(conversation):
    # given a reader that read the generation and the database before a turn was stored
    generation_key = context._key("history-gen", conversation.id)
    cache = caches["context"]
    read_generation = cache.get_many([generation_key])[generation_key]
    top, old_turns = context._history_read(conversation.id)
    text_message_add(conversation_id=conversation.id, text="stored meanwhile")

    # when it writes the copy it made (after the writer updated the copy)
    stale_copy = {
        "generation": read_generation,
        "born": time.time(),
        "top": top,
        "turns": old_turns,
    }
    cache.set(context._key("history", conversation.id), stale_copy)

    # then that copy is never used
    assert history(conversation)[-1] == (2, "user", "stored meanwhile")


def test_an_admin_edit_of_a_turn_makes_a_new_copy(conversation):
    typed = text_message_add(conversation_id=conversation.id, text="tpyo")
    history(conversation)

    typed.text = "typo"
    message_edit(message=typed)

    assert history(conversation)[-1] == (2, "user", "typo")


def test_a_copy_older_than_the_ttl_is_not_used(conversation, settings):
    history(conversation)
    settings.CONTEXT_CACHE_TTL_S = 0

    with Reads("history") as counted:
        history(conversation)

    assert counted.counts["miss"] == 1


def test_history_keeps_the_newest_turns_of_a_long_conversation(conversation):
    cid = conversation.id
    for n in range(context.HISTORY_TURNS + 5):
        text_message_add(conversation_id=cid, text=f"turn {n}")

    turns = history(conversation)

    assert len(turns) == context.HISTORY_TURNS
    assert turns[-1] == (context.HISTORY_TURNS + 6, "user", f"turn {context.HISTORY_TURNS + 4}")
    assert [t[0] for t in turns] == sorted(t[0] for t in turns)


# --- A failing cache ------------------------------------------------------------------------


@pytest.fixture
def broken_cache():
    """Every cache call fails, as with Redis down; the breaker is closed again after."""

    class Broken:
        def __getattr__(self, name):
            def fail(*args, **kwargs):
                raise ConnectionError("Redis is down")

            return fail

    context._Breaker.down_until = 0.0
    with mock.patch.object(context, "caches", {context.CACHE_ALIAS: Broken()}):
        yield
    context._Breaker.down_until = 0.0


def test_with_the_cache_down_every_read_falls_back_to_the_database(conversation, broken_cache):
    with Reads("conversation") as conv, Reads("history") as hist:
        found = context.conversation_context(conversation_id=conversation.id)
        turns = history(conversation)
        persona = context.persona_of(persona_id=conversation.persona_id)

    assert found.persona.pk == conversation.persona_id == persona.pk
    assert turns == [(1, "assistant", "Hi there.")]
    assert (conv.counts["error"], hist.counts["error"]) == (1, 1)


def test_with_the_cache_down_turns_are_still_stored(conversation, broken_cache):
    message = text_message_add(conversation_id=conversation.id, text="still stored")
    reply = reply_begin(conversation_id=conversation.id, provider="echo")
    finish(reply)
    persona = conversation.persona
    persona.name = "Renamed"
    persona_save(persona=persona)

    assert (message.seq, reply.seq) == (2, 3)
    assert type(persona).objects.get(pk=persona.pk).name == "Renamed"


def test_after_a_failure_the_cache_is_left_alone_for_a_while(conversation):
    calls = []

    class Broken:
        def get(self, *args, **kwargs):
            calls.append("get")
            raise ConnectionError("Redis is down")

    context._Breaker.down_until = 0.0
    try:
        with mock.patch.object(context, "caches", {context.CACHE_ALIAS: Broken()}):
            for _ in range(3):
                context.persona_of(persona_id=conversation.persona_id)
    finally:
        context._Breaker.down_until = 0.0

    assert calls == ["get"]  # then CACHE_RETRY_S without asking


def test_turn_keys_carry_the_version_and_the_id():
    assert context._key("history", "abc") == f"v{context.VERSION}:history:abc"
    assert Turn(1, "user", "x").text == "x"


def test_a_conversation_of_many_turns_reads_its_context_from_the_cache_alone(conversation):
    """What the benchmark's hit ratio measures: every read of a running conversation
    (socket open, then turn after turn) is a hit."""
    from apps.pipeline.services import reply_prepare

    kinds = ("conversation", "persona", "history")
    before = {(k, r): reads(k, r) for k in kinds for r in ("hit", "miss", "error")}

    context.conversation_context(conversation_id=conversation.id)  # a socket opens
    for n in range(20):
        text_message_add(conversation_id=conversation.id, text=f"question {n}")
        plan = reply_prepare(conversation_id=conversation.id)
        assert plan.request.history[-1].content == f"question {n}"
        finish(plan.message, text=f"answer {n}")

    counts = {key: reads(*key) - n for key, n in before.items()}
    hits = sum(n for (_, result), n in counts.items() if result == "hit")
    assert hits == 1 * 2 + 20 * 3  # conversation and persona at open; all three each turn
    assert sum(counts.values()) == hits  # no miss, no error


def test_a_redis_that_refuses_connections_leaves_the_turn_to_the_database(conversation, settings):
    # given the context cache on a Redis that is not there (nothing listens on port 1)
    settings.CACHES = {
        **settings.CACHES,
        "context": {
            "BACKEND": "django_prometheus.cache.backends.redis.RedisCache",
            "LOCATION": "redis://127.0.0.1:1/0",
            "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.5, "SOCKET_TIMEOUT": 0.5},
        },
    }
    context._Breaker.down_until = 0.0
    from apps.pipeline.services import reply_prepare

    try:
        # when a turn is stored and its reply prepared and stored
        with Reads("conversation") as conv:
            text_message_add(conversation_id=conversation.id, text="are you there?")
            plan = reply_prepare(conversation_id=conversation.id)
            finish(plan.message)
    finally:
        context._Breaker.down_until = 0.0

    # then everything came from the database, and the turn went through
    assert plan.request.history[-1].content == "are you there?"
    assert plan.request.system_prompt == "Be brief."
    assert conv.counts["error"] == 1
