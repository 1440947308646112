"""A socket keeps the user it authenticated with only while that user's session
stands: a logout closes that session's sockets, a password change or a
deactivation all of the user's, with 4401 within 5 s, on the mode's own channel
layer (Redis in services mode, so on every web process)."""

import asyncio

import pytest
from asgiref.sync import sync_to_async
from django.test import Client

from apps.conversations.services import conversation_start
from apps.personas.tests.factories import PersonaFactory

from .test_consumer import closed_with, hello, socket

pytestmark = pytest.mark.usefixtures("transactional_db")
WITHIN_S = 5


@pytest.fixture
def signed_in(django_user_model):
    """A user with a conversation and two signed-in browsers (two sessions)."""
    user = django_user_model.objects.create_user(
        username="two-devices", password="Pw-1-long-enough"
    )
    conversation = conversation_start(user=user, persona=PersonaFactory())
    browsers = []
    for _ in range(2):
        browser = Client()
        assert browser.login(username="two-devices", password="Pw-1-long-enough")
        browsers.append(browser)
    return user, conversation, browsers


async def open_sockets(conversation, browsers):
    sockets = []
    for browser in browsers:
        communicator = socket(conversation.id, browser.cookies["sessionid"].value)
        assert (await communicator.connect(timeout=10))[0]
        await hello(communicator)
        sockets.append(communicator)
    return sockets


async def ends_signed_out(communicator) -> None:
    async with asyncio.timeout(WITHIN_S):
        while (message := await communicator.receive_json_from())["type"] != "error":
            pass  # what the socket was sent before (the greeting)
        assert (message["code"], message["fatal"]) == ("signed_out", True)
        assert await closed_with(communicator) == 4401


async def stays_open(communicator) -> None:
    await communicator.send_json_to({"type": "ping", "t": "still"})
    async with asyncio.timeout(WITHIN_S):
        while (message := await communicator.receive_json_from())["type"] != "pong":
            assert message["type"] != "error", message


async def test_a_logout_closes_that_sessions_sockets_only(signed_in):
    user, conversation, (laptop, phone) = signed_in
    on_laptop, on_phone = await open_sockets(conversation, [laptop, phone])

    # when the laptop logs out
    response = await sync_to_async(laptop.post)("/accounts/logout/")
    assert response.status_code == 302

    # then its socket is closed as signed out, and the phone's goes on
    await ends_signed_out(on_laptop)
    await stays_open(on_phone)
    await on_phone.disconnect()


@pytest.mark.parametrize("change", ["password", "deactivation"])
async def test_a_password_change_or_deactivation_closes_every_socket_of_the_user(signed_in, change):
    user, conversation, browsers = signed_in
    sockets = await open_sockets(conversation, browsers)

    def apply() -> None:
        stored = type(user).objects.get(pk=user.pk)  # as the admin and the forms have it
        if change == "password":
            stored.set_password("Another-Pw-2-long")
        else:
            stored.is_active = False
        stored.save()

    await sync_to_async(apply)()

    await asyncio.gather(*(ends_signed_out(communicator) for communicator in sockets))
    # and the old session cannot open a new one
    again = socket(conversation.id, browsers[1].cookies["sessionid"].value)
    assert (await again.connect(timeout=10))[0]
    assert (await again.receive_json_from(timeout=WITHIN_S))["code"] == "unauthenticated"
    assert await closed_with(again) == 4401
