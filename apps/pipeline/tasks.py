"""Celery entry points: ids and offsets in, one service call, nothing returned."""

from celery import shared_task

from . import services


@shared_task(acks_late=True)
def transcribe_window_task(**kwargs) -> None:
    services.transcribe_window(**kwargs)


@shared_task(acks_late=True)
def synthesize_sentence_task(**kwargs) -> None:
    services.synthesize_sentence(**kwargs)
