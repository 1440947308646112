"""The Celery app. Queues: `default`, `stt` (final and candidate transcripts),
`stt_partial` (drafts, read by the same workers after `stt`), `tts` (text-to-speech);
each runs as its own worker Deployment in production and scales on its own backlog."""

import logging
import os

from celery import Celery
from celery.signals import worker_process_init
from kombu import Queue

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

app = Celery("parley")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.task_queues = [Queue(name) for name in ("default", "stt", "stt_partial", "tts")]
# A worker reads its queues in the order given to -Q: with `-Q stt,tts,stt_partial`
# a final transcript never waits behind a draft (partial) one. Partials are
# best-effort: under load they wait, and the worker drops the stale ones.
app.conf.broker_transport_options = {"queue_order_strategy": "priority"}
app.autodiscover_tasks()


@worker_process_init.connect
def start_publisher(**_kwargs) -> None:
    """One long-lived event loop per worker process publishes every event
    (apps.realtime.broadcast), on one channel-layer connection."""
    from apps.realtime.broadcast import publisher_start

    publisher_start()


@worker_process_init.connect
def preload_engines(**_kwargs) -> None:
    """Load the STT model / TTS engine in each worker process before its first
    task, for the queues this worker consumes (-Q). WORKER_PRELOAD=0 turns it
    off. Celery kills a child that takes longer than worker_proc_alive_timeout
    (4 s by default) to start: raise it for big models."""
    if os.environ.get("WORKER_PRELOAD", "1") == "0":
        return
    from apps.pipeline.providers.registry import stt_get, tts_get

    queues = app.amqp.queues.consume_from
    for prefix, get in (("stt", stt_get), ("tts", tts_get)):
        if any(queue.startswith(prefix) for queue in queues):
            try:
                get()
            except Exception:
                logging.getLogger(__name__).exception("could not preload the %s engine", prefix)
