"""The STT workers' registrations (stt_fleet.py), against a Redis of the test's own."""

import socket
import time

import pytest
import redis
from django.conf import settings as django_settings

from apps.pipeline import stt_fleet
from apps.pipeline.stt_fleet import Registration, stt_workers_count
from tests import live


@pytest.fixture
def store_url(settings):
    port = live.free_port()
    process = live.start_redis(port)
    settings.AUDIO_STORE_URL = f"redis://127.0.0.1:{port}/4"
    yield settings.AUDIO_STORE_URL
    live.stop_by_pid(process)


def test_a_worker_counts_while_it_runs_and_stops_counting_when_it_drains(store_url, monkeypatch):
    monkeypatch.setattr(stt_fleet, "REGISTER_EVERY_S", 0.1)
    first, second = Registration(store_url), Registration(store_url)
    second.key += ":second"  # two processes
    for registration in (first, second):
        registration.start()
    deadline = time.monotonic() + 5
    while stt_workers_count() < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stt_workers_count() == 2
    ttl = redis.Redis.from_url(store_url).ttl(first.key)
    assert 0 < ttl <= stt_fleet.REGISTER_TTL_S  # a worker that dies lapses by itself

    first.end()

    assert stt_workers_count() == 1
    second.end()
    assert stt_workers_count() == 0


def test_with_no_redis_the_in_process_workers_are_one(settings):
    settings.AUDIO_STORE_URL = ""

    assert stt_workers_count() == 1


def test_a_live_worker_registers_itself_once_it_consumes(live_worker, transactional_db):
    # embedded defaults: the in-process workers, counted as one; services: a real worker
    # (its main process registers at worker_ready, whatever its pool), in the shared Redis
    if live_worker is None:
        assert stt_workers_count() == 1
        return
    key = f"{stt_fleet.PREFIX}{socket.gethostname()}:{live_worker.process.pid}"
    client = redis.Redis.from_url(django_settings.AUDIO_STORE_URL)
    deadline = time.monotonic() + 30
    while not client.exists(key) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.exists(key), list(client.scan_iter(f"{stt_fleet.PREFIX}*"))
    assert stt_workers_count() >= 1
