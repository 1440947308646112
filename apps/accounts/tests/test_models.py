import datetime as dt
import threading

import pytest
from django.db import connection
from django.test import Client

from apps.accounts.ledger import today
from apps.accounts.models import DailyUsage
from apps.accounts.services import session_key_create, usage_add, usage_days, usage_today
from apps.conversations.tests.factories import ConversationFactory

from .factories import UserFactory, usage_of, usage_set

pytestmark = pytest.mark.django_db


# --- daily quotas: defaults and usage_today ----------------------------------------------


def test_new_users_get_the_configured_daily_quotas(settings):
    settings.QUOTA_AUDIO_SECONDS = 42
    settings.QUOTA_TOKENS = 4242

    user = UserFactory()

    assert (user.audio_seconds_quota, user.tokens_quota) == (42, 4242)


def test_the_default_quota_of_a_new_account_is_small():
    user = UserFactory()

    assert 0 < user.audio_seconds_quota <= 15 * 60
    assert 0 < user.tokens_quota <= 100_000


@pytest.mark.parametrize(
    ("quotas", "used", "left"),
    [
        ((600, 1000), (125.4, 321), (474.6, 679)),
        ((600, 1000), (0, 0), (600, 1000)),
        ((60, 10), (61, 11), (0, 0)),  # never negative
        ((0, 0), (10**6, 10**6), (None, None)),  # 0: unlimited
    ],
)
def test_usage_today_is_what_is_left_of_the_days_quotas(quotas, used, left):
    user = UserFactory(audio_seconds_quota=quotas[0], tokens_quota=quotas[1])
    usage_set(user, audio_seconds=used[0], tokens=used[1])

    today_ = usage_today(user=user, days=usage_days(user_id=user.pk, size=14))

    assert (today_.audio_seconds, today_.tokens) == pytest.approx(used)
    assert today_.audio_seconds_left == (None if left[0] is None else pytest.approx(left[0]))
    assert today_.tokens_left == left[1]


def test_usage_of_another_day_does_not_count_today():
    user = UserFactory(tokens_quota=100)
    DailyUsage.objects.create(user=user, day=today() - dt.timedelta(days=1), tokens=100)

    assert usage_today(user=user, days=usage_days(user_id=user.pk, size=14)).tokens_left == 100


# --- usage_add --------------------------------------------------------------------------


def test_usage_add_adds_up_in_todays_row():
    conversation = ConversationFactory()

    usage_add(conversation_id=conversation.id, audio_seconds=2.25, tokens=5)
    usage_add(conversation_id=conversation.id, tokens=7)
    usage_add(conversation_id=conversation.id, audio_seconds=0.25)

    assert usage_of(conversation.user) == (pytest.approx(2.5), 12)
    assert DailyUsage.objects.filter(user=conversation.user).count() == 1


def test_usage_add_is_one_statement():
    from django.test.utils import CaptureQueriesContext

    conversation = ConversationFactory()
    usage_add(conversation_id=conversation.id, tokens=1)  # the row exists: the upsert adds

    with CaptureQueriesContext(connection) as queries:
        usage_add(conversation_id=conversation.id, audio_seconds=1, tokens=1)

    assert len(queries) == 1
    assert queries[0]["sql"].lstrip().upper().startswith("INSERT")
    assert usage_of(conversation.user) == (1.0, 2)


def test_usage_add_counts_the_conversations_user_only():
    conversation, other = ConversationFactory(), ConversationFactory()
    usage_add(conversation_id=other.id, tokens=3)

    usage_add(conversation_id=conversation.id, tokens=100)

    assert usage_of(other.user) == (0.0, 3)
    assert usage_of(conversation.user) == (0.0, 100)


def test_usage_add_starts_a_new_row_on_a_new_day():
    conversation = ConversationFactory()
    yesterday = today() - dt.timedelta(days=1)
    DailyUsage.objects.create(user=conversation.user, day=yesterday, tokens=50)

    usage_add(conversation_id=conversation.id, tokens=5)

    assert DailyUsage.objects.get(user=conversation.user, day=yesterday).tokens == 50
    assert usage_of(conversation.user) == (0.0, 5)


@pytest.mark.django_db(transaction=True)
def test_concurrent_usage_add_loses_nothing():
    # given a conversation whose user has no row today: the first writers race to insert it
    conversation = ConversationFactory()
    errors: list[BaseException] = []

    def add_many():
        try:
            for _ in range(10):
                usage_add(conversation_id=conversation.id, audio_seconds=0.5, tokens=3)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connection.close()

    # when
    threads = [threading.Thread(target=add_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # then
    assert errors == []
    assert usage_of(conversation.user) == (pytest.approx(4 * 10 * 0.5), 4 * 10 * 3)


# --- session_key_create ------------------------------------------------------------------


def test_session_key_create_gives_a_session_that_authenticates(settings):
    # given
    user = UserFactory()

    # when
    key = session_key_create(user=user)

    # then a browser with only that cookie is signed in as the user
    browser = Client()
    browser.cookies[settings.SESSION_COOKIE_NAME] = key
    response = browser.get("/accounts/usage/")
    assert response.status_code == 200
    assert response.context["user"] == user


def test_session_key_create_stops_working_after_a_password_change(settings):
    user = UserFactory()
    key = session_key_create(user=user)

    user.set_password("a-whole-New-one-9")
    user.save()

    browser = Client()
    browser.cookies[settings.SESSION_COOKIE_NAME] = key
    response = browser.get("/accounts/usage/")
    assert response.status_code == 302


def test_session_keys_are_distinct():
    user = UserFactory()

    assert session_key_create(user=user) != session_key_create(user=user)
