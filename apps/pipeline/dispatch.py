"""Send a Celery task to its queue, or, with no broker configured (embedded
defaults), run it on an in-process worker thread of that queue. Either way the
caller gets on at once; results come back through the channel layer."""

import asyncio
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from django.conf import settings
from django.db import close_old_connections

log = logging.getLogger(__name__)

_executors: dict[str, ThreadPoolExecutor] = {}
_executors_lock = threading.Lock()
_local = threading.local()


def home_loop() -> asyncio.AbstractEventLoop | None:
    """The web process's event loop, when this thread is an in-process worker."""
    return getattr(_local, "loop", None)


def _executor(queue: str) -> ThreadPoolExecutor:
    with _executors_lock:
        if queue not in _executors:
            _executors[queue] = ThreadPoolExecutor(
                settings.IN_PROCESS_WORKERS, thread_name_prefix=f"worker-{queue}"
            )
        return _executors[queue]


def _run_in_thread(task, loop, kwargs):
    _local.loop = loop
    try:
        return task.run(**kwargs)
    except Exception:
        log.exception("in-process task %s failed", task.name)
        raise
    finally:
        close_old_connections()


def queue_of(task) -> str:
    route = settings.CELERY_TASK_ROUTES.get(task.name, {})
    return route.get("queue", settings.CELERY_TASK_DEFAULT_QUEUE)


def enqueue(task, *, queue: str = "", **kwargs) -> Future | object:
    """Run `task(**kwargs)` on a worker of its queue (or `queue`). Task
    arguments are ids, offsets and short strings, never audio."""
    queue = queue or queue_of(task)
    if settings.CELERY_BROKER_URL:
        return task.apply_async(kwargs=kwargs, queue=queue)
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    return _executor(queue).submit(_run_in_thread, task, loop, kwargs)
