"""Every hot query uses an index: each statement of every hot path (a voice
turn, a socket's open and hello, the pages), EXPLAINed on this run's database
with tens of thousands of rows (hot_queries.py): Postgres's plans in services
mode, SQLite's query plans on embedded defaults. docs/database.md shows them."""

import io

import pytest
from django.core.management import call_command
from django.db import connection

from apps.conversations.hot_queries import HotQuery, hot_query_plans
from apps.conversations.models import Message

pytestmark = pytest.mark.django_db

# A substring search of what was said: Postgres may read every turn for it (a
# trigram index would serve it, at a cost on every turn's insert; docs/database.md).
SEARCH = "page /conversations/?q=: history search"


def test_every_hot_query_uses_an_index():
    # when every hot path runs on a database of some size
    before = Message.objects.count()
    plans = hot_query_plans()
    assert Message.objects.count() == before  # what it seeded was rolled back

    # then each path ran, each statement was explained...
    paths = {plan.path for plan in plans}
    assert {
        "voice turn: transcript_finalize",
        "voice turn: reply_prepare (on a cache miss)",
        "voice turn: reply_finish",
        "socket open: socket_open (on a cache miss)",
        "hello: socket_resume from 0",
        "page /: the gallery",
        "page /conversations/: history, first page",
        "page /conversations/?before=: history, next page",
        "page /conversations/<id>/transcript/?after=",
        "voice turn: a TTS part's speech and cost (reply_speech_add, TTS worker)",
        "page /accounts/usage/: the user's cost totals",
        "page /accounts/usage/: the recent conversations' costs",
    } <= paths
    assert all(plan.plan for plan in plans)
    # ...and none reads a table without an index
    scanning = [
        (plan.path, plan.scans, plan.plan)
        for plan in plans
        if plan.scans and not (plan.path == SEARCH and connection.vendor == "postgresql")
    ]
    assert scanning == []
    # and the plans name the indexes the migrations made (SQLite names the unique
    # constraints' indexes itself)
    text = "\n".join(line for plan in plans for line in plan.plan)
    indexes = ["conversation_user_recent", "persona_published_by_name"]
    if connection.vendor == "postgresql":
        indexes += ["message_unique_seq", "segment_unique_utterance"]
    for index in indexes:
        assert index in text, index


def test_the_command_prints_each_statement_with_its_plan(monkeypatch):
    found = [
        HotQuery("voice turn: x", "SELECT 1", ["Index Scan on t using i"], []),
        HotQuery("page: y", "SELECT 2", ["Seq Scan on t"], ["t"]),
    ]
    monkeypatch.setattr(
        "apps.conversations.management.commands.explain_hot_queries.hot_query_plans",
        lambda: found,
    )
    out = io.StringIO()

    call_command("explain_hot_queries", stdout=out)

    text = out.getvalue()
    assert "#### voice turn: x (indexed)" in text
    assert "#### page: y (**scans t**)" in text
    assert "```\nIndex Scan on t using i\n```" in text
    assert "```sql\nSELECT 1\n```" in text
