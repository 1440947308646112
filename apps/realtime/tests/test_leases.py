"""Concurrent sockets per user (leases.py): past SOCKETS_PER_USER_MAX a socket is
refused with 4409; closing one frees its place; a dead process's leases lapse."""

import asyncio

import pytest
from asgiref.sync import sync_to_async

from apps.accounts.services import session_key_create
from apps.accounts.tests.factories import UserFactory
from apps.conversations.services import conversation_start
from apps.personas.tests.factories import PersonaFactory
from apps.realtime import leases as leases_module
from apps.realtime.leases import SocketLeases
from tests import live

from .test_consumer import closed_with, hello, socket

pytestmark = pytest.mark.usefixtures("transactional_db")


async def opened(conversation_id, key):
    communicator = socket(conversation_id, key)
    assert (await communicator.connect(timeout=10))[0]
    return communicator


async def test_one_socket_past_the_limit_is_refused_and_a_closed_one_frees_its_place(settings):
    settings.SOCKETS_PER_USER_MAX = 2
    settings.LLM_KIND = "echo"
    user = await sync_to_async(UserFactory)()
    conversation = await sync_to_async(conversation_start)(
        user=user, persona=await sync_to_async(PersonaFactory)(llm_kind="echo", greeting="")
    )
    key = await sync_to_async(session_key_create)(user=user)
    first, second = [await opened(conversation.id, key) for _ in range(2)]
    for communicator in (first, second):
        await hello(communicator)

    third = await opened(conversation.id, key)
    error = await third.receive_json_from(timeout=10)
    assert (error["code"], error["fatal"]) == ("too_many_sockets", True)
    assert "2 conversations open" in error["message"]
    assert await closed_with(third) == 4409

    await first.disconnect()
    fourth = await opened(conversation.id, key)
    assert (await hello(fourth))["type"] == "ready"
    for communicator in (second, fourth):
        await communicator.disconnect()


@pytest.fixture
def redis_url():
    port = live.free_port()
    process = live.start_redis(port)
    yield f"redis://127.0.0.1:{port}/4"
    live.stop_by_pid(process)


async def test_the_leases_of_a_process_that_died_lapse_by_themselves(
    settings, redis_url, monkeypatch
):
    settings.SOCKETS_PER_USER_MAX = 1
    monkeypatch.setattr(leases_module, "LEASE_S", 1.0)
    dead, alive = SocketLeases(redis_url), SocketLeases(redis_url)
    assert await dead.acquire(user_id=7, channel="dead-process-socket") == "taken"
    dead.renewer.cancel()  # the process is gone: nothing renews its lease
    assert await alive.acquire(user_id=7, channel="new-socket") == "user_full"  # another one

    await asyncio.sleep(1.2)

    assert await alive.acquire(user_id=7, channel="new-socket") == "taken"
    alive.renewer.cancel()


@pytest.mark.parametrize("store", ["redis", "process"])
async def test_the_fleet_cap_counts_every_processs_sockets_and_frees_a_closed_ones(
    settings, store, request
):
    # given two web processes (one, with no Redis: the process's own count)
    settings.SOCKETS_PER_USER_MAX = 0  # no per-user limit: the fleet's only
    url = request.getfixturevalue("redis_url") if store == "redis" else ""
    first, second = SocketLeases(url), SocketLeases(url) if url else None
    second = second or first

    # when 4 users open sockets against a fleet cap of 3, spread over both
    outcomes = [
        await leases.acquire(user_id=n, channel=f"socket-{n}", fleet_max=3)
        for n, leases in enumerate((first, second, first, second))
    ]

    # then the 4th is refused for the fleet, and closing one lets a new one in
    assert outcomes == ["taken", "taken", "taken", "fleet_full"]
    await first.release(user_id=0, channel="socket-0")
    assert await second.acquire(user_id=3, channel="socket-3", fleet_max=3) == "taken"
    for leases in {first, second}:
        if leases.renewer is not None:
            leases.renewer.cancel()


async def test_a_dead_processs_sockets_leave_the_fleet_count(settings, redis_url, monkeypatch):
    settings.SOCKETS_PER_USER_MAX = 0
    monkeypatch.setattr(leases_module, "LEASE_S", 1.0)
    dead, alive = SocketLeases(redis_url), SocketLeases(redis_url)
    assert await dead.acquire(user_id=1, channel="dead-socket", fleet_max=1) == "taken"
    dead.renewer.cancel()
    assert await alive.acquire(user_id=2, channel="new", fleet_max=1) == "fleet_full"

    await asyncio.sleep(1.2)

    assert await alive.acquire(user_id=2, channel="new", fleet_max=1) == "taken"
    alive.renewer.cancel()
