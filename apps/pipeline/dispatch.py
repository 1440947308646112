"""Send a Celery task to its queue without blocking the caller, or, with no
broker configured (embedded defaults), run it on an in-process worker thread
of that queue. Either way the caller gets on at once; results come back
through the channel layer.

With a Redis broker, a caller on an event loop (the web process) has the
task's message written from the loop itself, batched (broker.py). Any other
caller, or another broker, puts the task on an in-process queue that one
publisher thread per process drains into the broker with kombu (its producer
is synchronous: on the event loop every publish would block it). A publish
that still fails after bounded retries is reported to the caller's
`on_error`, called on the caller's event loop, so the socket can tell its
client. Tasks ignore results: nothing subscribes to a result backend."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from queue import Full, Queue
from typing import Any

from django.conf import settings
from django.db import close_old_connections

from apps.observability.logging import task_headers, task_logged

from .broker import Pending, async_producer, task_message, writes_natively

log = logging.getLogger(__name__)

OnError = Callable[[Exception], None]
RETRY_POLICY = {"max_retries": 3, "interval_start": 0.1, "interval_step": 0.3, "interval_max": 1}


@dataclass(frozen=True)
class _Job:
    task: Any
    queue: str
    kwargs: dict
    expires: float | None
    on_error: OnError | None
    loop: asyncio.AbstractEventLoop | None
    headers: dict


class _Publisher:
    """One thread per process that publishes queued jobs to the broker."""

    def __init__(self) -> None:
        self.jobs: Queue[_Job] = Queue(maxsize=settings.ENQUEUE_BUFFER)
        self.pid = os.getpid()
        threading.Thread(target=self.run, name="celery-publisher", daemon=True).start()

    def run(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                job.task.apply_async(
                    kwargs=job.kwargs,
                    queue=job.queue,
                    expires=job.expires,
                    headers=job.headers,
                    ignore_result=True,
                    retry=True,
                    retry_policy=RETRY_POLICY,
                )
            except Exception as exc:  # the broker is down: tell the caller
                log.warning("could not enqueue %s on %s: %s", job.task.name, job.queue, exc)
                _report(job.on_error, job.loop, exc)


def _report(on_error: OnError | None, loop: asyncio.AbstractEventLoop | None, exc: Exception):
    if on_error is None:
        return
    if loop is not None and loop.is_running():
        loop.call_soon_threadsafe(on_error, exc)
    elif loop is None:
        on_error(exc)


_publisher: _Publisher | None = None
_executors: dict[str, ThreadPoolExecutor] = {}
_lock = threading.Lock()


def _publisher_get() -> _Publisher:
    global _publisher
    with _lock:
        if _publisher is None or _publisher.pid != os.getpid():
            _publisher = _Publisher()
        return _publisher


def _executor(queue_name: str) -> ThreadPoolExecutor:
    with _lock:
        if queue_name not in _executors:
            # STT threads mostly wait on the batcher (batching.py): as many as a batch holds
            threads = settings.STT_WORKER_THREADS if queue_name.startswith("stt") else None
            _executors[queue_name] = ThreadPoolExecutor(
                threads or settings.IN_PROCESS_WORKERS, thread_name_prefix=f"worker-{queue_name}"
            )
        return _executors[queue_name]


_backlog_clients: dict[str, Any] = {}


def queue_backlog(queue_name: str) -> int:
    """Jobs waiting in a queue, not yet taken by a worker: the Redis broker's
    list, or the in-process executor's queue; 0 where the broker cannot tell."""
    url = settings.CELERY_BROKER_URL
    if not url:
        executor = _executors.get(queue_name)
        return executor._work_queue.qsize() if executor is not None else 0
    if not writes_natively(url):
        return 0
    client = _backlog_clients.get(url)
    if client is None:
        import redis

        client = _backlog_clients[url] = redis.Redis.from_url(url, socket_timeout=1)
    return int(client.llen(queue_name))


# Enqueue times (epoch seconds) of each in-process queue's jobs not yet started,
# oldest first (the executor starts them in order): the queue metrics read them.
_waiting: dict[str, deque[float]] = {}


def in_process_backlog(queue_name: str) -> tuple[int, float | None]:
    """An in-process queue's waiting jobs, and when the oldest was enqueued."""
    waiting = _waiting.get(queue_name)
    if not waiting:
        return 0, None
    try:
        return len(waiting), waiting[0]
    except IndexError:  # started meanwhile
        return 0, None


def _submit(queue_name: str, task, kwargs: dict, headers: dict | None = None) -> None:
    waiting = _waiting.setdefault(queue_name, deque())
    waiting.append(time.time())
    _executor(queue_name).submit(_run_in_thread, task, kwargs, waiting, queue_name, headers)


def _run_in_thread(
    task, kwargs: dict, waiting: deque | None = None, queue_name: str = "", headers=None
) -> None:
    if waiting:
        try:
            waiting.popleft()
        except IndexError:
            pass
    try:
        with task_logged(task.name, queue_name, headers):  # as a worker runs it: under its ids
            task.run(**kwargs)
    except Exception:
        log.exception("in-process task %s failed", task.name)
        raise
    finally:
        close_old_connections()


def queue_of(task) -> str:
    route = settings.CELERY_TASK_ROUTES.get(task.name, {})
    return route.get("queue", settings.CELERY_TASK_DEFAULT_QUEUE)


def enqueue(
    task,
    *,
    queue: str = "",
    expires: float | None = None,
    on_error: OnError | None = None,
    **kwargs,
) -> None:
    """Run `task(**kwargs)` on a worker of its queue (or `queue`); never blocks.
    Task arguments are ids, offsets and short strings, never audio. `expires`
    (seconds) drops a job that waited too long (a stale draft). The message's
    headers carry the caller's request, conversation and user ids and the
    enqueue time (apps.observability.logging.task_headers)."""
    queue_name = queue or queue_of(task)
    headers = task_headers()
    try:
        loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if not settings.CELERY_BROKER_URL:
        _submit(queue_name, task, kwargs, headers)
        return
    if loop is not None and writes_natively(settings.CELERY_BROKER_URL):
        message = task_message(task_name=task.name, kwargs=kwargs, queue=queue_name,
                               expires=expires, headers=headers)  # fmt: skip
        async_producer().put(Pending(queue_name, message, on_error))
        return
    job = _Job(task, queue_name, kwargs, expires, on_error, loop, headers)
    try:
        _publisher_get().jobs.put_nowait(job)
    except Full:
        log.warning("enqueue buffer full: %s dropped", task.name)
        if on_error is not None:  # we are on the caller's thread: tell it now
            on_error(RuntimeError("the task queue is not taking work"))
