import datetime as dt
import re
from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth import SESSION_KEY
from django.urls import reverse
from django.utils import timezone

from apps.accounts.ledger import today
from apps.accounts.models import DailyUsage, User
from apps.conversations.models import Conversation
from apps.conversations.tests.factories import ConversationFactory, MessageFactory
from apps.personas.tests.factories import PersonaFactory

from .factories import PASSWORD, UserFactory, usage_set

pytestmark = pytest.mark.django_db

NEW_PASSWORD = "another-Zebra-97"


def logged_in_user_id(client) -> str | None:
    return client.session.get(SESSION_KEY)


# --- Sign up -------------------------------------------------------------------------


def test_signup_creates_the_user_logs_them_in_and_goes_home(client):
    # when
    response = client.post(
        "/accounts/signup/",
        {
            "username": "newbie",
            "email": "newbie@example.com",
            "password1": PASSWORD,
            "password2": PASSWORD,
        },
    )

    # then
    assert response.status_code == 302
    assert response.url == reverse("home")
    user = User.objects.get(username="newbie")
    assert user.email == "newbie@example.com"
    assert user.check_password(PASSWORD)
    assert logged_in_user_id(client) == str(user.pk)


def test_signup_with_a_weak_password_shows_errors_and_creates_nobody(client):
    # when
    response = client.post(
        "/accounts/signup/",
        {"username": "weakling", "email": "", "password1": "123", "password2": "123"},
    )

    # then
    assert response.status_code == 200
    assert response.context["form"].errors["password2"]
    assert not User.objects.filter(username="weakling").exists()
    assert logged_in_user_id(client) is None


def test_signup_with_mismatched_passwords_creates_nobody(client):
    response = client.post(
        "/accounts/signup/",
        {"username": "typo", "password1": PASSWORD, "password2": PASSWORD + "x"},
    )

    assert response.status_code == 200
    assert "password2" in response.context["form"].errors
    assert not User.objects.filter(username="typo").exists()


def test_signup_page_renders_the_form(client):
    response = client.get("/accounts/signup/")

    assert response.status_code == 200
    assert b'name="password1"' in response.content


# --- Log in / log out ---------------------------------------------------------------------


def test_login_with_the_right_password_signs_in_and_goes_home(client):
    user = UserFactory()

    response = client.post("/accounts/login/", {"username": user.username, "password": PASSWORD})

    assert response.status_code == 302
    assert response.url == reverse("home")
    assert logged_in_user_id(client) == str(user.pk)


def test_login_with_a_wrong_password_is_refused(client):
    user = UserFactory()

    response = client.post("/accounts/login/", {"username": user.username, "password": "nope"})

    assert response.status_code == 200
    assert response.context["form"].non_field_errors()
    assert logged_in_user_id(client) is None


def test_login_follows_next(client):
    user = UserFactory()

    response = client.post(
        "/accounts/login/",
        {"username": user.username, "password": PASSWORD, "next": "/accounts/usage/"},
    )

    assert response.status_code == 302
    assert response.url == "/accounts/usage/"


def test_logout_by_post_signs_out(client):
    # given
    client.force_login(UserFactory())

    # when
    response = client.post("/accounts/logout/")

    # then
    assert response.status_code == 302
    assert response.url == reverse("home")
    assert logged_in_user_id(client) is None
    assert client.get("/accounts/usage/").status_code == 302


def test_logout_by_get_is_refused_and_keeps_the_session(client):
    user = UserFactory()
    client.force_login(user)

    response = client.get("/accounts/logout/")

    assert response.status_code == 405
    assert logged_in_user_id(client) == str(user.pk)


# --- Password change ---------------------------------------------------------------------


def test_password_change_then_login_with_the_new_password(client):
    # given
    user = UserFactory()
    client.force_login(user)

    # when
    response = client.post(
        "/accounts/password_change/",
        {"old_password": PASSWORD, "new_password1": NEW_PASSWORD, "new_password2": NEW_PASSWORD},
    )

    # then
    assert response.status_code == 302
    assert response.url == reverse("password_change_done")
    assert logged_in_user_id(client) == str(user.pk)  # the session survives the change
    client.post("/accounts/logout/")
    old = client.post("/accounts/login/", {"username": user.username, "password": PASSWORD})
    assert old.status_code == 200 and logged_in_user_id(client) is None
    new = client.post("/accounts/login/", {"username": user.username, "password": NEW_PASSWORD})
    assert new.status_code == 302
    assert logged_in_user_id(client) == str(user.pk)


def test_password_change_with_a_wrong_old_password_changes_nothing(client):
    user = UserFactory()
    client.force_login(user)

    response = client.post(
        "/accounts/password_change/",
        {"old_password": "wrong", "new_password1": NEW_PASSWORD, "new_password2": NEW_PASSWORD},
    )

    assert response.status_code == 200
    assert "old_password" in response.context["form"].errors
    user.refresh_from_db()
    assert user.check_password(PASSWORD)


def test_password_change_requires_login(client):
    response = client.get("/accounts/password_change/")

    assert response.status_code == 302
    assert response.url.startswith(reverse("login"))


# --- Usage -----------------------------------------------------------------------------


def test_usage_shows_todays_use_and_what_is_left_of_the_daily_quotas(client):
    # given what the user used today and on an earlier day
    user = UserFactory(audio_seconds_quota=600, tokens_quota=1000)
    usage_set(user, audio_seconds=125.4, tokens=321)
    DailyUsage.objects.create(user=user, day=dt.date(2026, 11, 30), audio_seconds=7, tokens=70)
    client.force_login(user)

    # when
    response = client.get("/accounts/usage/")

    # then
    assert response.status_code == 200
    html = response.content.decode()
    assert '<dd id="minutes-used">125.4 s of 600 s</dd>' in html
    assert '<dd id="minutes-left">475 s</dd>' in html  # 600 - 125.4, rounded
    assert '<dd id="tokens-used">321 of 1000</dd>' in html
    assert '<dd id="tokens-left">679</dd>' in html
    days = flat(html)
    assert (
        f'<tr id="day-{today():%Y-%m-%d}"><td>{today():%Y-%m-%d}</td><td>125.4 s</td><td>321</td>'
        in days
    )
    assert '<tr id="day-2026-11-30"><td>2026-11-30</td><td>7.0 s</td><td>70</td>' in days


def test_usage_shows_unlimited_for_zero_quotas(client):
    user = UserFactory(audio_seconds_quota=0, tokens_quota=0)
    usage_set(user, tokens=50)
    client.force_login(user)

    html = client.get("/accounts/usage/").content.decode()

    assert '<dd id="minutes-left">unlimited</dd>' in html
    assert '<dd id="tokens-left">unlimited</dd>' in html
    assert '<dd id="tokens-used">50 of unlimited</dd>' in html


def test_usage_left_never_goes_below_zero(client):
    user = UserFactory(tokens_quota=100)
    usage_set(user, tokens=150)
    client.force_login(user)

    html = client.get("/accounts/usage/").content.decode()

    assert '<dd id="tokens-left">0</dd>' in html


def flat(html: str) -> str:
    return re.sub(r">\s+<", "><", html)


def test_usage_shows_the_users_totals_and_each_recent_conversations_cost(client):
    # given a user's two conversations with voice turns and replies, and someone else's
    user = UserFactory()
    ada, bob = PersonaFactory(name="Ada"), PersonaFactory(name="Bob")
    older = ConversationFactory(user=user, persona=ada)
    newer = ConversationFactory(user=user, persona=bob)
    MessageFactory(conversation=older, source="voice", stt_audio_seconds=4.5, cost_usd="0.00041")
    MessageFactory(
        conversation=older,
        role="assistant",
        source="llm",
        prompt_tokens=1000,
        completion_tokens=250,
        tts_audio_seconds=3.0,
        cost_usd="0.032",
    )
    MessageFactory(
        conversation=newer,
        role="assistant",
        source="llm",
        prompt_tokens=200,
        completion_tokens=50,
        tts_audio_seconds=1.5,
        cost_usd="0.5",
    )
    MessageFactory(cost_usd="9", prompt_tokens=9999)  # another user's
    client.force_login(user)

    # when
    html = flat(client.get("/accounts/usage/").content.decode())

    # then the totals are of this user's turns only
    assert '<dd id="total-stt-seconds">4.5 s</dd>' in html
    assert '<dd id="total-tts-seconds">4.5 s</dd>' in html
    assert '<dd id="total-tokens">1200 / 300</dd>' in html
    assert '<dd id="total-cost">$0.5324</dd>' in html  # 0.53241 to 4 places
    # and each conversation has its own row, newest first
    rows = re.findall(r'<tr id="cost-([0-9a-f-]+)">(.*?)</tr>', html)
    assert [conversation_id for conversation_id, _ in rows] == [str(newer.id), str(older.id)]
    newer_row, older_row = (cells for _, cells in rows)
    assert "<td>Bob</td><td>0.0 s</td><td>1.5 s</td><td>250</td><td>$0.5000</td>" in newer_row
    assert "<td>Ada</td><td>4.5 s</td><td>3.0 s</td><td>1250</td><td>$0.0324</td>" in older_row


def test_usage_lists_only_the_most_recent_conversations(client):
    # given more conversations than the page shows
    user = UserFactory()
    persona = PersonaFactory()
    conversations = [ConversationFactory(user=user, persona=persona) for _ in range(23)]
    start = timezone.now() - timedelta(days=1)
    for i, conversation in enumerate(conversations):
        Conversation.objects.filter(pk=conversation.pk).update(
            started_at=start + timedelta(minutes=i)
        )
    client.force_login(user)

    response = client.get("/accounts/usage/")

    shown = re.findall(r'<tr id="cost-([0-9a-f-]+)">', response.content.decode())
    assert shown == [str(c.id) for c in reversed(conversations)][:20]
    assert '<dd id="total-cost">$0.0000</dd>' in response.content.decode()


def test_usage_without_conversations_says_so(client):
    client.force_login(UserFactory())

    html = client.get("/accounts/usage/").content.decode()

    assert "No conversations yet." in html
    assert '<dd id="total-cost">$0.0000</dd>' in html


def test_usage_requires_login(client):
    response = client.get("/accounts/usage/")

    assert response.status_code == 302
    assert response.url == f"{reverse('login')}?next=/accounts/usage/"


# --- Query budgets per page ----------------------------------------------------------------

# Measured, embedded: session and user (services mode: the session from the cache, 1),
# the user's cost totals, their recent conversations, those conversations' sums, and the
# user's last days of use (today's among them).
USAGE_QUERY_BUDGET = 6


def test_usage_page_stays_within_its_query_budget(client, django_assert_max_num_queries):
    user = UserFactory()
    for _ in range(3):
        MessageFactory.create_batch(
            2, conversation=ConversationFactory(user=user), cost_usd=Decimal("0.1")
        )
    client.force_login(user)

    with django_assert_max_num_queries(USAGE_QUERY_BUDGET):
        assert client.get("/accounts/usage/").status_code == 200
