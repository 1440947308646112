import pytest
from django.contrib.auth.models import Permission
from django.contrib.messages import get_messages
from django.db import connection
from django.test.utils import CaptureQueriesContext

from apps.accounts.models import User
from apps.accounts.tests.factories import UserFactory, usage_of, usage_set
from apps.conversations.context import persona_of
from apps.conversations.services import conversation_start, text_message_add
from apps.conversations.tests.factories import (
    ConversationFactory,
    MessageFactory,
    TranscriptSegmentFactory,
)
from apps.personas.models import Persona
from apps.pipeline.services import reply_prepare

from .factories import PersonaFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def superuser():
    return UserFactory(username="root", is_staff=True, is_superuser=True)


@pytest.fixture
def admin_browser(client, superuser):
    client.force_login(superuser)
    return client


@pytest.fixture
def objects():
    """One of each model the admin shows, linked together."""
    persona = PersonaFactory(name="Ada", slug="ada")
    conversation = ConversationFactory(persona=persona)
    message = MessageFactory(conversation=conversation, text="What is seven times six?")
    segment = TranscriptSegmentFactory(
        message__conversation=conversation,
        text="Spoken words here",
        message__text="Spoken words here",
    )
    return {
        "persona": persona,
        "conversation": conversation,
        "message": message,
        "segment": segment,
        "user": conversation.user,
    }


def admin_pages(objects) -> list[str]:
    persona, conversation = objects["persona"], objects["conversation"]
    message, user = objects["message"], objects["user"]
    return [
        "/admin/",
        "/admin/personas/persona/",
        "/admin/personas/persona/add/",
        f"/admin/personas/persona/{persona.pk}/change/",
        "/admin/conversations/conversation/",
        f"/admin/conversations/conversation/{conversation.pk}/change/",
        "/admin/conversations/message/",
        f"/admin/conversations/message/{message.pk}/change/",
        "/admin/accounts/user/",
        "/admin/accounts/user/add/",
        f"/admin/accounts/user/{user.pk}/change/",
    ]


def result_list(response) -> list:
    return list(response.context["cl"].result_list)


# --- Pages and access -------------------------------------------------------------------


def test_every_admin_page_renders_for_a_superuser(admin_browser, objects):
    for url in admin_pages(objects):
        response = admin_browser.get(url)
        assert response.status_code == 200, url


def test_conversation_page_shows_its_messages_and_transcript_inlines(admin_browser, objects):
    conversation = objects["conversation"]

    response = admin_browser.get(f"/admin/conversations/conversation/{conversation.pk}/change/")

    formsets = {
        formset.formset.model.__name__: formset
        for formset in response.context["inline_admin_formsets"]
    }
    assert set(formsets) == {"Message", "TranscriptSegment"}
    assert formsets["Message"].formset.queryset.count() == 2
    assert formsets["TranscriptSegment"].formset.queryset.count() == 1
    html = response.content.decode()
    assert "What is seven times six?" in html
    assert "Spoken words here" in html


def test_admin_pages_send_anonymous_visitors_to_the_admin_login(client, objects):
    for url in admin_pages(objects):
        response = client.get(url)
        assert response.status_code == 302, url
        assert response.url.startswith("/admin/login/"), url


def test_admin_pages_send_non_staff_users_to_the_admin_login(client, objects):
    client.force_login(UserFactory(is_staff=False))

    for url in admin_pages(objects):
        response = client.get(url)
        assert response.status_code == 302, url
        assert response.url.startswith("/admin/login/"), url


def test_staff_without_permissions_are_forbidden(client, objects):
    client.force_login(UserFactory(is_staff=True))

    assert client.get("/admin/").status_code == 200  # the (empty) index
    for url in admin_pages(objects)[1:]:
        assert client.get(url).status_code == 403, url


def test_staff_with_view_permission_may_look_but_not_add(client, objects):
    # given
    staff = UserFactory(is_staff=True)
    staff.user_permissions.add(Permission.objects.get(codename="view_persona"))
    client.force_login(staff)
    persona = objects["persona"]

    # then
    assert client.get("/admin/personas/persona/").status_code == 200
    assert client.get(f"/admin/personas/persona/{persona.pk}/change/").status_code == 200
    assert client.get("/admin/personas/persona/add/").status_code == 403
    assert client.get("/admin/conversations/conversation/").status_code == 403


# --- Search and filters -------------------------------------------------------------------


def test_persona_search_and_published_filter(admin_browser):
    # given
    PersonaFactory(name="Ada", slug="ada", is_published=True)
    PersonaFactory(
        name="Captain Rex",
        slug="captain-rex",
        is_published=True,
        system_prompt="You are a jolly pirate.",
    )
    PersonaFactory(name="Draft", slug="draft", is_published=False)

    # then
    searched = admin_browser.get("/admin/personas/persona/", {"q": "pirate"})
    assert [p.slug for p in result_list(searched)] == ["captain-rex"]
    published = admin_browser.get("/admin/personas/persona/", {"is_published__exact": "1"})
    assert sorted(p.slug for p in result_list(published)) == ["ada", "captain-rex"]
    drafts = admin_browser.get("/admin/personas/persona/", {"is_published__exact": "0"})
    assert [p.slug for p in result_list(drafts)] == ["draft"]


def test_conversation_search_by_message_text_and_username(admin_browser):
    # given
    wanted = MessageFactory(text="the lighthouse keeper").conversation
    other = MessageFactory(text="a pirate ship").conversation

    # then
    by_text = admin_browser.get("/admin/conversations/conversation/", {"q": "lighthouse"})
    assert result_list(by_text) == [wanted]
    by_user = admin_browser.get("/admin/conversations/conversation/", {"q": other.user.username})
    assert result_list(by_user) == [other]


def test_conversation_filter_by_status(admin_browser):
    ended = ConversationFactory(status="ended")
    ConversationFactory()

    response = admin_browser.get("/admin/conversations/conversation/", {"status__exact": "ended"})

    assert result_list(response) == [ended]


def test_message_search_and_role_filter(admin_browser):
    # given
    question = MessageFactory(text="How far is the moon?")
    answer = MessageFactory(
        conversation=question.conversation, role="assistant", source="llm", text="Quite far."
    )

    # then
    searched = admin_browser.get("/admin/conversations/message/", {"q": "moon"})
    assert result_list(searched) == [question]
    filtered = admin_browser.get("/admin/conversations/message/", {"role__exact": "assistant"})
    assert result_list(filtered) == [answer]


def test_user_search(admin_browser):
    UserFactory(username="grace", email="grace@navy.example")
    UserFactory(username="alan")

    response = admin_browser.get("/admin/accounts/user/", {"q": "navy"})

    assert [user.username for user in result_list(response)] == ["grace"]


# --- Actions ---------------------------------------------------------------------------


def post_action(browser, url: str, action: str, objects) -> None:
    response = browser.post(
        url, {"action": action, "_selected_action": [str(obj.pk) for obj in objects]}
    )
    assert response.status_code == 302, response.content[:500]
    return response


def test_duplicate_makes_unpublished_copies_with_unique_slugs(admin_browser):
    # given
    original = PersonaFactory(name="Ada", slug="ada", is_published=True, voice="en-gb+f3")

    # when run twice
    post_action(admin_browser, "/admin/personas/persona/", "duplicate", [original])
    response = post_action(admin_browser, "/admin/personas/persona/", "duplicate", [original])

    # then
    copies = list(Persona.objects.exclude(pk=original.pk).order_by("created_at"))
    assert len(copies) == 2
    assert len({copy.slug for copy in copies} | {original.slug}) == 3
    assert [copy.slug for copy in copies] == ["ada-copy", "ada-copy-2"]
    for copy in copies:
        assert copy.is_published is False
        assert copy.name == "Ada (copy)"
        assert (copy.system_prompt, copy.greeting, copy.voice) == (
            original.system_prompt,
            original.greeting,
            original.voice,
        )
    original.refresh_from_db()
    assert original.is_published is True
    assert [str(m) for m in get_messages(response.wsgi_request)][-1] == "Created 1 copy."


def test_duplicate_of_several_personas_copies_each(admin_browser):
    personas = [PersonaFactory(slug="one"), PersonaFactory(slug="two")]

    post_action(admin_browser, "/admin/personas/persona/", "duplicate", personas)

    assert set(Persona.objects.values_list("slug", flat=True)) == {
        "one",
        "two",
        "one-copy",
        "two-copy",
    }


def test_staff_without_persona_permissions_cannot_duplicate(client):
    client.force_login(UserFactory(is_staff=True))
    persona = PersonaFactory()

    response = client.post(
        "/admin/personas/persona/", {"action": "duplicate", "_selected_action": [str(persona.pk)]}
    )

    assert response.status_code == 403
    assert Persona.objects.count() == 1


def test_reset_usage_zeroes_the_selected_users_only(admin_browser):
    # given
    spent, untouched = UserFactory(), UserFactory()
    usage_set(spent, audio_seconds=321.5, tokens=999)
    usage_set(untouched, audio_seconds=12, tokens=34)

    # when
    post_action(admin_browser, "/admin/accounts/user/", "reset_usage", [spent])

    # then
    assert usage_of(spent) == (0, 0)
    assert usage_of(untouched) == (12, 34)
    assert User.objects.filter(pk=spent.pk, audio_seconds_quota__gt=0).exists()  # quotas kept


@pytest.fixture
def view_only_staff(client):
    staff = UserFactory(is_staff=True)
    staff.user_permissions.add(
        Permission.objects.get(codename="view_persona"),
        Permission.objects.get(codename="view_user"),
    )
    client.force_login(staff)
    return client


def test_view_only_staff_cannot_duplicate(view_only_staff):
    persona = PersonaFactory()

    view_only_staff.post(
        "/admin/personas/persona/", {"action": "duplicate", "_selected_action": [str(persona.pk)]}
    )

    assert Persona.objects.count() == 1


def test_view_only_staff_cannot_reset_usage(view_only_staff):
    spent = UserFactory()
    usage_set(spent, tokens=5)

    view_only_staff.post(
        "/admin/accounts/user/", {"action": "reset_usage", "_selected_action": [str(spent.pk)]}
    )

    assert usage_of(spent) == (0, 5)


# --- An edit reaches the next turn ------------------------------------------------------------


def persona_form(persona: Persona, **changes) -> dict:
    fields = {
        "name": persona.name,
        "slug": persona.slug,
        "avatar": persona.avatar,
        "description": persona.description,
        "is_published": "on" if persona.is_published else "",
        "system_prompt": persona.system_prompt,
        "greeting": persona.greeting,
        "llm_kind": persona.llm_kind,
        "llm_model": persona.llm_model,
        "temperature": persona.temperature,
        "max_tokens": persona.max_tokens,
        "stt_kind": persona.stt_kind,
        "tts_kind": persona.tts_kind,
        "voice": persona.voice,
        **changes,
    }
    return {name: value for name, value in fields.items() if value != ""}


@pytest.fixture
def talked_to(settings):
    """A persona whose context the cache has: one turn was prepared already. (The
    services publish on an in-memory layer: these tests check the cache.)"""
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    persona = PersonaFactory(system_prompt="Old prompt.", llm_model="", tts_kind="espeak")
    conversation = conversation_start(user=UserFactory(), persona=persona)
    text_message_add(conversation_id=conversation.id, text="hello")
    plan = reply_prepare(conversation_id=conversation.id)
    assert plan.request.system_prompt == "Old prompt."
    return persona, conversation


@pytest.mark.django_db(transaction=True)  # the cache is written when the edit commits
def test_an_admin_edit_of_a_persona_is_used_on_the_next_turn(admin_browser, talked_to):
    persona, conversation = talked_to

    # when staff change its prompt, model, temperature and voice in the admin
    response = admin_browser.post(
        f"/admin/personas/persona/{persona.pk}/change/",
        persona_form(
            persona,
            system_prompt="New prompt.",
            llm_model="gpt-new",
            temperature=1.5,
            tts_kind="piper",
            voice="en_US-other",
        ),
    )
    assert response.status_code == 302, response.content[:1000]

    # then the very next turn uses every change (served by the cache: no persona query)
    with CaptureQueriesContext(connection) as captured:
        plan = reply_prepare(conversation_id=conversation.id)
    assert plan.request.system_prompt == "New prompt."
    assert (plan.request.model, plan.request.temperature) == ("gpt-new", 1.5)
    assert (plan.engines.tts, plan.engines.voice) == ("piper", "en_US-other")
    assert not [q for q in captured.captured_queries if '"personas_persona"' in q["sql"]]


@pytest.mark.django_db(transaction=True)
def test_a_list_editable_change_also_reaches_the_cache(admin_browser, talked_to):
    persona, _ = talked_to

    response = admin_browser.post(
        "/admin/personas/persona/",
        {
            "form-TOTAL_FORMS": "1",
            "form-INITIAL_FORMS": "1",
            "form-0-id": str(persona.pk),
            "form-0-is_published": "",
            "_save": "Save",
        },
    )

    assert response.status_code == 302, response.content[:1000]
    assert persona_of(persona_id=persona.pk).is_published is False


@pytest.mark.django_db(transaction=True)
def test_a_deleted_persona_leaves_the_cache(admin_browser):
    persona = PersonaFactory()
    persona_of(persona_id=persona.pk)  # cached

    response = admin_browser.post(f"/admin/personas/persona/{persona.pk}/delete/", {"post": "yes"})

    assert response.status_code == 302
    with pytest.raises(Persona.DoesNotExist):
        persona_of(persona_id=persona.pk)
