import pytest
from django.urls import reverse

from apps.accounts.tests.factories import UserFactory
from apps.conversations.models import Conversation, Message

from .factories import PersonaFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def user_client(client):
    client.force_login(UserFactory())
    return client


# --- Gallery ---------------------------------------------------------------------------


def test_gallery_lists_only_published_personas(client):
    # given
    PersonaFactory(name="Sage", slug="sage")
    PersonaFactory(name="Ada", slug="ada")
    PersonaFactory(name="Hidden Draft", slug="hidden-draft", is_published=False)

    # when
    response = client.get("/")

    # then
    assert response.status_code == 200
    assert [p.slug for p in response.context["personas"]] == ["ada", "sage"]  # by name
    assert b"Hidden Draft" not in response.content


def test_gallery_offers_talk_buttons_to_signed_in_users_only(client):
    PersonaFactory(slug="ada")

    anonymous = client.get("/").content.decode()
    assert 'data-persona="ada"' not in anonymous
    assert "Log in to talk" in anonymous

    client.force_login(UserFactory())
    signed_in = client.get("/").content.decode()
    assert 'action="/personas/ada/talk/"' in signed_in


def test_gallery_with_nothing_published_says_so(client):
    PersonaFactory(is_published=False)

    response = client.get("/")

    assert list(response.context["personas"]) == []
    assert b"No personas are published yet" in response.content


# --- Talk ------------------------------------------------------------------------------


def test_talk_starts_a_conversation_with_the_greeting_and_redirects_to_it(client):
    # given
    user = UserFactory()
    client.force_login(user)
    persona = PersonaFactory(slug="ada", greeting="Hello, I'm Ada.")

    # when
    response = client.post("/personas/ada/talk/")

    # then
    conversation = Conversation.objects.get()
    assert (conversation.user, conversation.persona) == (user, persona)
    assert response.status_code == 302
    assert response.url == f"/conversations/{conversation.id}/"
    assert response.url == reverse("conversation", args=[conversation.id])
    greeting = conversation.messages.get()
    assert (greeting.seq, greeting.role, greeting.source, greeting.text) == (
        1,
        Message.Role.ASSISTANT,
        Message.Source.GREETING,
        "Hello, I'm Ada.",
    )
    assert list(conversation.messages.values_list("seq", flat=True)) == [1]


def test_talk_without_a_greeting_stores_no_message(user_client):
    PersonaFactory(slug="quiet", greeting="")

    user_client.post("/personas/quiet/talk/")

    conversation = Conversation.objects.get()
    assert conversation.messages.count() == 0


def test_each_talk_starts_a_new_conversation(user_client):
    PersonaFactory(slug="ada")

    first = user_client.post("/personas/ada/talk/").url
    second = user_client.post("/personas/ada/talk/").url

    assert first != second
    assert Conversation.objects.count() == 2


def test_talk_requires_login(client):
    PersonaFactory(slug="ada")

    response = client.post("/personas/ada/talk/")

    assert response.status_code == 302
    assert response.url == f"{reverse('login')}?next=/personas/ada/talk/"
    assert not Conversation.objects.exists()


def test_talk_by_get_is_refused(user_client):
    PersonaFactory(slug="ada")

    response = user_client.get("/personas/ada/talk/")

    assert response.status_code == 405
    assert not Conversation.objects.exists()


@pytest.mark.parametrize("slug", ["draft", "nobody"])
def test_talk_to_an_unpublished_or_unknown_persona_is_not_found(user_client, slug):
    PersonaFactory(slug="draft", is_published=False)

    response = user_client.post(f"/personas/{slug}/talk/")

    assert response.status_code == 404
    assert not Conversation.objects.exists()


# --- Query budgets per page ----------------------------------------------------------------

# Measured, embedded (services mode: one less, the session comes from the cache):
# gallery 1 anonymous (the published personas) and 3 signed in (session, user); talk
# (start a conversation) 9: session, user, the persona, then in a transaction (here,
# inside the test's: SAVEPOINT and RELEASE) the user's row locked, the day's
# conversations counted (the daily limit), the conversation and its greeting.
# However many personas.
GALLERY_QUERY_BUDGET = {"anonymous": 1, "signed_in": 3}
TALK_QUERY_BUDGET = 9


def test_gallery_stays_within_its_query_budget(client, django_assert_max_num_queries):
    for n in range(40):
        PersonaFactory(is_published=n % 4 != 0)

    with django_assert_max_num_queries(GALLERY_QUERY_BUDGET["anonymous"]):
        response = client.get("/")
    assert len(response.context["personas"]) == 30

    client.force_login(UserFactory())
    with django_assert_max_num_queries(GALLERY_QUERY_BUDGET["signed_in"]):
        client.get("/")


def test_talk_stays_within_its_query_budget(user_client, django_assert_max_num_queries):
    PersonaFactory(slug="ada")

    with django_assert_max_num_queries(TALK_QUERY_BUDGET):
        response = user_client.post("/personas/ada/talk/")

    assert response.status_code == 302


# --- The daily conversation limit --------------------------------------------------------


def test_talk_past_the_daily_conversation_limit_is_refused_and_says_why(client, settings):
    from datetime import timedelta

    from django.utils import timezone

    settings.CONVERSATIONS_PER_DAY_MAX = 2
    user = UserFactory()
    client.force_login(user)
    PersonaFactory(slug="ada")
    # given one conversation started more than a day ago, which does not count
    old = client.post("/personas/ada/talk/").url.split("/")[-2]
    Conversation.objects.filter(pk=old).update(
        started_at=timezone.now() - timedelta(days=1, minutes=1)
    )

    # when the user starts two today, then a third
    assert client.post("/personas/ada/talk/").status_code == 302
    assert client.post("/personas/ada/talk/").status_code == 302
    refused = client.post("/personas/ada/talk/")

    # then the third is refused with a readable reason on the gallery, and nothing is stored
    assert refused.status_code == 429
    assert "You have started 2 conversations in the last 24 hours" in refused.content.decode()
    assert b"Talk to " in refused.content  # the gallery, still usable
    assert Conversation.objects.filter(user=user).count() == 3


def test_staff_and_a_limit_of_0_start_conversations_without_limit(client, settings):
    settings.CONVERSATIONS_PER_DAY_MAX = 1
    PersonaFactory(slug="ada")
    client.force_login(UserFactory(is_staff=True))
    assert [client.post("/personas/ada/talk/").status_code for _ in range(3)] == [302] * 3
    settings.CONVERSATIONS_PER_DAY_MAX = 0
    client.force_login(UserFactory())
    assert [client.post("/personas/ada/talk/").status_code for _ in range(3)] == [302] * 3
