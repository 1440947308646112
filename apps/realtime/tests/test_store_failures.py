"""A real Redis failure under a live socket: the audio store of a Daphne of
this test's own is a Redis server of this test's own, stopped while the user
speaks and started again. The socket stays open, the client hears a
documented error, the utterance's audio (kept in the web process) is written
again, its final arrives, and the next turn works."""

import contextlib
import time

import pytest
import redis

from apps.personas.tests.factories import PersonaFactory
from config.celery import worker_arguments
from tests import live
from tests.audio import pcm_of

from .conftest import socket_opener

CLIP = "deepspeech_LDC93S1.wav"
SILENCE = bytes(64_000)  # 2 s


def start_worker(env: dict) -> live.LiveWorker:
    """A Celery worker on this test's own broker; ready when its log says so."""
    command = live._command(
        "celery", "-A", "config", "worker", *worker_arguments("all"),
        "-n", f"store-failure-{time.time_ns()}@localhost", "--without-gossip",
        "--without-mingle", "--loglevel", "INFO",
    )  # fmt: skip
    proc = live._spawn(command, env, f"celery-store-failure-{time.time_ns()}.log")
    worker = live.LiveWorker(process=proc.process, log_path=proc.log_path, log_file=proc.log_file)
    live.wait_until(lambda: " ready." in worker.log_tail(200), worker, "Celery worker", 90)
    return worker


def spoken_final(client, pcm: bytes) -> dict:
    """Stream `pcm` and 2 s of silence; the final transcript that follows."""
    after = len(client.received)
    client.stream(pcm + SILENCE)
    return client.wait_for(lambda e: e["type"] == "transcript.final", timeout=90, after=after).event


@pytest.fixture
def started():
    """What a test starts (servers, workers, sockets): stopped at its end, last first."""
    with contextlib.ExitStack() as stack:
        yield stack


@pytest.fixture
def own_redis():
    port = live.free_port()
    holder = {"port": port, "process": live.start_redis(port)}
    yield holder
    holder["process"].terminate()
    holder["process"].wait(10)


def test_a_redis_restart_mid_utterance_keeps_the_socket_and_the_audio(
    transactional_db, live_env, services_mode, own_redis, started
):
    store = f"redis://127.0.0.1:{own_redis['port']}/0"
    env = {**live_env, "AUDIO_STORE_URL": store, "STT_PARTIAL_EVERY_MS": "600000"}
    if services_mode:  # a worker that reads this store, on a broker database of its own
        env["CELERY_BROKER_URL"] = live_env["REDIS_URL"].rsplit("/", 1)[0] + "/11"
        redis.Redis.from_url(env["CELERY_BROKER_URL"]).flushdb()
        started.callback(start_worker(env).stop)
    server = live.start_daphne(env)
    started.callback(server.stop)
    clients: list = []
    started.callback(lambda: [client.close() for client in clients])
    PersonaFactory(slug="store-failure", llm_kind="echo", tts_kind="espeak")
    client = socket_opener(server, clients)("store-failure")
    pcm = pcm_of(CLIP)
    half = len(pcm) // 2 // 3200 * 3200

    # when Redis goes away while the user speaks
    client.stream(pcm[:half])
    own_redis["process"].kill()
    own_redis["process"].wait(10)
    client.stream(pcm[half:])
    error = client.wait_for(lambda e: e["type"] == "error", timeout=30).event

    # then the client hears a documented code and the socket stays open
    assert error["code"] == "store_unavailable"
    client.send_json({"type": "ping", "t": "still-there"})
    client.wait_for(lambda e: e["type"] == "pong" and e["t"] == "still-there", timeout=10)

    # and once Redis is back, the utterance's audio is written again and transcribed
    own_redis["process"] = live.start_redis(own_redis["port"])
    assert "all year" in spoken_final(client, b"")["text"].lower()  # the whole clip

    # and the next turn works
    assert "all year" in spoken_final(client, pcm)["text"].lower()
    assert client.close_code is None and not client.closed.is_set()


def test_a_dead_broker_keeps_the_socket_and_the_next_turn_works(
    transactional_db, live_env, services_mode, started
):
    # given a Daphne whose broker is a Redis server that is not there yet
    port = live.free_port()
    broker = f"redis://127.0.0.1:{port}/0"
    server = live.start_daphne({**live_env, "CELERY_BROKER_URL": broker})
    started.callback(server.stop)
    clients: list = []
    started.callback(lambda: [client.close() for client in clients])
    PersonaFactory(slug="broker-failure", llm_kind="echo", tts_kind="espeak")
    client = socket_opener(server, clients)("broker-failure")
    pcm = pcm_of(CLIP)

    # when the user speaks, the STT jobs cannot be enqueued
    client.stream(pcm + SILENCE)
    error = client.wait_for(lambda e: e["type"] == "error", timeout=60).event

    # then the client hears so, and the socket stays open and usable
    assert error["code"] == "stt_unavailable"
    client.send_json({"type": "text", "text": "are you there"})
    done = client.wait_for(lambda e: e["type"] == "reply.done" and e["seq"] > 1, timeout=60)
    assert "are you there" in done.event["text"]
    assert client.close_code is None and not client.closed.is_set()

    if services_mode:  # and once the broker is back (with a worker), speech works again
        redis_process = live.start_redis(port)
        started.callback(lambda: (redis_process.terminate(), redis_process.wait(10)))
        started.callback(start_worker({**live_env, "CELERY_BROKER_URL": broker}).stop)
        assert "all year" in spoken_final(client, pcm)["text"].lower()
