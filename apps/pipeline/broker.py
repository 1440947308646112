"""Celery's task message, written from the event loop.

kombu's producer is synchronous and costs ~0.4 ms of CPU a message
(`make bench BENCH=frame`); at hundreds of sessions that is a large part of a
web process's core, and on a thread it still holds the GIL. For a Redis broker
this module writes the same message kombu's Redis transport writes (task
protocol 2, JSON, base64 body; an LPUSH of the envelope onto the queue's list,
as kombu does for the default exchange) from the loop, batching every job
queued during one loop turn into one pipeline on a small bounded pool.
tests/…/test_dispatch.py checks the envelope against kombu's own, and the
end-to-end tests run every message through real Celery workers."""

from __future__ import annotations

import asyncio
import base64
import contextvars
import json
import logging
import os
import socket
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import redis.asyncio as aredis
from django.conf import settings

log = logging.getLogger(__name__)

ORIGIN = f"gen{os.getpid()}@{socket.gethostname()}"
RETRY_DELAYS_S = (0.1, 0.4, 1.0, 1.5)  # then the job is reported as not queued
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def task_message(
    *,
    task_name: str,
    kwargs: dict,
    queue: str,
    expires: float | None = None,
    headers: dict | None = None,
) -> bytes:
    """The envelope kombu's Redis transport pushes for `apply_async(kwargs=…,
    queue=…, expires=…, headers=…, ignore_result=True)` of a Celery task."""
    task_id = str(uuid.uuid4())
    body = json.dumps([[], kwargs, EMBED]).encode()
    properties: dict = {
        "correlation_id": task_id,
        "reply_to": "",
        "delivery_mode": 2,
        "delivery_info": {"exchange": "", "routing_key": queue},
        "priority": 0,
        "body_encoding": "base64",
        "delivery_tag": str(uuid.uuid4()),
    }
    deadline = None
    if expires:
        deadline = (datetime.now(UTC) + timedelta(seconds=expires)).isoformat()
        properties["expiration"] = str(int(expires * 1000))
    message_headers: dict[str, object] = {
        "lang": "py",
        "task": task_name,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": deadline,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [settings.CELERY_TASK_TIME_LIMIT, settings.CELERY_TASK_SOFT_TIME_LIMIT],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": "()",
        "kwargsrepr": repr(kwargs),
        "origin": ORIGIN,
        "ignore_result": True,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    message_headers.update(headers or {})
    envelope = {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": message_headers,
        "properties": properties,
    }
    return json.dumps(envelope).encode()


@dataclass(frozen=True)
class Pending:
    queue: str
    message: bytes
    on_error: Callable[[Exception], None] | None


class AsyncProducer:
    """One per event loop: `put` is a list append; the jobs put during one loop
    turn go out together, from a drain task that lives only while there is work."""

    def __init__(self, url: str) -> None:
        pool = aredis.BlockingConnectionPool.from_url(
            url, max_connections=4, timeout=settings.REDIS_POOL_TIMEOUT_S,
            socket_timeout=2, socket_connect_timeout=2,
        )  # fmt: skip
        self.client = aredis.Redis(connection_pool=pool)
        self.pending: list[Pending] = []
        self.draining: asyncio.Task | None = None

    def put(self, job: Pending) -> None:
        self.pending.append(job)
        if self.draining is None or self.draining.done():
            loop = asyncio.get_running_loop()
            # Batches of many sockets' jobs: its log lines carry no one socket's ids.
            self.draining = loop.create_task(
                self.drain(), name="broker-producer", context=contextvars.Context()
            )

    async def drain(self) -> None:
        while self.pending:
            batch, self.pending = self.pending, []
            await self.write(batch)

    async def write(self, batch: list[Pending]) -> None:
        for delay in (*RETRY_DELAYS_S, None):
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    for job in batch:
                        pipe.lpush(job.queue, job.message)
                    await pipe.execute()
                return
            except Exception as exc:  # the broker is down: retry, then tell the callers
                if delay is None:
                    log.warning("could not enqueue %d tasks: %s", len(batch), exc)
                    for job in batch:
                        if job.on_error is not None:
                            job.on_error(exc)
                    return
                await asyncio.sleep(delay)


_producers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def async_producer() -> AsyncProducer:
    loop = asyncio.get_running_loop()
    producer = _producers.get(loop)
    if producer is None:
        producer = _producers[loop] = AsyncProducer(settings.CELERY_BROKER_URL)
    return producer


def writes_natively(broker_url: str) -> bool:
    return broker_url.startswith(("redis://", "rediss://", "unix://"))
