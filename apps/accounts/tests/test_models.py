import threading

import pytest
from django.db import connection
from django.test import Client

from apps.accounts.models import User
from apps.accounts.services import session_key_create, usage_add, user_quota_problem

from .factories import UserFactory

pytestmark = pytest.mark.django_db


# --- quota_problem --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"audio_seconds_quota": 60, "audio_seconds_used": 59.9}, ""),
        ({"audio_seconds_quota": 60, "audio_seconds_used": 60}, "speaking minutes"),
        ({"audio_seconds_quota": 60, "audio_seconds_used": 61}, "speaking minutes"),
        ({"tokens_quota": 100, "tokens_used": 99}, ""),
        ({"tokens_quota": 100, "tokens_used": 100}, "reply tokens"),
        ({"audio_seconds_quota": 0, "audio_seconds_used": 10**6}, ""),  # 0: unlimited
        ({"tokens_quota": 0, "tokens_used": 10**6}, ""),  # 0: unlimited
    ],
)
def test_quota_problem(fields, problem):
    user = User(**{"audio_seconds_quota": 60, "tokens_quota": 100, **fields})

    if problem:
        assert problem in user.quota_problem()
    else:
        assert user.quota_problem() == ""


def test_audio_quota_is_reported_before_tokens():
    user = User(audio_seconds_quota=1, audio_seconds_used=1, tokens_quota=1, tokens_used=1)

    assert "speaking minutes" in user.quota_problem()


def test_new_users_get_the_configured_quotas(settings):
    settings.QUOTA_AUDIO_SECONDS = 42
    settings.QUOTA_TOKENS = 4242

    user = UserFactory()

    assert (user.audio_seconds_quota, user.tokens_quota) == (42, 4242)


def test_left_is_none_when_unlimited_and_never_negative():
    assert User(audio_seconds_quota=0).audio_seconds_left is None
    assert User(tokens_quota=0).tokens_left is None
    assert User(audio_seconds_quota=10, audio_seconds_used=12).audio_seconds_left == 0
    assert User(tokens_quota=10, tokens_used=3).tokens_left == 7


def test_user_quota_problem_reads_the_stored_row():
    # given a user object that is stale: the row is over quota
    user = UserFactory(tokens_quota=10, tokens_used=0)
    User.objects.filter(pk=user.pk).update(tokens_used=10)

    assert user.quota_problem() == ""
    assert "reply tokens" in user_quota_problem(user_id=user.pk)


# --- usage_add ------------------------------------------------------------------------


def test_usage_add_adds_up_without_reading_first():
    # given a stale in-memory copy of the user
    user = UserFactory(audio_seconds_used=1.5, tokens_used=10)

    # when two writers add to it
    usage_add(user_id=user.pk, audio_seconds=2.25, tokens=5)
    usage_add(user_id=user.pk, tokens=7)
    usage_add(user_id=user.pk, audio_seconds=0.25)

    # then nothing is lost (F expressions, not read-modify-write)
    user.refresh_from_db()
    assert user.audio_seconds_used == pytest.approx(4.0)
    assert user.tokens_used == 22


def test_usage_add_is_one_update_statement():
    from django.test.utils import CaptureQueriesContext

    user = UserFactory()

    with CaptureQueriesContext(connection) as queries:
        usage_add(user_id=user.pk, audio_seconds=1, tokens=1)

    assert len(queries) == 1
    assert queries[0]["sql"].lstrip().upper().startswith("UPDATE")


def test_usage_add_touches_only_that_user():
    user, other = UserFactory(), UserFactory(tokens_used=3)

    usage_add(user_id=user.pk, tokens=100)

    other.refresh_from_db()
    assert other.tokens_used == 3


@pytest.mark.django_db(transaction=True)
def test_concurrent_usage_add_loses_nothing():
    # given
    user = UserFactory()
    errors: list[BaseException] = []

    def add_many():
        try:
            for _ in range(10):
                usage_add(user_id=user.pk, audio_seconds=0.5, tokens=3)
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
    user.refresh_from_db()
    assert user.tokens_used == 4 * 10 * 3
    assert user.audio_seconds_used == pytest.approx(4 * 10 * 0.5)


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
