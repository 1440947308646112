"""Celery entry points: plain keyword arguments in, one service call, nothing
returned. Services are imported inside each task, so that services may import
this module (to enqueue) without a cycle.

Both tasks are safe to run twice (a redelivery after a worker died). A database
error (Postgres or PgBouncer restarting) is retried after 1, 2, 4 s, at most
TASK_DATABASE_RETRIES times; a task that fails for good, or is dead-lettered
(apps/pipeline/redelivery.py), tells the client through `abandoned`."""

from typing import Any

from celery import shared_task
from django.conf import settings
from django.db import InterfaceError, OperationalError

from .redelivery import DeadLetteringTask

DATABASE_ERRORS = (OperationalError, InterfaceError)
# Both stages: acknowledged after the work (a dead worker's task is redelivered), and a
# database error retried a few times, 1 s, 2 s, 4 s apart.
TASK_OPTIONS: dict[str, Any] = {
    "acks_late": True,
    "ignore_result": True,
    "autoretry_for": DATABASE_ERRORS,
    "retry_backoff": 1,
    "retry_backoff_max": 4,
    "retry_jitter": False,
    "max_retries": settings.TASK_DATABASE_RETRIES,
}


class TranscribeWindowTask(DeadLetteringTask):
    def abandoned(self, *, kwargs: dict) -> None:
        from .services import transcribe_window_abandon
        from .values import UtteranceWindow

        transcribe_window_abandon(window=UtteranceWindow(**kwargs))


class SynthesizeSentenceTask(DeadLetteringTask):
    def abandoned(self, *, kwargs: dict) -> None:
        from .services import synthesize_sentence_abandon
        from .values import SentenceToSpeak

        synthesize_sentence_abandon(sentence=SentenceToSpeak(**kwargs))


@shared_task(base=TranscribeWindowTask, **TASK_OPTIONS)
def transcribe_window_task(**kwargs) -> None:
    from .services import transcribe_window
    from .values import UtteranceWindow

    transcribe_window(window=UtteranceWindow(**kwargs))


@shared_task(base=SynthesizeSentenceTask, **TASK_OPTIONS)
def synthesize_sentence_task(**kwargs) -> None:
    from .services import synthesize_sentence
    from .values import SentenceToSpeak

    synthesize_sentence(sentence=SentenceToSpeak(**kwargs))
