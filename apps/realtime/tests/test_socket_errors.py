"""Every bad input gets a clear error, and the session goes on: over a real
socket on a real Daphne."""

import json
import struct
import time

import pytest
import websocket
from django.conf import settings

from apps.accounts.models import User
from apps.accounts.services import session_key_create
from apps.accounts.tests.factories import usage_set
from apps.conversations.models import Message

WAV_HEADER = b"RIFF" + struct.pack("<I", 36) + b"WAVEfmt " + bytes(22)


@pytest.mark.parametrize(
    ("send", "code"),
    [
        (lambda c: c.send_bytes(b"\x01\x02\x03"), "bad_audio_frame"),
        (
            lambda c: c.send_bytes(bytes(settings.AUDIO_FRAME_MAX_BYTES + 2)),
            "audio_frame_too_large",
        ),
        (lambda c: c.send_bytes(WAV_HEADER + bytes(100)), "wrong_audio_format"),
        (lambda c: c.ws.send("{not json"), "bad_json"),
        (lambda c: c.ws.send("[1, 2]"), "bad_message"),
        (lambda c: c.send_json({"type": "dance"}), "unknown_type"),
        (lambda c: c.send_json({"type": "text", "text": ""}), "bad_message"),
        (lambda c: c.send_json({"type": "text", "text": "x" * 5000}), "text_too_long"),
        (
            lambda c: c.ws.send(json.dumps({"type": "text", "text": "y" * 20_000})),
            "message_too_large",
        ),
    ],
)
def test_bad_input_gets_an_error_and_the_session_continues(talker, send, code):
    client = talker("ada")
    after = len(client.received)
    send(client)
    error = client.wait_for(lambda e: e["type"] == "error", after=after).event
    assert error["code"] == code and error["message"]
    # the session is still alive and works
    client.send_json({"type": "ping", "t": 7})
    assert client.wait_for(lambda e: e["type"] == "pong", after=after).event["t"] == 7
    client.send_json({"type": "text", "text": "still here?"})
    assert (
        "still here"
        in client.wait_for(lambda e: e["type"] == "reply.done", after=after).event["text"]
    )


def test_audio_faster_than_real_time_is_refused(talker, settings):
    client = talker("ada")
    after = len(client.received)
    for _ in range(int(settings.AUDIO_RATE_BURST_S * 10) + 20):  # 2 s more than the burst
        client.send_bytes(bytes(3200))
    error = client.wait_for(lambda e: e["type"] == "error", after=after).event
    assert error["code"] == "rate_limited"


def test_frames_before_hello_are_refused(talker):
    client = talker("ada", connect=False)
    client.connect(hello=False)
    client.send_bytes(bytes(3200))
    assert client.wait_for(lambda e: e["type"] == "error").event["code"] == "hello_required"


def test_quota_exhausted_is_an_error_and_stores_nothing(talker):
    client = talker("ada", connect=False)
    User.objects.filter(pk=client.user.pk).update(tokens_quota=10)  # read when a socket opens
    usage_set(client.user, tokens=11)
    client.connect()
    after = len(client.received)
    client.send_json({"type": "text", "text": "one more please"})
    error = client.wait_for(lambda e: e["type"] == "error", after=after).event
    assert error["code"] == "quota_exceeded" and "tokens" in error["message"]
    assert not Message.objects.filter(conversation=client.conversation, role="user").exists()


def _refusal(url: str, cookie: str | None, origin: str) -> tuple[int, dict]:
    headers = [f"Cookie: sessionid={cookie}"] if cookie else []
    ws = websocket.create_connection(url, header=headers, origin=origin, timeout=10)
    error = json.loads(ws.recv())
    opcode, data = ws.recv_data(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE
    return int.from_bytes(data[:2], "big"), error


def test_sockets_to_other_peoples_or_missing_conversations_are_refused(talker, voice_server):
    owner = talker("ada")
    url = owner.url
    stranger = User.objects.create_user("stranger", password="pw-123456!")
    origin = voice_server.origin

    code, error = _refusal(url, session_key_create(user=stranger), origin)
    assert (code, error["code"]) == (4403, "forbidden")
    code, error = _refusal(url, None, origin)
    assert (code, error["code"]) == (4401, "unauthenticated")
    missing = url.rsplit("/", 2)[0] + "/00000000-0000-0000-0000-000000000000/"
    code, error = _refusal(missing, session_key_create(user=stranger), origin)
    assert (code, error["code"]) == (4404, "not_found")


def test_a_foreign_origin_is_refused_at_the_handshake(talker):
    owner = talker("ada")
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(
            owner.url,
            header=[f"Cookie: sessionid={owner.session_cookie}"],
            origin="https://evil.example",
            timeout=10,
        )
    assert refused.value.status_code == 403


@pytest.mark.parametrize(
    ("send", "close_code"),
    [
        # over WS_MESSAGE_MAX_BYTES: Daphne (autobahn, capped in config/asgi.py) refuses it
        # while reading, not at its own default of 1 MiB
        (lambda c, cap: c.send_bytes(bytes(cap + 2)), 1009),
        (lambda c, cap: c.ws.send("x" * (cap + 1)), 1009),
        (lambda c, cap: c.ws.send(bytes(1024 * 1024 - 2)), 1009),
        # a text frame that is not UTF-8
        (lambda c, cap: c.ws.send(b'{"type": "ping", "t": "\xff\xfe"}', opcode=1), 1007),
    ],
)
def test_the_server_closes_on_what_is_not_a_message(talker, voice_server, send, close_code):
    client = talker("ada")
    offset = voice_server.log_size()

    send(client, settings.WS_MESSAGE_MAX_BYTES)

    assert client.closed.wait(10)
    assert client.close_code == close_code
    log = voice_server.log_since(offset)
    assert "Traceback" not in log and "Exception inside application" not in log


def test_a_message_at_the_cap_is_read_and_answered(talker):
    client = talker("ada")
    after = len(client.received)

    client.send_bytes(bytes(settings.WS_MESSAGE_MAX_BYTES))  # too long for audio, not a message

    error = client.wait_for(lambda e: e["type"] == "error", after=after).event
    assert error["code"] == "audio_frame_too_large"
    assert not client.closed.is_set()


def test_frames_after_a_4400_are_not_answered_and_raise_nothing(talker, voice_server):
    client = talker("ada", connect=False)
    client.connect(hello=False)
    offset = voice_server.log_size()

    client.send_json({"type": "hello", "protocol": 2})
    for _ in range(50):  # racing the close
        try:
            client.send_json({"type": "ping"})
            client.send_bytes(b"\x01")
        except (OSError, websocket.WebSocketException):
            break

    assert client.closed.wait(10)
    assert client.close_code == 4400
    assert [e["code"] for e in client.events("error")] == ["unsupported_protocol"]
    assert client.events("pong") == []
    time.sleep(1.5)  # Daphne logs an application's exception within a second of its end
    log = voice_server.log_since(offset)
    assert "Exception inside application" not in log and "Traceback" not in log
