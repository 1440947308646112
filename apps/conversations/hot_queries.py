"""The hot queries, as the code runs them, and their plans (docs/database.md).

`hot_query_plans()` seeds some tens of thousands of rows inside a transaction
that it rolls back, runs every hot path the way a voice turn, a socket and a
page run it (the real services and selectors, with the context cache left out,
so that the reads it saves are there too), captures each statement, and
EXPLAINs it: Postgres's plan (JSON), or SQLite's EXPLAIN QUERY PLAN.
`manage.py explain_hot_queries` prints them; a test asserts that each one uses
an index (apps/conversations/tests/test_hot_queries.py)."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from unittest import mock

from django.db import connection, transaction
from django.shortcuts import get_object_or_404
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from apps.accounts.ledger import seed_read, today
from apps.accounts.models import DailyUsage, User
from apps.accounts.services import usage_days
from apps.personas.models import Persona
from apps.personas.selectors import persona_list_published
from apps.pipeline.services import reply_prepare
from apps.realtime.services import socket_open, socket_resume

from . import context
from .models import Conversation, Message, TranscriptSegment
from .selectors import (
    conversation_page_for_user,
    cost_by_conversation_for_user,
    cost_totals_for_user,
    transcript_page,
)
from .services import (
    message_record_first_audio,
    reply_finish,
    reply_speech_add,
    transcript_finalize,
)

# Enough rows that the planner's choice is the one of a busy database: 4,000 users, one
# with 200 conversations (more than a page), 4,200 conversations, 50,400 turns, and a
# week of daily usage each (28,000 rows).
USERS, BUSY_USER_CONVERSATIONS, TURNS_PER_CONVERSATION = 4000, 200, 12
USAGE_DAYS = 7
PERSONAS, PUBLISHED_EVERY = 2000, 20
DML = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE)\b", re.I)
INDEX_NODES = {"Index Scan", "Index Only Scan", "Bitmap Index Scan"}


@dataclass
class HotQuery:
    path: str  # where it runs: "voice turn: transcript_finalize", ...
    sql: str
    plan: list[str] = field(default_factory=list)  # the plan, one line a node
    scans: list[str] = field(default_factory=list)  # tables read without an index


@dataclass
class Seeded:
    user: User
    conversation: Conversation
    last_seq: int


def _seed() -> Seeded:
    now = timezone.now()
    users = User.objects.bulk_create(
        [User(username=f"hot-{uuid.uuid4().hex[:12]}") for _ in range(USERS)]
    )
    personas = Persona.objects.bulk_create(
        [
            Persona(
                name=f"Hot persona {n:04d}",
                slug=f"hot-{uuid.uuid4().hex[:16]}",
                system_prompt="Answer briefly.",
                is_published=n % PUBLISHED_EVERY == 0,
            )
            for n in range(PERSONAS)
        ]
    )
    owners = [users[0]] * BUSY_USER_CONVERSATIONS + users[1:]
    conversations = Conversation.objects.bulk_create(
        [
            Conversation(
                user=owner,
                persona=personas[n % PERSONAS],
                started_at=now - timedelta(minutes=n),
            )
            for n, owner in enumerate(owners)
        ],
        batch_size=1000,
    )
    messages = Message.objects.bulk_create(
        [
            Message(
                conversation=conversation,
                seq=seq,
                role=Message.Role.USER if seq % 2 else Message.Role.ASSISTANT,
                source=Message.Source.VOICE if seq % 2 else Message.Source.LLM,
                text=f"turn {seq} of a conversation, long enough to look like speech"
                + (" with a needle in it" if n % 97 == 0 and seq == 3 else ""),
            )
            for n, conversation in enumerate(conversations)
            for seq in range(1, TURNS_PER_CONVERSATION + 1)
        ],
        batch_size=2000,
    )
    TranscriptSegment.objects.bulk_create(
        [
            TranscriptSegment(
                conversation_id=message.conversation_id,
                message=message,
                utterance_id=f"u-{message.seq}",
                seq=message.seq,
                start_ms=0,
                end_ms=1000,
                text=message.text,
            )
            for message in messages
            if message.role == Message.Role.USER
        ],
        batch_size=2000,
    )
    DailyUsage.objects.bulk_create(
        [
            DailyUsage(user=user, day=today() - timedelta(days=d), audio_seconds=60, tokens=900)
            for user in users
            for d in range(1, USAGE_DAYS + 1)
        ],
        batch_size=2000,
    )
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    return Seeded(users[0], conversations[0], TURNS_PER_CONVERSATION)


def _paths(seeded: Seeded) -> list[tuple[str, Callable[[], object]]]:
    user, conversation = seeded.user, seeded.conversation
    cid = conversation.id
    reply: dict[str, Message] = {}

    def turn_final() -> None:
        transcript_finalize(
            conversation_id=cid,
            utterance_id="u-new",
            text="a new turn",
            confidence=0.9,
            start_ms=0,
            end_ms=1200,
            speech_end_at=time.time(),
            provider="faster_whisper",
        )

    def turn_prepare() -> None:
        reply["message"] = reply_prepare(conversation_id=cid).message

    def turn_finish() -> None:
        reply_finish(
            reply=reply["message"],
            text="an answer",
            status=Message.Status.COMPLETE,
            prompt_tokens=10,
            completion_tokens=5,
            final_to_first_token_ms=100,
            reply_total_ms=900,
            first_token_to_first_audio_ms=200,
        )

    page = conversation_page_for_user(user=user, size=50)
    cursor = (page.items[-1].started_at, page.items[-1].id)
    return [
        (
            "voice turn: the STT worker's redelivery check (transcribe_window)",
            lambda: TranscriptSegment.objects.filter(
                conversation_id=cid, utterance_id="u-new"
            ).exists(),
        ),
        ("voice turn: transcript_finalize", turn_final),
        ("voice turn: reply_prepare (on a cache miss)", turn_prepare),
        ("voice turn: reply_finish", turn_finish),
        (
            "voice turn: a late first-audio timing (message_record_first_audio)",
            lambda: message_record_first_audio(
                message_id=reply["message"].id, first_token_to_first_audio_ms=300
            ),
        ),
        (
            "voice turn: a TTS part's speech and cost (reply_speech_add, TTS worker)",
            lambda: reply_speech_add(
                reply_id=reply["message"].id, tts_kind="piper", audio_seconds=1.5
            ),
        ),
        (
            "socket open: socket_open (on a cache miss)",
            lambda: socket_open(conversation_id=cid, user=user),
        ),
        (
            "hello: socket_resume, nothing to replay",
            lambda: socket_resume(conversation_id=cid, resume_from=seeded.last_seq + 2),
        ),
        ("hello: socket_resume from 0", lambda: socket_resume(conversation_id=cid, resume_from=0)),
        (
            "quota seed: seed_read (a ledger counter Redis lost)",
            lambda: seed_read(user_id=user.pk, day=today(), kind="tokens"),
        ),
        ("page /accounts/usage/: usage_days", lambda: usage_days(user_id=user.pk, size=14)),
        ("page /: the gallery", lambda: list(persona_list_published())),
        (
            "page /conversations/: history, first page",
            lambda: conversation_page_for_user(user=user, size=50),
        ),
        (
            "page /conversations/?before=: history, next page",
            lambda: conversation_page_for_user(user=user, before=cursor, size=50),
        ),
        (
            "page /conversations/?q=: history search",
            lambda: conversation_page_for_user(user=user, query="needle", size=50),
        ),
        (
            "page /conversations/<id>/transcript/: first page",
            lambda: transcript_page(conversation_id=cid, size=100),
        ),
        (
            "page /conversations/<id>/transcript/?after=",
            lambda: transcript_page(conversation_id=cid, after=8, size=100),
        ),
        (
            "page /accounts/usage/: the user's cost totals",
            lambda: cost_totals_for_user(user_id=user.pk),
        ),
        (
            "page /accounts/usage/: the recent conversations' costs",
            lambda: cost_by_conversation_for_user(user_id=user.pk, size=20),
        ),
        (
            "page /conversations/<id>/: the conversation",
            lambda: get_object_or_404(
                Conversation.objects.select_related("persona"), pk=cid, user=user
            ),
        ),
    ]


@contextmanager
def _without_the_context_cache() -> Iterator[None]:
    """Every context read goes to the database (as on a miss)."""
    with mock.patch.object(context._Breaker, "down_until", float("inf")):
        yield


def _explain(sql: str) -> tuple[list[str], list[str]]:
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(f"EXPLAIN (FORMAT JSON) {sql}")
            raw = cursor.fetchone()[0]
            tree = (json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"]
            lines: list[str] = []
            scans: list[str] = []
            _walk(tree, 0, lines, scans)
            return lines, scans
        cursor.execute(f"EXPLAIN QUERY PLAN {sql}")
        details = [row[-1] for row in cursor.fetchall()] or ["(reads no table)"]
        scans = [d.split()[1] for d in details if d.startswith("SCAN ") and " INDEX " not in d]
        return details, scans


def _walk(node: dict, depth: int, lines: list[str], scans: list[str]) -> None:
    kind = node["Node Type"]
    on = node.get("Relation Name", "")
    index = node.get("Index Name", "")
    cond = node.get("Index Cond") or node.get("Filter") or ""
    text = kind + (f" on {on}" if on else "") + (f" using {index}" if index else "")
    lines.append("  " * depth + text + (f"  [{cond}]" if cond else ""))
    if kind == "Seq Scan":
        scans.append(on)
    for child in node.get("Plans", []):
        _walk(child, depth + 1, lines, scans)


def hot_query_plans() -> list[HotQuery]:
    """Every statement of every hot path, with its plan; nothing is left in the
    database (one transaction, rolled back)."""
    found: list[HotQuery] = []
    with transaction.atomic():
        seeded = _seed()
        with _without_the_context_cache():
            for path, run in _paths(seeded):
                with CaptureQueriesContext(connection) as captured:
                    run()
                for query in captured.captured_queries:
                    sql = query["sql"]
                    if DML.match(sql):
                        plan, scans = _explain(sql)
                        found.append(HotQuery(path, sql, plan, scans))
        transaction.set_rollback(True)
    return found
