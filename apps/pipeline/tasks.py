"""Celery entry points: plain keyword arguments in, one service call, nothing
returned. Services are imported inside each task, so that services may import
this module (to enqueue) without a cycle."""

from celery import shared_task


@shared_task(acks_late=True, ignore_result=True)
def transcribe_window_task(**kwargs) -> None:
    from .services import transcribe_window
    from .values import UtteranceWindow

    transcribe_window(window=UtteranceWindow(**kwargs))


@shared_task(acks_late=True, ignore_result=True)
def synthesize_sentence_task(**kwargs) -> None:
    from .services import synthesize_sentence
    from .values import SentenceToSpeak

    synthesize_sentence(sentence=SentenceToSpeak(**kwargs))
