import re
import uuid

import pytest
from django.urls import reverse

from apps.accounts.tests.factories import UserFactory
from apps.conversations import views
from apps.conversations.models import Conversation
from apps.personas.tests.factories import PersonaFactory

from .factories import ConversationFactory, MessageFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def user(client):
    user = UserFactory()
    client.force_login(user)
    return user


def listed(response) -> list:
    return list(response.context["conversations"])


# --- History ---------------------------------------------------------------------------


def test_history_lists_only_the_users_conversations(client, user):
    # given
    mine = ConversationFactory(user=user, persona=PersonaFactory(name="Ada"))
    MessageFactory(conversation=mine)
    MessageFactory(conversation=mine)
    theirs = ConversationFactory(persona=PersonaFactory(name="Somebody Else's"))

    # when
    response = client.get("/conversations/")

    # then
    assert response.status_code == 200
    assert listed(response) == [mine]
    html = response.content.decode()
    assert reverse("transcript", args=[mine.id]) in html
    assert reverse("conversation", args=[mine.id]) in html
    assert str(theirs.id) not in html
    assert "2 messages" in html


def test_history_search_by_persona_or_words(client, user):
    # given
    with_rex = ConversationFactory(user=user, persona=PersonaFactory(name="Captain Rex"))
    with_ada = ConversationFactory(user=user, persona=PersonaFactory(name="Ada"))
    MessageFactory(conversation=with_ada, text="Explain fractions please")
    other = ConversationFactory(persona=with_ada.persona)
    MessageFactory(conversation=other, text="fractions for someone else")

    # then
    assert listed(client.get("/conversations/", {"q": "rex"})) == [with_rex]
    assert listed(client.get("/conversations/", {"q": "fractions"})) == [with_ada]
    response = client.get("/conversations/", {"q": "  walrus  "})
    assert listed(response) == []
    assert response.context["q"] == "walrus"
    assert "No conversations match “walrus”" in response.content.decode()


def test_history_requires_login(client):
    response = client.get("/conversations/")

    assert response.status_code == 302
    assert response.url.startswith(reverse("login"))


# --- Transcript ---------------------------------------------------------------------------


def test_transcript_shows_the_stored_turns_in_order(client, user):
    conversation = ConversationFactory(user=user, persona=PersonaFactory(name="Ada"))
    MessageFactory(
        conversation=conversation, role="assistant", source="greeting", text="Hi, Ada here."
    )
    MessageFactory(conversation=conversation, text="Teach me sums")
    MessageFactory(
        conversation=conversation, role="assistant", source="llm", status="streaming", text=""
    )

    response = client.get(f"/conversations/{conversation.id}/transcript/")

    assert response.status_code == 200
    assert [m.text for m in response.context["messages"]] == ["Hi, Ada here.", "Teach me sums"]
    html = response.content.decode()
    assert html.index("Hi, Ada here.") < html.index("Teach me sums")


def test_transcript_of_another_users_conversation_is_not_found(client, user):
    theirs = ConversationFactory()
    MessageFactory(conversation=theirs, text="private words")

    response = client.get(f"/conversations/{theirs.id}/transcript/")

    assert response.status_code == 404
    assert b"private words" not in response.content


def test_transcript_of_an_unknown_conversation_is_not_found(client, user):
    assert client.get(f"/conversations/{uuid.uuid4()}/transcript/").status_code == 404


# --- Conversation page ---------------------------------------------------------------------


def test_conversation_page_carries_the_ids_the_script_needs(client, user):
    conversation = ConversationFactory(user=user, persona=PersonaFactory(name="Sage"))

    response = client.get(f"/conversations/{conversation.id}/")

    assert response.status_code == 200
    html = response.content.decode()
    assert f'data-conversation-id="{conversation.id}"' in html
    assert f'data-ws-path="/ws/conversations/{conversation.id}/"' in html
    assert 'data-persona-name="Sage"' in html


@pytest.mark.parametrize("path", ["/conversations/{id}/", "/conversations/{id}/transcript/"])
def test_conversation_pages_require_login(client, path):
    conversation = ConversationFactory()

    response = client.get(path.format(id=conversation.id))

    assert response.status_code == 302
    assert response.url.startswith(reverse("login"))


def test_conversation_page_of_another_user_is_not_found(client, user):
    assert client.get(f"/conversations/{ConversationFactory().id}/").status_code == 404


def test_pages_carry_a_content_security_policy_without_inline_scripts(client):
    # given a signed-in user on the conversation page
    conversation = ConversationFactory()
    client.force_login(conversation.user)

    # when
    response = client.get(f"/conversations/{conversation.id}/")

    # then scripts may come from this origin only, and the page has no inline script
    policy = response.headers["Content-Security-Policy"]
    script_src = next(d for d in policy.split(";") if d.strip().startswith("script-src"))
    assert script_src.split() == ["script-src", "'self'"]
    assert "frame-ancestors 'none'" in policy
    scripts = re.findall(r"<script\b[^>]*>", response.content.decode())
    assert scripts and all(" src=" in tag for tag in scripts), scripts


# --- Keyset pages -------------------------------------------------------------------------


def history_page(client, **params):
    response = client.get("/conversations/", params)
    assert response.status_code == 200
    return response


def test_history_pages_by_keyset_newest_first_with_working_links(client, user, settings):
    # given more conversations than a page, two of them started at the same instant
    made = [ConversationFactory(user=user) for _ in range(views.HISTORY_PAGE_SIZE + 3)]
    same = made[-1].started_at
    Conversation.objects.filter(pk=made[-2].pk).update(started_at=same)
    newest_first = list(Conversation.objects.filter(user=user).order_by("-started_at", "-id"))

    # when the first page, then the next one through its own link
    first = history_page(client)
    older = first.context["older"]
    second = history_page(client, before=older)

    # then together they list each conversation once, in order
    assert listed(first) == newest_first[: views.HISTORY_PAGE_SIZE]
    assert listed(second) == newest_first[views.HISTORY_PAGE_SIZE :]
    assert f"before={older}" in first.content.decode()
    assert first.context["newer"] is None and second.context["older"] is None
    # and back: the page before the second is the first
    back = history_page(client, after=second.context["newer"])
    assert listed(back) == listed(first)


def test_history_search_pages_keep_the_query(client, user):
    persona = PersonaFactory(name="Ada")
    for _ in range(views.HISTORY_PAGE_SIZE + 1):
        ConversationFactory(user=user, persona=persona)

    first = history_page(client, q="ada")

    assert f"q=ada&amp;before={first.context['older']}" in first.content.decode()
    assert len(listed(history_page(client, q="ada", before=first.context["older"]))) == 1


@pytest.mark.parametrize(
    "params",
    [
        {"before": "yesterday"},
        {"before": "123"},
        {"before": f"12-{uuid.uuid4().hex[:31]}"},
        {"before": f"-12-{uuid.uuid4().hex}"},
        {"before": f"{'9' * 30}-{uuid.uuid4().hex}"},
        {"after": "nonsense"},
        {"before": f"1-{uuid.uuid4().hex}", "after": f"1-{uuid.uuid4().hex}"},
    ],
)
def test_a_bad_history_cursor_is_a_clear_400(client, user, params):
    response = client.get("/conversations/", params)

    assert response.status_code == 400
    text = response.content.decode()
    assert "cursor" in text.lower() or "not both" in text


def test_transcript_pages_by_seq_with_working_links(client, user, monkeypatch):
    monkeypatch.setattr(views, "TRANSCRIPT_PAGE_SIZE", 3)
    conversation = ConversationFactory(user=user)
    turns = [MessageFactory(conversation=conversation, text=f"turn {n}") for n in range(7)]
    MessageFactory(conversation=conversation, role="assistant", status="interrupted", text="")

    first = client.get(f"/conversations/{conversation.id}/transcript/")
    later = first.context["later"]
    second = client.get(f"/conversations/{conversation.id}/transcript/", {"after": later})
    third = client.get(
        f"/conversations/{conversation.id}/transcript/", {"after": second.context["later"]}
    )
    back = client.get(
        f"/conversations/{conversation.id}/transcript/", {"before": second.context["earlier"]}
    )

    def texts(response):
        return [m.text for m in response.context["messages"]]

    assert texts(first) == ["turn 0", "turn 1", "turn 2"]
    assert texts(second) == ["turn 3", "turn 4", "turn 5"]
    assert texts(third) == ["turn 6"]  # the empty turn after it is not shown
    assert texts(back) == texts(first)
    assert (first.context["earlier"], third.context["later"]) == (None, None)
    assert f"?after={turns[2].seq}" in first.content.decode()


@pytest.mark.parametrize(
    "params",
    [
        {"after": "two"},
        {"before": "-1"},
        {"after": "1.5"},
        {"after": "9" * 11},
        {"before": "1", "after": "2"},
    ],
)
def test_a_bad_transcript_cursor_is_a_clear_400(client, user, params):
    conversation = ConversationFactory(user=user)

    response = client.get(f"/conversations/{conversation.id}/transcript/", params)

    assert response.status_code == 400
    assert b"cursor" in response.content or b"not both" in response.content


def test_a_bad_cursor_on_someone_elses_transcript_is_still_400_not_a_leak(client, user):
    theirs = ConversationFactory()

    assert client.get(f"/conversations/{theirs.id}/transcript/", {"after": "x"}).status_code == 400
    assert client.get(f"/conversations/{theirs.id}/transcript/", {"after": "1"}).status_code == 404


# --- Query budgets per page ----------------------------------------------------------------

# Measured, embedded: the session and the user (2) plus the page's own queries: history 1
# (one page, with its message counts), transcript 2 (the conversation with its persona, one
# page of turns), conversation 1. In services mode the session comes from the cache: one
# less each. However many conversations and turns there are.
PAGE_QUERY_BUDGETS = {"history": 3, "transcript": 4, "conversation": 3}


@pytest.fixture
def busy_user(client, user):
    """Many conversations with many turns: a budget must not grow with them."""
    persona = PersonaFactory(name="Ada")
    conversations = [ConversationFactory(user=user, persona=persona) for _ in range(60)]
    for conversation in conversations[:3]:
        for _ in range(120):
            MessageFactory(conversation=conversation)
    return conversations[0]


def test_history_page_stays_within_its_query_budget(
    client, busy_user, django_assert_max_num_queries
):
    with django_assert_max_num_queries(PAGE_QUERY_BUDGETS["history"]):
        response = client.get("/conversations/")
    assert len(listed(response)) == views.HISTORY_PAGE_SIZE
    with django_assert_max_num_queries(PAGE_QUERY_BUDGETS["history"]):
        client.get("/conversations/", {"q": "Ada", "before": response.context["older"]})


def test_transcript_page_stays_within_its_query_budget(
    client, busy_user, django_assert_max_num_queries
):
    with django_assert_max_num_queries(PAGE_QUERY_BUDGETS["transcript"]):
        response = client.get(f"/conversations/{busy_user.id}/transcript/")
    assert len(response.context["messages"]) == views.TRANSCRIPT_PAGE_SIZE
    with django_assert_max_num_queries(PAGE_QUERY_BUDGETS["transcript"]):
        client.get(f"/conversations/{busy_user.id}/transcript/", {"after": 50})


def test_conversation_page_stays_within_its_query_budget(
    client, busy_user, django_assert_max_num_queries
):
    with django_assert_max_num_queries(PAGE_QUERY_BUDGETS["conversation"]):
        assert client.get(f"/conversations/{busy_user.id}/").status_code == 200
