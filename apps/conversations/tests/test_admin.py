"""The admin shows what turns used and cost: per turn (the turns list, a
conversation's inline) and per conversation (its list and page), with no query
per row."""

import re
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from apps.accounts.tests.factories import UserFactory

from .factories import ConversationFactory, MessageFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_browser(client):
    client.force_login(UserFactory(username="root", is_staff=True, is_superuser=True))
    return client


def flat(html: str) -> str:
    """The page without the whitespace between tags."""
    return re.sub(r">\s+<", "><", html)


def conversation_costing(*costs_usd: str, **fields):
    conversation = ConversationFactory(**fields)
    for cost in costs_usd:
        MessageFactory(conversation=conversation, cost_usd=Decimal(cost))
    return conversation


def test_the_conversation_list_shows_each_conversations_total_cost(admin_browser):
    # given two conversations with priced turns, and one with none
    talked = conversation_costing("0.00045", "0.03200000", "0.001")
    other = conversation_costing("0.25")
    silent = ConversationFactory()

    # when
    html = admin_browser.get("/admin/conversations/conversation/").content.decode()

    # then each row has its own total
    rows = {
        c.id: html.split(f"/admin/conversations/conversation/{c.id}/change/")[1]
        for c in (talked, other, silent)
    }
    assert '<td class="field-cost_total">0.03345000</td>' in rows[talked.id].split("</tr>")[0]
    assert '<td class="field-cost_total">0.25000000</td>' in rows[other.id].split("</tr>")[0]
    assert '<td class="field-cost_total">0.00000000</td>' in rows[silent.id].split("</tr>")[0]


def test_the_conversation_list_runs_no_query_per_conversation(admin_browser):
    conversation_costing("0.1", "0.2")
    with CaptureQueriesContext(connection) as one:
        assert admin_browser.get("/admin/conversations/conversation/").status_code == 200
    for _ in range(5):
        conversation_costing("0.1", "0.2", "0.3")

    with CaptureQueriesContext(connection) as six:
        html = admin_browser.get("/admin/conversations/conversation/").content.decode()

    assert html.count('<td class="field-cost_total">') == 6
    assert len(six) == len(one), [q["sql"] for q in six.captured_queries]


def test_a_conversation_page_shows_its_total_and_each_turns_cost(admin_browser):
    conversation = ConversationFactory()
    MessageFactory(
        conversation=conversation,
        source="voice",
        stt_audio_seconds=4.5,
        cost_usd=Decimal("0.00045"),
    )
    MessageFactory(
        conversation=conversation,
        role="assistant",
        source="llm",
        prompt_tokens=1000,
        completion_tokens=250,
        tts_audio_seconds=3.0,
        cost_usd=Decimal("0.032"),
    )

    page = admin_browser.get(f"/admin/conversations/conversation/{conversation.id}/change/")
    html = flat(page.content.decode())

    assert '<label>Cost (USD):</label><div class="readonly">0.03245000</div>' in html
    assert '<td class="field-cost_usd"><p>0.00045000</p></td>' in html
    assert '<td class="field-stt_audio_seconds"><p>4.5</p></td>' in html
    assert '<td class="field-tts_audio_seconds"><p>3.0</p></td>' in html
    assert '<td class="field-cost_usd"><p>0.03200000</p></td>' in html


def test_the_turns_list_shows_each_turns_work_and_cost(admin_browser):
    MessageFactory(
        role="assistant",
        source="llm",
        prompt_tokens=1000,
        completion_tokens=250,
        tts_audio_seconds=3.0,
        cost_usd=Decimal("0.032"),
    )

    html = admin_browser.get("/admin/conversations/message/").content.decode()

    assert '<td class="field-prompt_tokens">1000</td>' in html
    assert '<td class="field-completion_tokens">250</td>' in html
    assert '<td class="field-tts_audio_seconds">3.0</td>' in html
    assert '<td class="field-cost_usd">0.03200000</td>' in html


def test_a_search_through_the_turns_keeps_each_total_whole(admin_browser):
    # given a conversation with two turns that both say the word searched
    conversation = ConversationFactory()
    MessageFactory(conversation=conversation, text="the price is right", cost_usd=Decimal("0.25"))
    MessageFactory(conversation=conversation, text="what a price", cost_usd=Decimal("0.5"))
    ConversationFactory()  # says nothing

    html = admin_browser.get("/admin/conversations/conversation/?q=price").content.decode()

    # then it is listed once, with the total of all its turns (not per matching turn)
    assert html.count('<td class="field-cost_total">') == 1
    assert '<td class="field-cost_total">0.75000000</td>' in html
