"""Figures read at scrape time, and the web process's event-loop lag timer.

- Queues (`parley_queue_depth`, `parley_queue_oldest_age_seconds`) for each
  Celery queue: with a Redis broker the length of the queue's lists (kombu's
  Redis transport LPUSHes and BRPOPs, so the oldest message is at index -1;
  with `queue_order_strategy=priority` a queue is one list per priority step,
  `<queue>` for priority 0 and `<queue>\\x06\\x16<n>` for the others) and the
  `parley_enqueued_at` header of each list's oldest message; with no broker
  (embedded) the in-process executors' backlog (apps/pipeline/dispatch.py).
- PgBouncer's pools (`SHOW POOLS` on its admin console), when
  PGBOUNCER_STATS_URL names it.

Both read once a scrape at most every QUEUE_CACHE_S / PGBOUNCER_CACHE_S, on the
scraping thread: the web /metrics view is a sync view (Django runs it on a
worker thread), never the event loop. Web processes register them
(`web_process_start`); workers export only their own figures."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from django.conf import settings
from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import metrics

log = logging.getLogger(__name__)

QUEUES = ("default", "stt", "stt_partial", "tts")
PRIORITY_SEP = "\x06\x16"  # kombu.transport.redis
PRIORITY_STEPS = (0, 3, 6, 9)  # kombu's default priority_steps
QUEUE_CACHE_S = 1.0
PGBOUNCER_CACHE_S = 2.0


class _Cached:
    """The last `collect` for `ttl` seconds; one reader at a time."""

    def __init__(self, read: Callable[[], list[Metric]], ttl: float) -> None:
        self.read, self.ttl = read, ttl
        self.lock = threading.Lock()
        self.at = -1e9
        self.value: list[Metric] = []

    def get(self) -> list[Metric]:
        with self.lock:
            if time.monotonic() - self.at >= self.ttl:
                self.value = self.read()
                self.at = time.monotonic()
            return self.value


# --- Queues ----------------------------------------------------------------------


def priority_keys(queue: str) -> list[str]:
    """The Redis lists kombu keeps for one queue with the priority strategy."""
    return [queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS]


def enqueued_at(raw: bytes | None) -> float | None:
    """The `parley_enqueued_at` header (epoch seconds) of a kombu Redis message."""
    if raw is None:
        return None
    try:
        value = json.loads(raw).get("headers", {}).get("parley_enqueued_at")
        return float(value) if value is not None else None
    except (ValueError, TypeError, AttributeError):
        return None


def redis_queue_figures(client, queues: Iterable[str] = QUEUES) -> dict[str, tuple[int, float]]:
    """{queue: (depth, age of the oldest message in seconds)}, in one round trip."""
    queues = list(queues)
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        for key in priority_keys(queue):
            pipe.llen(key)
            pipe.lindex(key, -1)
    answers = pipe.execute()
    now, figures, at = time.time(), {}, 0
    for queue in queues:
        depth, oldest = 0, None
        for _ in PRIORITY_STEPS:
            length, raw = answers[at], answers[at + 1]
            at += 2
            depth += int(length)
            stamp = enqueued_at(raw) if length else None
            if stamp is not None:
                oldest = stamp if oldest is None else min(oldest, stamp)
        figures[queue] = (depth, max(0.0, now - oldest) if oldest is not None else 0.0)
    return figures


def embedded_queue_figures(queues: Iterable[str] = QUEUES) -> dict[str, tuple[int, float]]:
    from apps.pipeline.dispatch import in_process_backlog

    now, figures = time.time(), {}
    for queue in queues:
        depth, oldest = in_process_backlog(queue)
        figures[queue] = (depth, max(0.0, now - oldest) if oldest is not None else 0.0)
    return figures


class QueueCollector(Collector):
    def __init__(self, broker_url: str = "", queues: Iterable[str] = QUEUES) -> None:
        self.broker_url = broker_url
        self.queues = tuple(queues)
        self.client: Any = None
        self.cache = _Cached(self.read, QUEUE_CACHE_S)

    def figures(self) -> dict[str, tuple[int, float]]:
        if not self.broker_url:
            return embedded_queue_figures(self.queues)
        if self.client is None:
            import redis

            self.client = redis.Redis.from_url(
                self.broker_url, socket_timeout=1, socket_connect_timeout=1
            )
        return redis_queue_figures(self.client, self.queues)

    def read(self) -> list[Metric]:
        depth = GaugeMetricFamily(
            metrics.QUEUE_DEPTH._name, metrics.QUEUE_DEPTH._documentation, labels=["queue"]
        )
        age = GaugeMetricFamily(
            metrics.QUEUE_AGE._name, metrics.QUEUE_AGE._documentation, labels=["queue"]
        )
        try:
            figures = self.figures()
        except Exception as exc:  # the broker is down: no figures (alerts see them absent)
            log.warning("queue figures unavailable: %s", exc)
            return []
        for queue, (waiting, oldest_s) in figures.items():
            depth.add_metric([queue], waiting)
            age.add_metric([queue], oldest_s)
        return [depth, age]

    def collect(self) -> Iterable[Metric]:
        return self.cache.get()

    def describe(self) -> Iterable[Metric]:
        return []  # read at scrape time only, never at registration


# --- PgBouncer ---------------------------------------------------------------------

CLIENT_STATES = {"cl_active": "active", "cl_waiting": "waiting"}
SERVER_STATES = {
    "sv_active": "active",
    "sv_idle": "idle",
    "sv_used": "used",
    "sv_tested": "tested",
    "sv_login": "login",
}


def pgbouncer_pools(url: str, connect_timeout_s: int = 2) -> list[dict]:
    """SHOW POOLS on PgBouncer's admin console (its `pgbouncer` database), as dicts."""
    import psycopg

    with psycopg.connect(
        url, autocommit=True, connect_timeout=connect_timeout_s, prepare_threshold=None
    ) as admin:
        cursor = admin.execute("SHOW POOLS")
        names = [column.name for column in cursor.description or []]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def pgbouncer_families(pools: list[dict] | None) -> list[Metric]:
    up = GaugeMetricFamily(metrics.PGBOUNCER_UP, "1 when PgBouncer's SHOW POOLS answered.")
    up.add_metric([], 0 if pools is None else 1)
    if pools is None:
        return [up]
    clients = GaugeMetricFamily(
        metrics.PGBOUNCER_CLIENTS,
        "Client connections of PgBouncer's pools, by database and state.",
        labels=["database", "state"],
    )
    servers = GaugeMetricFamily(
        metrics.PGBOUNCER_SERVERS,
        "Server (Postgres) connections of PgBouncer's pools, by database and state.",
        labels=["database", "state"],
    )
    max_wait = GaugeMetricFamily(
        metrics.PGBOUNCER_MAX_WAIT,
        "How long the oldest waiting client of a database has waited.",
        labels=["database"],
    )
    totals: dict[str, dict[str, float]] = {}
    for pool in pools:
        database = str(pool.get("database", ""))
        if database == "pgbouncer":
            continue  # the admin console itself
        figures = totals.setdefault(database, {})
        for column in (*CLIENT_STATES, *SERVER_STATES):
            figures[column] = figures.get(column, 0) + int(pool.get(column) or 0)
        wait = int(pool.get("maxwait") or 0) + int(pool.get("maxwait_us") or 0) / 1e6
        figures["maxwait"] = max(figures.get("maxwait", 0.0), wait)
    for database, figures in sorted(totals.items()):
        for column, state in CLIENT_STATES.items():
            clients.add_metric([database, state], figures[column])
        for column, state in SERVER_STATES.items():
            servers.add_metric([database, state], figures[column])
        max_wait.add_metric([database], figures["maxwait"])
    return [up, clients, servers, max_wait]


class PgBouncerCollector(Collector):
    def __init__(self, url: str) -> None:
        self.url = url
        self.cache = _Cached(self.read, PGBOUNCER_CACHE_S)

    def read(self) -> list[Metric]:
        try:
            pools: list[dict] | None = pgbouncer_pools(self.url)
        except Exception as exc:  # reported as parley_pgbouncer_up 0
            log.warning("PgBouncer's SHOW POOLS failed: %s", exc)
            pools = None
        return pgbouncer_families(pools)

    def collect(self) -> Iterable[Metric]:
        return self.cache.get()

    def describe(self) -> Iterable[Metric]:
        return []


# --- Event-loop lag (web processes) --------------------------------------------------


class _LoopLag:
    started_on: asyncio.AbstractEventLoop | None = None


def loop_lag_watch() -> None:
    """On the running loop, once per process: a timer every LOOP_LAG_INTERVAL_MS
    observes how late it fires (parley_event_loop_lag_seconds). Cheap to call on
    every connection (config/asgi.py does, on the first it serves)."""
    if _LoopLag.started_on is not None:
        return
    loop = asyncio.get_running_loop()
    _LoopLag.started_on = loop
    interval = settings.LOOP_LAG_INTERVAL_MS / 1000
    if interval <= 0:
        return
    observe = metrics.LOOP_LAG.observe

    def tick(expected: float) -> None:
        now = loop.time()
        observe(max(0.0, now - expected))
        loop.call_at(now + interval, tick, now + interval)

    start = loop.time() + interval
    loop.call_at(start, tick, start)


# --- Web processes --------------------------------------------------------------------

_registered: list[Collector] = []


def web_process_start() -> None:
    """A web process: its role, and the figures it exports for the whole system."""
    metrics.process_role(settings.PARLEY_ROLE or "web")
    if _registered:
        return
    _registered.append(QueueCollector(settings.CELERY_BROKER_URL))
    if settings.PGBOUNCER_STATS_URL:
        _registered.append(PgBouncerCollector(settings.PGBOUNCER_STATS_URL))
    for collector in _registered:
        REGISTRY.register(collector)
