"""The channel layer's and audio store's Redis restarts, or freezes, under a live
web process (a Redis of this test's own; the STT runs on the process's in-process
workers, so the broker is not in the way: workers' own Redis faults are
apps/pipeline/tests/test_worker_faults.py).

Guaranteed: the socket stays open, the utterance being spoken survives (its
audio is in the process's buffer and is written again), its final and reply are
stored once and reach the client, and later turns work (the process's sockets
rejoined their groups, layer.py). A frozen Redis holds nothing on the socket
for more than 2 s.

Apart from the database these tests start all they use, so they run in `make test`'s
services run only (Postgres through PgBouncer, as production)."""

import contextlib
import signal
import time

import pytest

from apps.conversations.models import Message
from apps.personas.demo import demo_seed
from apps.pipeline.talk_client import text_turn
from tests import live
from tests.audio import pcm_of

from .conftest import socket_opener

CLIP = "deepspeech_LDC93S1.wav"  # "she had your dark suit in greasy wash water all year"
SILENCE = bytes(64_000)  # 2 s


@pytest.fixture
def own_redis_server(transactional_db, live_env):
    """A Daphne whose channel layer, audio store and cache are on our own Redis."""
    if not live.services_mode():
        pytest.skip("Redis fault tests run in make test's services run")
    with contextlib.ExitStack() as stack:
        port = live.free_port()
        redis = {"process": live.start_redis(port)}
        stack.callback(lambda: live.stop_by_pid(redis["process"]))
        env = {k: v for k, v in live_env.items() if k not in ("REDIS_URL", "CELERY_BROKER_URL")}
        url = f"redis://127.0.0.1:{port}"
        env |= {"CHANNEL_LAYER_URL": f"{url}/2", "AUDIO_STORE_URL": f"{url}/4",
                "CACHE_URL": f"{url}/1", "CELERY_BROKER_URL": ""}  # fmt: skip
        demo_seed()
        server = live.start_daphne(env)
        stack.callback(server.stop)
        clients: list = []
        stack.callback(lambda: [client.close() for client in clients])

        def restart(down_s: float) -> None:
            live.stop_by_pid(redis["process"])
            time.sleep(down_s)
            redis["process"] = live.start_redis(port)

        yield server, clients, redis, restart


def test_a_redis_restart_mid_utterance_loses_nothing_and_the_socket_goes_on(own_redis_server):
    server, clients, _, restart = own_redis_server
    client = socket_opener(server, clients)("ada")
    assert text_turn(client, "Hello before.").reply.status == "complete"
    pcm = pcm_of(CLIP)
    half = len(pcm) // 2 // 3200 * 3200

    # when Redis goes away for 2 s while the user is mid-sentence
    client.stream(pcm[:half])
    restart(down_s=2.0)
    client.stream(pcm[half:] + SILENCE)

    # then the utterance's final comes, once, with its reply, and the socket is still open
    done = client.wait_for(
        lambda e: e["type"] in ("reply.done", "reply.interrupted") and e["seq"] > 3, timeout=90
    ).event
    finals = [e for e in client.events("transcript.final") if e["source"] == "voice"]
    assert len(finals) == 1 and "suit" in finals[0]["text"].lower(), finals
    assert done["status"] == "complete", done
    assert not client.closed.is_set()
    voice = Message.objects.filter(conversation=client.conversation, source="voice")
    assert voice.count() == 1
    # and the next turn works: the socket is back in its group
    assert text_turn(client, "And after the restart?").reply.status == "complete"
    log = server.log_tail(400)
    assert "channel layer back" in log, log
    assert "Exception inside application" not in log, log  # no socket's consumer failed


def test_a_frozen_redis_holds_the_socket_up_no_more_than_2_s(own_redis_server):
    server, clients, redis, _ = own_redis_server
    client = socket_opener(server, clients)("ada")
    assert text_turn(client, "Hello.").reply.status == "complete"

    # when Redis is frozen (SIGSTOP) for 4 s
    redis["process"].send_signal(signal.SIGSTOP)
    try:
        # then the socket answers a ping at once, and a typed turn gets an answer or a
        # clear error within 2 s plus the reply's own time, never a hang
        sent = time.monotonic()
        client.send_json({"type": "ping", "t": "frozen"})
        client.wait_for(lambda e: e["type"] == "pong", timeout=2)
        assert time.monotonic() - sent < 1.0
        time.sleep(3.0)
    finally:
        redis["process"].send_signal(signal.SIGCONT)

    # and once it thaws, turns work again on the same socket
    deadline = time.monotonic() + 30
    while True:
        turn = text_turn(client, "Back?", timeout=30)
        if turn.reply.status == "complete" or time.monotonic() > deadline:
            break
    assert turn.reply.status == "complete"
    assert not client.closed.is_set()
