"""Overload admission (admission.py) on a live Daphne whose broker is a Redis of
this test's own, with no worker: the `stt` backlog is what the test puts there."""

import contextlib
import json
import time

import pytest
import redis

from apps.personas.demo import demo_seed
from tests import live

from .conftest import socket_opener


@pytest.fixture
def overloadable(transactional_db, live_env):
    with contextlib.ExitStack() as stack:
        port = live.free_port()
        process = live.start_redis(port)
        stack.callback(live.stop_by_pid, process)
        broker = f"redis://127.0.0.1:{port}/3"
        demo_seed()
        server = live.start_daphne({**live_env, "CELERY_BROKER_URL": broker,
                                    "STT_BACKLOG_REFUSE": "5"})  # fmt: skip
        stack.callback(server.stop)
        clients: list = []
        stack.callback(lambda: [client.close() for client in clients])
        yield server, clients, redis.Redis.from_url(broker)


def test_new_sockets_are_refused_with_1013_past_the_backlog_and_admitted_below_it(
    overloadable,
):
    server, clients, broker = overloadable
    open_on = socket_opener(server, clients)
    admitted = open_on("ada")  # below the bound: admitted

    # when the stt queue holds more windows than the bound
    message = json.dumps({"headers": {"parley_enqueued_at": time.time()}, "body": ""})
    broker.lpush("stt", *[message] * 6)
    time.sleep(1.2)  # the depth is read at most once a second

    # then a new socket gets a readable error and 1013, and the admitted one goes on
    refused = open_on("ada", connect=False)
    refused.connect(hello=False)
    assert refused.closed.wait(10) and refused.close_code == 1013
    (error,) = refused.events("error")
    assert (error["code"], error["fatal"]) == ("overloaded", True)
    assert "Try again" in error["message"]
    admitted.send_json({"type": "ping", "t": "still"})
    admitted.wait_for(lambda e: e["type"] == "pong", timeout=5)

    # and once the backlog is worked off, new sockets are admitted again
    broker.delete("stt")
    time.sleep(1.2)
    assert open_on("ada").ready["type"] == "ready"


@pytest.fixture
def capped(transactional_db, live_env):
    """A live Daphne admitting 2 sockets per live STT worker, its audio store (where
    workers register) and broker a Redis of this test's own; no worker runs."""
    with contextlib.ExitStack() as stack:
        port = live.free_port()
        process = live.start_redis(port)
        stack.callback(live.stop_by_pid, process)
        demo_seed()
        server = live.start_daphne({**live_env, "CELERY_BROKER_URL": f"redis://127.0.0.1:{port}/3",
                                    "AUDIO_STORE_URL": f"redis://127.0.0.1:{port}/4",
                                    "STT_SESSIONS_PER_WORKER": "2"})  # fmt: skip
        stack.callback(server.stop)
        clients: list = []
        stack.callback(lambda: [client.close() for client in clients])
        yield server, clients, redis.Redis.from_url(f"redis://127.0.0.1:{port}/4")


def refused_for_capacity(open_on) -> bool:
    client = open_on("ada", connect=False)
    client.connect(hello=False)
    if not client.closed.wait(3):
        client.close()
        return False
    (error,) = client.events("error")
    return client.close_code == 1013 and error["code"] == "overloaded"


def test_sockets_past_the_live_stt_workers_capacity_are_refused_before_any_backlog(capped):
    server, clients, store = capped
    open_on = socket_opener(server, clients)
    store.set("stt:worker:host-a:1", "1", ex=60)  # one live STT worker: 2 sockets
    time.sleep(1.2)  # the workers are counted at most once a second

    # when 2 users are talking, with nothing queued for STT
    first, second = open_on("ada"), open_on("ada")
    assert (first.ready["type"], second.ready["type"]) == ("ready", "ready")

    # then a third is refused with 1013 and the readable reason, the admitted ones go on
    assert refused_for_capacity(open_on)
    first.send_json({"type": "ping", "t": "still"})
    first.wait_for(lambda e: e["type"] == "pong", timeout=5)

    # and a closed socket frees its place
    first.close()
    time.sleep(0.5)
    third = open_on("ada")
    assert third.ready["type"] == "ready"
    assert refused_for_capacity(open_on)

    # and a second worker (scaled out) doubles the capacity; a worker gone lowers it again
    store.set("stt:worker:host-b:1", "1", ex=60)
    time.sleep(1.2)
    assert open_on("ada").ready["type"] == "ready"
    assert open_on("ada").ready["type"] == "ready"
    assert refused_for_capacity(open_on)
