"""The web process's probes, answered in front of Django (config/asgi.py wraps
the HTTP application in `HealthProbes`), so no middleware runs for them: no
session, no database, no ALLOWED_HOSTS check of the kubelet's pod-IP Host header.

- `/healthz`, liveness: the process and its event loop answer. It touches
  nothing else, so it stays 200 while Postgres or Redis are down (restarting
  the pod would not bring them back).
- `/readyz`, readiness: what the web role needs answers: the database (through
  PgBouncer), the cache, and the Redis servers of the channel layer, the Celery
  broker and the live audio store where they are configured. 503 names the check
  that failed. A result is reused for READINESS_CACHE_S, so probes and load
  balancers never hammer the database; the checks run on threads (one each, a
  check still running is not started again) and the probe waits at most
  READINESS_TIMEOUT_S for them, so a dead Postgres or Redis cannot hang it.
  While the process drains (the file READINESS_DRAIN_FILE exists: the pod's
  preStop hook touches it) it answers 503 `draining` at once.

`Readiness` takes any named checks: a worker's probe can reuse it."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future

from . import metrics

PROBES = ("/healthz", "/readyz")
Check = Callable[[], None]  # returns when the dependency answers, raises when it does not


def _outcome(check: Check) -> str:
    try:
        check()
    except Exception as exc:  # noqa: BLE001 — reported by name, never raised
        return f"error: {exc.__class__.__name__}"
    return "ok"


class _CheckThread:
    """One daemon thread per check, which keeps its connections (the database check's
    connection to PgBouncer is reused) and never holds up the process's exit when a
    check hangs (an executor's threads are joined at exit)."""

    def __init__(self, name: str, check: Check) -> None:
        self.check = check
        self.requests: queue.SimpleQueue[Future[str]] = queue.SimpleQueue()
        threading.Thread(target=self.run, name=f"readiness-{name}", daemon=True).start()

    def submit(self) -> Future[str]:
        future: Future[str] = Future()
        self.requests.put(future)
        return future

    def run(self) -> None:
        while True:
            future = self.requests.get()
            future.set_result(_outcome(self.check))


class Readiness:
    """Named checks, run on their own threads, combined and cached."""

    def __init__(
        self,
        checks: Mapping[str, Check],
        *,
        cache_s: float,
        timeout_s: float,
        drain_file: str = "",
    ) -> None:
        self.checks = dict(checks)
        self.cache_s = cache_s
        self.timeout_s = timeout_s
        self.drain_file = drain_file
        self.threads = {name: _CheckThread(name, check) for name, check in checks.items()}
        self.running: dict[str, Future[str]] = {}
        self.result: tuple[bool, dict[str, str]] | None = None
        self.result_at = 0.0
        self.computing: asyncio.Future[tuple[bool, dict[str, str]]] | None = None

    def draining(self) -> bool:
        return bool(self.drain_file) and os.path.exists(self.drain_file)

    async def report(self) -> tuple[bool, dict[str, str]]:
        """(ready, body): the cached result while it is fresh, else a new one."""
        if self.draining():
            metrics.READY.set(0)
            return False, {"status": "draining"}
        if self.result is not None and time.monotonic() - self.result_at < self.cache_s:
            return self.result
        if self.computing is None or self.computing.done():
            self.computing = asyncio.ensure_future(self._compute())
        return await asyncio.shield(self.computing)  # probes at the same time share one run

    async def _compute(self) -> tuple[bool, dict[str, str]]:
        waiting = {}
        for name in self.checks:
            running = self.running.get(name)
            if running is None or running.done():  # a hung check is not started twice
                running = self.running[name] = self.threads[name].submit()
            waiting[name] = asyncio.wrap_future(running)
        if waiting:
            await asyncio.wait(waiting.values(), timeout=self.timeout_s)
        checks = {
            name: future.result()
            if future.done()
            else f"error: no answer within {self.timeout_s:g} s"
            for name, future in waiting.items()
        }
        ok = all(value == "ok" for value in checks.values())
        self.result = (ok, {"status": "ok" if ok else "unavailable", **checks})
        self.result_at = time.monotonic()
        metrics.READY.set(1 if ok else 0)
        return self.result


# --- The web role's checks -------------------------------------------------------------


def database_check() -> None:
    """SELECT 1 on this thread's connection (kept open, as every connection to PgBouncer is)."""
    from django.db import connection

    try:
        connection.close_if_unusable_or_obsolete()
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception:
        connection.close()
        raise


def cache_check() -> None:
    from django.core.cache import cache

    cache.set("readyz", "1", 5)
    if cache.get("readyz") != "1":
        raise RuntimeError("the cache did not keep a value")


def redis_check(url: str, timeout_s: float) -> Check:
    """PING a Redis server, with no retries and short timeouts."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client = redis.Redis.from_url(
        url,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )

    def check() -> None:
        client.ping()

    return check


def web_checks(timeout_s: float) -> dict[str, Check]:
    from django.conf import settings

    from apps.pipeline.broker import writes_natively

    checks: dict[str, Check] = {"database": database_check, "cache": cache_check}
    for name, url in (
        ("channel_layer", settings.CHANNEL_LAYER_URL),
        ("broker", settings.CELERY_BROKER_URL),
        ("audio_store", settings.AUDIO_STORE_URL),
    ):
        if url and writes_natively(url):
            checks[name] = redis_check(url, timeout_s)
    return checks


def web_readiness() -> Readiness:
    from django.conf import settings

    timeout_s = settings.READINESS_TIMEOUT_S
    return Readiness(
        web_checks(timeout_s),
        cache_s=settings.READINESS_CACHE_S,
        timeout_s=timeout_s,
        drain_file=settings.READINESS_DRAIN_FILE,
    )


# --- ASGI ---------------------------------------------------------------------------------


class HealthProbes:
    """ASGI middleware: answers the probes, passes everything else to `app`."""

    def __init__(self, app, readiness: Callable[[], Readiness] = web_readiness) -> None:
        self.app = app
        self.make_readiness = readiness
        self.readiness: Readiness | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in PROBES:
            return await self.app(scope, receive, send)
        if scope["method"] not in ("GET", "HEAD"):
            body = {"error": "method_not_allowed", "message": "Probes answer GET and HEAD."}
            return await _respond(send, 405, body, scope["method"], [(b"allow", b"GET, HEAD")])
        if scope["path"] == "/healthz":
            return await _respond(send, 200, {"status": "ok"}, scope["method"])
        if self.readiness is None:
            self.readiness = self.make_readiness()
        ready, body = await self.readiness.report()
        await _respond(send, 200 if ready else 503, body, scope["method"])


async def _respond(send, status: int, body: dict, method: str, headers=()) -> None:
    content = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(content)).encode()),
                (b"cache-control", b"no-store"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": b"" if method == "HEAD" else content})
