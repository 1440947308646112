"""Sign-in and sign-up throttling (apps/accounts/throttle.py), through the real
forms and the configured cache (Redis in services mode, shared by every process).
Each test uses addresses and usernames of its own: counters outlive a test run."""

import uuid

import pytest
from django.contrib.auth import SESSION_KEY

from .factories import PASSWORD, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def limits(settings):
    settings.AUTH_THROTTLE_LOGIN_PER_IP = 6
    settings.AUTH_THROTTLE_LOGIN_PER_USER = 3
    settings.AUTH_THROTTLE_SIGNUP_PER_IP = 2
    settings.AUTH_THROTTLE_WINDOW_S = 60


def address() -> str:
    """A documentation-range address no other run of this test used."""
    n = uuid.uuid4().int
    return f"2001:db8:{n % 65536:x}:{(n >> 16) % 65536:x}::{(n >> 32) % 65536:x}"


def login(client, username, password, ip, path="/accounts/login/"):
    return client.post(path, {"username": username, "password": password}, REMOTE_ADDR=ip)


def test_wrong_passwords_for_one_user_lock_that_login_from_any_address(client, limits):
    user = UserFactory(username=f"victim-{uuid.uuid4().hex[:8]}")
    for _ in range(3):
        assert login(client, user.username, "wrong", address()).status_code == 200  # the form
    # then even the right password, from a new address, is refused for now
    refused = login(client, user.username, PASSWORD, address())
    assert refused.status_code == 429
    assert refused["Retry-After"] == "60"
    assert "Too many attempts" in refused.content.decode()
    assert SESSION_KEY not in client.session
    # and another user from that address still signs in
    other = UserFactory()
    assert login(client, other.username, PASSWORD, address()).status_code == 302


def test_one_address_trying_many_usernames_is_refused(client, limits):
    ip = address()
    for n in range(6):
        assert login(client, f"guess-{n}-{uuid.uuid4().hex[:6]}", "x", ip).status_code == 200
    assert login(client, "guess-last", "x", ip).status_code == 429
    assert login(client, "guess-last", "x", address()).status_code == 200  # others are not


def test_the_admin_login_shares_the_login_limits(client, limits):
    user = UserFactory(username=f"staff-{uuid.uuid4().hex[:8]}", is_staff=True)
    for _ in range(3):
        assert login(client, user.username, "wrong", address(), "/admin/login/").status_code == 200
    assert login(client, user.username, PASSWORD, address(), "/admin/login/").status_code == 429
    assert login(client, user.username, PASSWORD, address()).status_code == 429  # one counter


def test_sign_ups_per_address_are_limited(client, limits):
    ip = address()

    def sign_up():
        name = f"new-{uuid.uuid4().hex[:8]}"
        fields = {"username": name, "email": f"{name}@example.com",
                  "password1": PASSWORD, "password2": PASSWORD}  # fmt: skip
        client.logout()
        return client.post("/accounts/signup/", fields, REMOTE_ADDR=ip)

    assert [sign_up().status_code for _ in range(3)] == [302, 302, 429]


def test_a_page_view_is_never_counted(client, limits):
    ip = address()
    for _ in range(10):
        assert client.get("/accounts/login/", REMOTE_ADDR=ip).status_code == 200
    assert login(client, "someone", "x", ip).status_code == 200


def test_behind_a_trusted_proxy_the_address_it_appended_counts(client, limits, settings):
    settings.TRUST_PROXY_HEADERS = True
    real = address()
    for n in range(6):  # the client forges a different first hop each time
        forged = f"{address()}, {real}"
        response = client.post(
            "/accounts/login/", {"username": f"u{n}", "password": "x"},
            REMOTE_ADDR="127.0.0.1", HTTP_X_FORWARDED_FOR=forged,
        )  # fmt: skip
        assert response.status_code == 200
    response = client.post(
        "/accounts/login/", {"username": "u", "password": "x"},
        REMOTE_ADDR="127.0.0.1", HTTP_X_FORWARDED_FOR=f"{address()}, {real}",
    )  # fmt: skip
    assert response.status_code == 429


def test_a_cache_that_is_down_locks_nobody_out(client, limits, monkeypatch):
    from apps.accounts import throttle

    def down(*args, **kwargs):
        raise ConnectionError("cache down")

    monkeypatch.setattr(throttle.cache, "incr", down)
    user = UserFactory()
    for _ in range(5):
        login(client, user.username, "wrong", address())
    assert login(client, user.username, PASSWORD, address()).status_code == 302
