"""The STT workers alive now, for admission against capacity (apps/realtime/admission.py).

Each worker process that consumes `stt` keeps a key of its own in the audio store's
Redis, `stt:worker:<host>:<pid>`, rewritten every REGISTER_EVERY_S with a TTL of
REGISTER_TTL_S, from Celery's worker_ready until its warm shutdown begins (then
deleted). A worker that dies drops out within the TTL. The web processes count
the keys; with no Redis (embedded defaults) the in-process workers are one."""

from __future__ import annotations

import logging
import os
import socket
import threading

import redis
from django.conf import settings

log = logging.getLogger(__name__)

PREFIX = "stt:worker:"
REGISTER_EVERY_S = 5.0
REGISTER_TTL_S = 15


def worker_key() -> str:
    return f"{PREFIX}{socket.gethostname()}:{os.getpid()}"


def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


class Registration:
    """One worker process's key, kept alive by a daemon thread."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.key = worker_key()
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self.run, name="stt-fleet", daemon=True)
            self.thread.start()

    def run(self) -> None:
        client = _client(self.url)
        while True:
            try:
                client.set(self.key, "1", ex=REGISTER_TTL_S)
            except redis.RedisError as exc:  # the next round tries again, before the TTL
                log.warning("stt worker not registered: %r", exc)
            if self.stop.wait(REGISTER_EVERY_S):
                break
        try:
            client.delete(self.key)
        except redis.RedisError:
            pass  # it lapses
        client.close()

    def end(self) -> None:
        """The worker drains: it takes no new sessions' work, so it stops counting."""
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=3)


def stt_workers_count() -> int:
    """How many STT worker processes are alive (a Redis SCAN: run it on a thread)."""
    url = settings.AUDIO_STORE_URL
    if not url:
        return 1  # the process's own (embedded defaults)
    with _client(url) as client:
        return sum(1 for _ in client.scan_iter(f"{PREFIX}*", count=1000))


_registration: Registration | None = None


def fleet_join(*, queues: set[str]) -> None:
    """The worker consumes now (worker_ready): count it, if it takes `stt` work."""
    global _registration
    url = settings.AUDIO_STORE_URL
    if _registration is None and url and any(q.startswith("stt") for q in queues):
        _registration = Registration(url)
        _registration.start()


def fleet_leave() -> None:
    """Its warm shutdown began (worker_shutting_down)."""
    if _registration is not None:
        _registration.end()
