"""Each socket limit (apps/realtime/limits.py, docs/protocol.md section 12): the
buckets and timers alone, then through the whole ASGI stack with
WebsocketCommunicator, limits shrunk by settings so that each is reached in a
few messages."""

import asyncio
import json
from dataclasses import replace

import pytest
from asgiref.sync import sync_to_async
from autobahn.exception import Disconnected
from channels.layers import get_channel_layer

from apps.conversations.tests.factories import MessageFactory
from apps.realtime.consumers import ConversationConsumer
from apps.realtime.events import event, group_name
from apps.realtime.limits import (
    CLOSE_FLOOD,
    CLOSE_TIMEOUT,
    CLOSE_TOO_BIG,
    Limits,
    SocketLimits,
    TokenBucket,
)
from apps.realtime.protocol import ProtocolError

from .test_consumer import (  # noqa: F401  (fixtures)
    TIMEOUT,
    closed_with,
    connect,
    conversation,
    fast_engines,
    hello,
    settle,
    user,
)


def refusal(call, *args) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        call(*args)
    assert caught.value.message
    return caught.value


@pytest.fixture
def limits(settings) -> Limits:
    return Limits.from_settings()


# --- The buckets and timers alone --------------------------------------------------------


def test_a_token_bucket_starts_full_refills_at_its_rate_and_caps_at_its_burst():
    bucket = TokenBucket(rate=10, burst=3)

    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.1) and not bucket.take(0.1)  # one token in 100 ms
    assert [bucket.take(3600.0) for _ in range(4)] == [True, True, True, False]


def test_tiny_audio_frames_are_counted_as_messages(limits):
    # given 2-byte frames: 1/16 ms of audio each, nothing for the audio-ms bucket
    socket = SocketLimits(limits, now=0.0)
    for _ in range(limits.frames_burst):
        socket.binary(2, 0.0)
        socket.audio(2 / 32, 0.0)

    # then the next frame in the same instant is one too many
    assert refusal(socket.binary, 2, 0.0).code == "too_many_frames"
    # and a second later the rate has refilled that many frames, no more
    for _ in range(int(limits.frames_per_s)):
        socket.binary(2, 1.0)
    assert refusal(socket.binary, 2, 1.0).code == "too_many_frames"


def test_real_time_100_ms_frames_pass_for_an_hour(limits):
    socket = SocketLimits(limits, now=0.0)
    for n in range(36_000):
        socket.binary(3200, n * 0.1)
        socket.audio(100, n * 0.1)
    assert socket.dropped == 0


def test_audio_milliseconds_are_still_limited(limits):
    socket = SocketLimits(limits, now=0.0)
    burst_frames = int(limits.audio_burst_ms / 100)
    for _ in range(burst_frames):
        socket.audio(100, 0.0)
    assert refusal(socket.audio, 100, 0.0).code == "rate_limited"


def test_text_messages_and_hellos_have_their_own_rates(limits):
    socket = SocketLimits(limits, now=0.0)

    socket.hello(0.0)
    assert refusal(socket.hello, 0.5).code == "hello_too_often"
    socket.hello(0.5 + limits.hello_every_s)  # once a second
    for _ in range(limits.control_burst):
        socket.text(20, 10.0)
    assert refusal(socket.text, 20, 10.0).code == "too_many_messages"


def test_a_socket_that_keeps_flooding_is_closed(limits):
    socket = SocketLimits(replace(limits, flood_drops=5, flood_forgive_per_s=1), now=0.0)
    for _ in range(limits.control_burst):
        socket.text(20, 0.0)

    codes = [refusal(socket.text, 20, 0.0) for _ in range(6)]

    assert [c.code for c in codes] == ["too_many_messages"] * 5 + ["flood"]
    assert [c.close_code for c in codes] == [None] * 5 + [CLOSE_FLOOD]
    # drops are forgiven at WS_FLOOD_FORGIVE_PER_S: a flood that stopped is not held against it
    later = SocketLimits(replace(limits, flood_drops=5, flood_forgive_per_s=1), now=0.0)
    for _ in range(limits.control_burst):
        later.text(20, 100.0)
    for second in range(1, 21):
        for _ in range(int(limits.control_per_s)):
            later.text(20, 100.0 + second)
        assert refusal(later.text, 20, 100.0 + second).close_code is None  # one drop a second


def test_a_message_over_the_size_cap_closes_with_1009(limits):
    socket = SocketLimits(limits, now=0.0)
    socket.binary(limits.message_max_bytes, 0.0)
    socket.text(limits.message_max_bytes, 0.0)

    for call in (socket.binary, socket.text):
        refused = refusal(call, limits.message_max_bytes + 1, 0.0)
        assert (refused.code, refused.close_code) == ("message_too_large", CLOSE_TOO_BIG)


def test_timers(limits):
    socket = SocketLimits(limits, now=100.0)

    assert socket.expired(greeted=False, now=100.0) is None
    assert socket.next_check(greeted=False, now=100.0) == limits.hello_timeout_s
    hello_late = socket.expired(greeted=False, now=100.0 + limits.hello_timeout_s)
    assert hello_late and (hello_late.code, hello_late.close_code) == ("hello_timeout", 4408)
    assert socket.expired(greeted=True, now=100.0 + limits.hello_timeout_s) is None

    # idle: nothing sent for WS_IDLE_TIMEOUT_S; any message resets it
    socket.text(10, 150.0)
    assert socket.next_check(greeted=True, now=150.0) == limits.idle_timeout_s
    idle = socket.expired(greeted=True, now=150.0 + limits.idle_timeout_s)
    assert idle and (idle.code, idle.close_code) == ("idle_timeout", CLOSE_TIMEOUT)

    # the session's length, however busy it is
    end = 100.0 + limits.session_max_s
    socket.binary(3200, end)
    too_long = socket.expired(greeted=True, now=end)
    assert too_long and (too_long.code, too_long.close_code) == ("session_too_long", 4408)


# --- Through the consumer ------------------------------------------------------------------

with_db = pytest.mark.usefixtures("transactional_db")


async def pongs_and_errors(communicator) -> tuple[int, list[dict]]:
    """What came back until the socket went quiet: the pongs, and the errors."""
    pongs, errors = 0, []
    while not await communicator.receive_nothing(timeout=0.3):
        output = await communicator.receive_output(timeout=TIMEOUT)
        if output["type"] == "websocket.close":
            errors.append({"close": output.get("code")})
            break
        message = json.loads(output["text"])
        if message["type"] == "pong":
            pongs += 1
        elif message["type"] == "error":
            errors.append(message)
    return pongs, errors


@with_db
async def test_a_flood_of_2_byte_frames_is_refused_by_count(connect, settings):  # noqa: F811
    settings.WS_AUDIO_FRAMES_BURST = 20
    settings.WS_AUDIO_FRAMES_PER_S = 0.01  # no refill while the test runs
    communicator = await connect()
    await hello(communicator, resume_from=1)

    for _ in range(200):  # 12.5 ms of audio in all: far inside the audio-ms limit
        await communicator.send_to(bytes_data=b"\x00\x00")
    sent_back = await settle(communicator)

    assert [e["code"] for e in sent_back] == ["too_many_frames"]  # throttled: once a second


@with_db
async def test_text_messages_are_rate_limited(connect, settings):  # noqa: F811
    settings.WS_CONTROL_BURST = 5
    settings.WS_CONTROL_PER_S = 0.01
    communicator = await connect()
    await hello(communicator, resume_from=1)  # the first of the 5

    for n in range(20):
        await communicator.send_json_to({"type": "ping", "t": n})
    pongs, errors = await pongs_and_errors(communicator)

    assert pongs == 4
    assert [e["code"] for e in errors] == ["too_many_messages"]


@with_db
async def test_hello_at_most_once_a_second(connect, settings):  # noqa: F811
    settings.WS_HELLO_EVERY_S = 0.5
    communicator = await connect()
    await hello(communicator, resume_from=1)

    await communicator.send_json_to({"type": "hello", "resume_from": 0})
    error = await communicator.receive_json_from(timeout=TIMEOUT)
    assert error["code"] == "hello_too_often"
    assert await communicator.receive_nothing(timeout=0.6)  # no ready, no replay

    ready = await hello(communicator, resume_from=0)  # 0.6 s later: allowed again
    assert ready["last_seq"] == 1


@with_db
async def test_a_socket_that_keeps_flooding_is_closed_with_4429(connect, settings):  # noqa: F811
    settings.WS_CONTROL_BURST = 3
    settings.WS_CONTROL_PER_S = 0.01
    settings.WS_FLOOD_CLOSE_DROPS = 10
    settings.WS_FLOOD_FORGIVE_PER_S = 0.01
    communicator = await connect()
    await hello(communicator, resume_from=1)

    for _ in range(50):
        await communicator.send_json_to({"type": "ping"})
    pongs, errors = await pongs_and_errors(communicator)

    assert pongs == 2
    assert errors[0]["code"] == "too_many_messages"
    assert (errors[1]["code"], errors[1]["fatal"]) == ("flood", True)
    assert errors[2] == {"close": CLOSE_FLOOD}


@with_db
@pytest.mark.parametrize("kind", ["bytes_data", "text_data"])
async def test_a_message_over_the_cap_closes_with_1009(connect, settings, kind):  # noqa: F811
    communicator = await connect()
    await hello(communicator, resume_from=1)
    big = b"\x00" * (settings.WS_MESSAGE_MAX_BYTES + 2)

    await communicator.send_to(**{kind: big if kind == "bytes_data" else big.decode()})

    error = await communicator.receive_json_from(timeout=TIMEOUT)
    assert (error["code"], error["fatal"]) == ("message_too_large", True)
    assert await closed_with(communicator) == 1009


@with_db
async def test_a_socket_that_never_says_hello_is_closed_with_4408(connect, settings):  # noqa: F811
    settings.WS_HELLO_TIMEOUT_S = 0.3
    communicator = await connect()

    error = await communicator.receive_json_from(timeout=TIMEOUT)

    assert (error["code"], error["fatal"]) == ("hello_timeout", True)
    assert await closed_with(communicator) == CLOSE_TIMEOUT


@with_db
async def test_before_hello_a_socket_holds_no_group_events(connect, conversation):  # noqa: F811
    # given a socket that has not said hello
    communicator = await connect()
    await communicator.send_json_to({"type": "ping"})
    assert (await communicator.receive_json_from(timeout=TIMEOUT))["code"] == "hello_required"

    # when a turn is published to its conversation
    await get_channel_layer().group_send(
        group_name(conversation.id),
        event("reply.done", reply_id="r-1", seq=7, text="not for this socket yet"),
    )
    await asyncio.sleep(0.2)

    # then it was not in the group, so nothing was held for it
    await hello(communicator, resume_from=1)
    assert await communicator.receive_nothing(timeout=0.3)
    # and after hello it is
    await get_channel_layer().group_send(
        group_name(conversation.id),
        event("reply.done", reply_id="r-2", seq=8, text="live"),
    )
    assert (await communicator.receive_json_from(timeout=TIMEOUT))["seq"] == 8


@with_db
async def test_an_idle_socket_is_closed_with_4408(connect, settings):  # noqa: F811
    settings.WS_IDLE_TIMEOUT_S = 0.4
    communicator = await connect()
    await hello(communicator, resume_from=1)

    error = await communicator.receive_json_from(timeout=TIMEOUT)

    assert (error["code"], error["fatal"]) == ("idle_timeout", True)
    assert await closed_with(communicator) == CLOSE_TIMEOUT


@with_db
async def test_a_busy_socket_is_closed_at_the_session_maximum(connect, settings):  # noqa: F811
    settings.WS_SESSION_MAX_S = 0.6
    communicator = await connect()
    await hello(communicator, resume_from=1)

    pongs = 0
    while True:  # busy: a ping every 0.1 s, so never idle
        await communicator.send_json_to({"type": "ping"})
        message = await communicator.receive_json_from(timeout=TIMEOUT)
        if message["type"] != "pong":
            break
        pongs += 1
        await asyncio.sleep(0.1)

    assert pongs >= 2
    assert (message["code"], message["fatal"]) == ("session_too_long", True)
    assert await closed_with(communicator) == CLOSE_TIMEOUT


@with_db
async def test_a_hello_replays_at_most_the_newest_turns(connect, conversation, settings):  # noqa: F811
    settings.WS_REPLAY_MAX_TURNS = 3

    def more_turns():
        for n in range(2, 8):  # the last one answered: no reply starts on hello
            role = {"role": "assistant", "source": "llm"} if n % 2 else {}
            MessageFactory(conversation=conversation, text=f"turn {n}", **role)

    await sync_to_async(more_turns)()
    communicator = await connect()

    ready = await hello(communicator, resume_from=0)
    replayed = [await communicator.receive_json_from(timeout=TIMEOUT) for _ in range(3)]

    assert ready["last_seq"] == 7
    assert [e["seq"] for e in replayed] == [5, 6, 7]
    assert await communicator.receive_nothing(timeout=0.2)


@with_db
async def test_after_a_refusal_nothing_more_is_sent_or_handled(connect):  # noqa: F811
    communicator = await connect()
    await communicator.send_json_to({"type": "hello", "protocol": 2})
    for _ in range(5):
        await communicator.send_json_to({"type": "ping"})
        await communicator.send_to(bytes_data=b"\x01")

    error = await communicator.receive_json_from(timeout=TIMEOUT)
    assert error["code"] == "unsupported_protocol"
    assert await closed_with(communicator) == 4400
    assert await communicator.receive_nothing(timeout=0.3)


async def test_a_send_after_the_client_closed_is_a_no_op():
    """Daphne raises Disconnected ("Attempt to send on a closed protocol") when a send
    races the client's close; the consumer's one way out swallows it, and sends nothing
    more."""
    consumer = ConversationConsumer()
    sent: list[dict] = []

    async def base_send(message):
        sent.append(message)
        raise Disconnected("Attempt to send on a closed protocol")

    consumer.base_send = base_send

    await consumer.send(text_data="one")
    await consumer.send(text_data="two")
    await consumer.close(code=4400)

    assert consumer.closed
    assert [m.get("text") for m in sent] == ["one"]
