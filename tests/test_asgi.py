"""config/asgi.py: a server on the public development SECRET_KEY (anyone could forge
its sessions) answers only this machine's clients, whatever address it listens on.
The peer address is Daphne's TCP peer; this machine has loopback addresses only, so
the scopes below stand in for a remote peer."""

import pytest
from channels.testing import ApplicationCommunicator

from config.asgi import application


def http_scope(client) -> dict:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": "/healthz", "raw_path": b"/healthz", "query_string": b"",
        "headers": [(b"host", b"127.0.0.1")], "client": client, "server": ("127.0.0.1", 8000),
    }  # fmt: skip


async def get(client) -> tuple[int, bytes]:
    communicator = ApplicationCommunicator(application, http_scope(client))
    await communicator.send_input({"type": "http.request", "body": b""})
    start = await communicator.receive_output(timeout=5)
    body = await communicator.receive_output(timeout=5)
    await communicator.wait(timeout=5)
    return start["status"], body["body"]


@pytest.mark.parametrize(
    "client", [("127.0.0.1", 5000), ("::1", 5000), ("::ffff:127.0.0.1", 5000), None]
)
async def test_this_machine_is_served_on_the_development_key(settings, client):
    settings.LOOPBACK_ONLY = True
    status, _ = await get(client)
    assert status == 200


@pytest.mark.parametrize("client", [("203.0.113.9", 5000), ("2001:db8::1", 5000), ("x", 1)])
async def test_another_machine_is_refused_on_the_development_key(settings, client):
    settings.LOOPBACK_ONLY = True
    status, body = await get(client)
    assert status == 403
    assert b"Set SECRET_KEY" in body


async def test_another_machine_is_served_once_a_secret_key_is_set(settings):
    settings.LOOPBACK_ONLY = False
    status, _ = await get(("203.0.113.9", 5000))
    assert status == 200


async def test_a_socket_from_another_machine_is_closed_on_the_development_key(settings):
    settings.LOOPBACK_ONLY = True
    scope = {
        "type": "websocket", "path": "/ws/echo/", "raw_path": b"/ws/echo/", "query_string": b"",
        "headers": [(b"host", b"127.0.0.1"), (b"origin", b"http://127.0.0.1")],
        "client": ("203.0.113.9", 5000), "server": ("127.0.0.1", 8000), "subprotocols": [],
    }  # fmt: skip
    communicator = ApplicationCommunicator(application, scope)
    await communicator.send_input({"type": "websocket.connect"})
    closed = await communicator.receive_output(timeout=5)
    assert (closed["type"], closed["code"]) == ("websocket.close", 4403)
    await communicator.wait(timeout=5)
