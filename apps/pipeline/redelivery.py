"""Redelivered tasks, capped: the base class of every Celery task (config/celery.py).

Tasks are acknowledged after they ran (CELERY_TASK_ACKS_LATE), so the broker gives a
task whose worker died back to a worker: at once when a prefork child dies
(CELERY_TASK_REJECT_ON_WORKER_LOST), after CELERY_VISIBILITY_TIMEOUT_S when the
whole worker died. kombu marks such a message `redelivered`. A task that kills its
worker every time (a poison message) would come back forever, taking a worker down
each time; so each start of a redelivered message is counted in the broker's Redis
(`task-starts:<task id>:<retries>`, one INCR; a first delivery costs nothing), and the
start that would be its TASK_MAX_STARTS + 1st does not run the task. The message is
dead-lettered instead: pushed, with its arguments and ids, onto the broker's
`dead_letter` list (the newest DEAD_LETTER_MAX kept; `manage.py dead_letters` lists
them), logged, counted in `parley_tasks_dead_lettered_total`, and the task's
`abandoned` hook tells the client (an `error` event for the turn). Then it is
acknowledged like any task that ran.

Counting needs a Redis broker; with another broker (or none: in-process workers,
where nothing is redelivered) every start runs."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

import redis
from celery import Task
from django.conf import settings

from apps.observability import metrics
from apps.observability.logging import request_id_var

from .broker import writes_natively

log = logging.getLogger(__name__)

DEAD_LETTER_KEY = "dead_letter"
DEAD_LETTER_MAX = 10_000
STARTS_TTL_S = 86_400  # a redelivered message's count outlives any redelivery

_clients: dict[str, redis.Redis] = {}


def broker_redis() -> redis.Redis | None:
    """The broker's Redis (a client per URL and process), or None for another broker."""
    url = settings.CELERY_BROKER_URL
    if not url or not writes_natively(url):
        return None
    client = _clients.get(url)
    if client is None:
        client = _clients[url] = redis.Redis.from_url(
            url, socket_timeout=2, socket_connect_timeout=2
        )
    return client


def task_start_count(*, task_id: str, retries: int, redelivered: bool) -> int:
    """How many times this message has started, this start included: 1 for a
    first delivery (not counted); for a redelivered one, 1 + the redelivered starts
    so far, counting that the first delivery started too (a message that was only
    reserved by a worker that died counts one start too many, so it is
    dead-lettered one start early at worst). 0 when it cannot be counted."""
    if not redelivered:
        return 1
    client = broker_redis()
    if client is None:
        return 0
    key = f"task-starts:{task_id}:{retries}"
    try:
        with client.pipeline(transaction=False) as pipe:
            pipe.incr(key)
            pipe.expire(key, STARTS_TTL_S)
            redelivered_starts, _ = pipe.execute()
    except redis.RedisError as exc:
        log.warning("could not count the starts of task %s: %s", task_id, exc)
        return 0  # run it: a broker that cannot count cannot dead-letter either
    return int(redelivered_starts) + 1


def dead_letter_push(*, task_name: str, task_id: str, queue: str, kwargs: dict, starts: int,
                     request_id: str) -> None:  # fmt: skip
    """Keep the message for staff (`manage.py dead_letters`), log it, count it.
    `starts`: how many times it ran without finishing."""
    record = {
        "task": task_name,
        "id": task_id,
        "queue": queue,
        "kwargs": kwargs,
        "starts": starts,
        "dead_lettered_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "request_id": request_id,
    }
    client = broker_redis()
    if client is not None:
        try:
            with client.pipeline(transaction=False) as pipe:
                pipe.lpush(DEAD_LETTER_KEY, json.dumps(record, default=str))
                pipe.ltrim(DEAD_LETTER_KEY, 0, DEAD_LETTER_MAX - 1)
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("could not keep dead-lettered task %s: %s", task_id, exc)
    metrics.task_dead_lettered(queue=queue, task=task_name)
    # Ids and counts only: the kwargs are in the dead letter.
    log.error("task %s %s (queue %s) dead-lettered after %d starts that did not finish",
              task_name, task_id, queue, starts)  # fmt: skip


def dead_letters(*, limit: int = 100) -> list[dict]:
    """The newest dead-lettered tasks first (staff: `manage.py dead_letters`)."""
    client = broker_redis()
    if client is None:
        return []
    return [json.loads(item) for item in client.lrange(DEAD_LETTER_KEY, 0, limit - 1)]


class DeadLetteringTask(Task):
    """Every Parley task: counts the starts of a redelivered message and dead-letters
    it past TASK_MAX_STARTS. Tasks override `abandoned` to tell the client."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if not request.called_directly and request.id:
            delivery = request.delivery_info or {}
            redelivered = bool(delivery.get("redelivered") or getattr(request, "redelivered", 0))
            starts = task_start_count(
                task_id=request.id, retries=request.retries or 0, redelivered=redelivered
            )
            if starts > settings.TASK_MAX_STARTS:
                dead_letter_push(
                    task_name=self.name,
                    task_id=request.id,
                    queue=delivery.get("routing_key") or "",
                    kwargs=kwargs,
                    starts=starts - 1,  # the ones that ran
                    request_id=request_id_var.get(),  # set by the task_prerun hook
                )
                self.abandoned(kwargs=kwargs)
                return None
        return super().__call__(*args, **kwargs)

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        """Failed for good (after any retries): the client is told as for a dead letter."""
        self.abandoned(kwargs=kwargs)

    def abandoned(self, *, kwargs: dict) -> None:
        """The task will not run (again): tell whoever waits for it. Nothing by default."""
