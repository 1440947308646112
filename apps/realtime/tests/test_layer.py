"""The Redis channel layer (layer.py) on a Redis of the test's own, in both modes."""

import asyncio

import pytest

from apps.realtime.layer import ChannelLayer
from tests import live


@pytest.fixture
def layer():
    port = live.free_port()
    process = live.start_redis(port)
    host = {
        "address": f"redis://127.0.0.1:{port}/2",
        "socket_timeout": 2,
        "socket_connect_timeout": 2,
    }  # fmt: skip  (as config/settings.py)
    yield ChannelLayer(hosts=[host])
    live.stop_by_pid(process)


async def test_a_read_whose_cancellation_was_swallowed_still_ends_within_a_read(layer):
    # Python 3.11's asyncio.wait_for (redis-py sends each command through it under a
    # socket timeout) can lose a cancellation. channels_redis reads in a loop until a
    # message comes, so a socket's consumer whose read lost its cancel never ended.
    channel = await layer.new_channel()
    read_started = asyncio.Event()

    async def consumer_read():
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            pass  # lost on the way, as wait_for can lose it
        read_started.set()
        return await layer.receive(channel)

    task = asyncio.create_task(consumer_read())
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.wait_for(read_started.wait(), 5)

    done, _ = await asyncio.wait([task], timeout=5)  # a read is 1 s (BRPOP_TIMEOUT_S)
    assert done and task.cancelled()


async def test_a_message_sent_to_a_channel_is_received(layer):
    channel = await layer.new_channel()
    await layer.send(channel, {"type": "hello.there", "n": 1})
    assert await asyncio.wait_for(layer.receive(channel), 5) == {"type": "hello.there", "n": 1}
