"""enqueue never blocks its caller: with a broker, one publisher thread per
process publishes; a publish that fails is reported to the caller's loop."""

import asyncio
import json
import threading
import uuid

import redis
from celery import Celery
from django.conf import settings as django_settings

from apps.pipeline import dispatch
from tests.live import free_port


def _noop(**kwargs) -> None:
    pass


def _app(broker: str) -> Celery:
    app = Celery(f"dispatch-test-{uuid.uuid4().hex[:6]}", broker=broker, set_as_current=False)
    app.conf.broker_connection_timeout = 0.5
    return app


async def test_a_dead_broker_is_reported_on_the_callers_loop(settings):
    settings.CELERY_BROKER_URL = f"redis://127.0.0.1:{free_port()}/0"
    task = _app(settings.CELERY_BROKER_URL).task(name="t.dead")(_noop)
    reported = asyncio.Event()
    seen: dict = {}

    def on_error(exc: Exception) -> None:
        seen["thread"] = threading.current_thread()
        seen["error"] = exc
        reported.set()

    dispatch.enqueue(task, queue="nowhere", on_error=on_error, x=1)
    assert not reported.is_set()  # enqueue returned before any publish was tried out

    await asyncio.wait_for(reported.wait(), 30)
    assert seen["thread"] is threading.main_thread()  # called on the loop's thread
    assert seen["error"] is not None


async def test_a_task_reaches_its_queue_without_a_result_subscription(services_mode, settings):
    if not services_mode:
        # embedded defaults: no broker, the task runs on an in-process worker thread
        ran = threading.Event()
        settings.CELERY_BROKER_URL = ""

        def run(**kwargs):
            ran.set()

        task = _app("memory://").task(name="t.local")(run)
        dispatch.enqueue(task, queue="local", x=1)
        assert ran.wait(10)
        return
    queue = f"test-dispatch-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(django_settings.CELERY_BROKER_URL)
    from config.celery import app

    task = app.task(name=f"t.{queue}")(_noop)
    dispatch.enqueue(task, queue=queue, expires=5, x=1)
    for _ in range(100):
        if client.llen(queue):
            break
        await asyncio.sleep(0.05)
    assert client.llen(queue) == 1
    client.delete(queue)


def test_the_native_message_is_the_one_kombu_writes(settings):
    """The envelope broker.task_message writes is kombu's for the same call
    (memory transport: the same virtual channel as Redis's, before LPUSH)."""
    from kombu.transport import memory

    from apps.pipeline.broker import task_message

    app = Celery(f"envelope-{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.conf.task_time_limit = settings.CELERY_TASK_TIME_LIMIT
    app.conf.task_soft_time_limit = settings.CELERY_TASK_SOFT_TIME_LIMIT
    queue = f"envelope-{uuid.uuid4().hex[:6]}"
    kwargs = {"conversation_id": "c", "utterance_id": "u", "end_byte": 3200, "purpose": "partial"}
    headers = {"parley_request_id": "r-1", "parley_enqueued_at": 1.5}  # the logs' ids
    app.task(name="apps.pipeline.tasks.transcribe_window_task")(_noop).apply_async(
        kwargs=kwargs, queue=queue, expires=3.0, ignore_result=True, headers=headers
    )
    theirs = memory.Channel.queues.pop(queue).get_nowait()
    ours = json.loads(task_message(task_name="apps.pipeline.tasks.transcribe_window_task",
                                   kwargs=kwargs, queue=queue, expires=3.0,
                                   headers=headers))  # fmt: skip

    varying = {"id", "root_id", "correlation_id", "delivery_tag", "origin", "reply_to", "expires"}

    def fixed(message: dict) -> dict:
        return {
            **{k: v for k, v in message.items() if k not in ("headers", "properties")},
            "headers": {k: v for k, v in message["headers"].items() if k not in varying},
            "properties": {k: v for k, v in message["properties"].items() if k not in varying},
        }

    assert fixed(ours) == fixed(theirs)
    assert (
        ours["headers"]["id"] == ours["headers"]["root_id"] == ours["properties"]["correlation_id"]
    )
    assert ours["headers"]["expires"][:16] == theirs["headers"]["expires"][:16]  # to the minute
    assert ours["headers"]["parley_request_id"] == "r-1"


async def test_the_backlog_counts_jobs_not_yet_taken(services_mode, settings):
    """What the STT batcher reads to back drafts off: jobs waiting in a queue."""
    queue = f"test-backlog-{uuid.uuid4().hex[:8]}"
    if not services_mode:
        # embedded defaults: the in-process executor's queue, behind its busy threads
        settings.CELERY_BROKER_URL = ""
        release = threading.Event()
        started: list[int] = []

        def hold(**kwargs) -> None:
            started.append(1)
            release.wait(10)

        task = _app("memory://").task(name=f"t.{queue}")(hold)
        for _ in range(settings.IN_PROCESS_WORKERS + 3):
            dispatch.enqueue(task, queue=queue)
        try:
            for _ in range(100):
                if len(started) == settings.IN_PROCESS_WORKERS:
                    break
                await asyncio.sleep(0.05)
            assert len(started) == settings.IN_PROCESS_WORKERS  # every thread is busy
            assert dispatch.queue_backlog(queue) == 3
        finally:
            release.set()
        for _ in range(100):
            if dispatch.queue_backlog(queue) == 0:
                break
            await asyncio.sleep(0.05)
        assert dispatch.queue_backlog(queue) == 0
        return
    from config.celery import app

    task = app.task(name=f"t.{queue}")(_noop)
    for _ in range(3):
        dispatch.enqueue(task, queue=queue, expires=5)
    client = redis.Redis.from_url(django_settings.CELERY_BROKER_URL)
    try:
        for _ in range(100):
            if dispatch.queue_backlog(queue) == 3:
                break
            await asyncio.sleep(0.05)
        assert dispatch.queue_backlog(queue) == 3
        assert dispatch.queue_backlog(f"{queue}-empty") == 0
    finally:
        client.delete(queue)
