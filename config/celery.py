"""The Celery app. Queues: `default`, `stt` (final and candidate transcripts),
`stt_partial` (drafts, read by the same workers after `stt`), `tts` (text-to-speech);
each runs as its own worker Deployment in production and scales on its own backlog.
scripts/worker.sh starts a worker of each role with the pool it needs."""

import logging
import os
import time

from celery import Celery
from celery.signals import (
    celeryd_init,
    worker_init,
    worker_process_init,
    worker_ready,
    worker_shutting_down,
)
from kombu import Queue

from apps.observability.logging import celery_output_to_json, celery_signals_connect
from apps.pipeline.broker_patch import kombu_redis_close_survives_a_lost_broker

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Every task counts its starts and is dead-lettered after TASK_MAX_STARTS (redelivery.py).
app = Celery("parley", task_cls="apps.pipeline.redelivery:DeadLetteringTask")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.task_queues = [Queue(name) for name in ("default", "stt", "stt_partial", "tts")]


def broker_transport_options() -> dict:
    """kombu's Redis transport options, added to any given in the settings:
    - a worker reads its queues in the order given to -Q: with `-Q stt,tts,stt_partial`
      a final transcript never waits behind a draft (partial) one. Partials are
      best-effort: under load they wait, and the worker drops the stale ones;
    - a dead worker's unacknowledged task goes back to its queue once
      CELERY_VISIBILITY_TIMEOUT_S have passed since its delivery, looked for every
      CELERY_RESTORE_INTERVAL_S by every worker (kombu's default: 1 hour, looked
      for every 100 s, long after the utterance's audio has expired)."""
    from django.conf import settings

    return {
        **(getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", None) or {}),
        "queue_order_strategy": "priority",
        "visibility_timeout": settings.CELERY_VISIBILITY_TIMEOUT_S,
        "unacked_restore_interval": settings.CELERY_RESTORE_INTERVAL_S,
        "unacked_restore_throttle": 1,  # scan on every interval, not every 10th
        # A worker that died while it restored holds the restore lock this long (not 5 min).
        "unacked_mutex_expire": min(300, settings.CELERY_VISIBILITY_TIMEOUT_S),
    }


app.conf.broker_transport_options = broker_transport_options()
app.autodiscover_tasks()
# kombu's Redis channel crashed the worker on a broker restart (broker_patch.py).
kombu_redis_close_survives_a_lost_broker()
# Each task runs under the request/conversation/user ids its message carries, and
# its start and end are logged (apps/observability/logging.py).
celery_signals_connect()


@celeryd_init.connect
def worker_logging_start(instance, **_kwargs) -> None:
    """Before the worker prints or warns anything: Django's LOGGING (JSON lines with
    LOG_FORMAT=json) takes the warnings too, and Celery's own prints follow the format."""
    import django
    from django.conf import settings

    django.setup()
    logging.captureWarnings(True)
    if settings.LOG_FORMAT == "json":
        celery_output_to_json(instance)


@worker_process_init.connect
def prefork_child_start(**_kwargs) -> None:
    """A prefork child runs tasks: set it up (threads do not survive the fork)."""
    task_process_start()


@worker_init.connect
def worker_start(sender, **_kwargs) -> None:
    """A threads or solo pool runs tasks in the worker's own process. The STT
    worker runs threads (`-P threads`), so its tasks share one model and one
    batcher (apps/pipeline/batching.py)."""
    pool = sender.pool_cls
    name = pool if isinstance(pool, str) else f"{pool.__module__}.{pool.__qualname__}"
    if "prefork" not in name:
        concurrency = sender.concurrency
        task_process_start(threads=concurrency if isinstance(concurrency, int) else 0)


@worker_ready.connect
def stt_fleet_join(**_kwargs) -> None:
    """In the worker's main process, whatever its pool: a worker that consumes `stt`
    counts toward the fleet's STT capacity (apps/realtime/admission.py) from now on."""
    from apps.pipeline.stt_fleet import fleet_join

    fleet_join(queues=set(app.amqp.queues.consume_from))


@worker_shutting_down.connect
def stt_fleet_leave(**_kwargs) -> None:
    from apps.pipeline.stt_fleet import fleet_leave

    fleet_leave()


def task_process_start(threads: int = 1) -> None:
    """In each process that runs tasks: one long-lived event loop publishes every
    event (apps.realtime.broadcast) on one channel-layer connection, its metrics
    and probes are served (apps.observability.exporter, WORKER_METRICS_PORT), and
    the engines of the queues it consumes are loaded before the first task."""
    from apps.observability.exporter import worker_process_start
    from apps.realtime.broadcast import publisher_start

    publisher_start()
    worker_process_start(queues=set(app.amqp.queues.consume_from), threads=threads)
    preload_engines()


def preload_engines() -> None:
    """Load the STT model / TTS engine for the queues this worker consumes (-Q).
    WORKER_PRELOAD=0 turns it off. Celery kills a prefork child that takes
    longer than worker_proc_alive_timeout (4 s by default) to start: raise it
    for big models."""
    if os.environ.get("WORKER_PRELOAD", "1") == "0":
        return
    from apps.observability.exporter import engine_loaded
    from apps.pipeline.providers.registry import stt_get, tts_get

    log = logging.getLogger(__name__)
    queues = app.amqp.queues.consume_from
    for prefix, get in (("stt", stt_get), ("tts", tts_get)):
        if any(queue.startswith(prefix) for queue in queues):
            started = time.monotonic()
            try:
                engine = get()
            except Exception:
                log.exception("could not preload the %s engine", prefix)
            else:
                engine_loaded(prefix)
                log.info("%s engine %s ready in %.1f s", prefix, engine.kind,
                         time.monotonic() - started)  # fmt: skip


def worker_arguments(role: str) -> list[str]:
    """`celery worker` options for a worker of one role (scripts/run.sh, the tests,
    the benchmarks and the image all start workers through this):
    - `stt`: transcription; threads, so its tasks share one model and one batcher;
    - `tts`: speech synthesis and the light `default` tasks;
    - `all`: every queue in one process (tests and small setups; in production the
      roles run apart, so a transcription spike never slows the replies' speech)."""
    from django.conf import settings

    threads = settings.STT_WORKER_THREADS
    roles = {
        "stt": ["-Q", "stt,stt_partial", "-c", str(threads)],
        "tts": ["-Q", "tts,default", "-c", str(settings.TTS_WORKER_THREADS)],
        "all": [
            "-Q",
            "stt,tts,stt_partial,default",
            "-c",
            str(threads + settings.TTS_WORKER_THREADS),
        ],
    }
    if role not in roles:
        raise ValueError(f"unknown worker role {role!r}; known: {', '.join(roles)}")
    return [*roles[role], "--pool", "threads", "-n", f"{role}@%h"]
