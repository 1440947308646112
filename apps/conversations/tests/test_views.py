import re
import uuid

import pytest
from django.urls import reverse

from apps.accounts.tests.factories import UserFactory
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
