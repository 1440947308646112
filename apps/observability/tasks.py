from celery import shared_task
from django.core.cache import cache


@shared_task
def ping_task(value: str) -> None:
    """A trivial task that proves a worker (real or in-process) runs our code:
    it leaves `pong:<value>` in the cache (tasks return nothing: results are ignored)."""
    cache.set(f"ping:{value}", f"pong:{value}", 60)
