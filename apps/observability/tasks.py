from celery import shared_task


@shared_task
def ping_task(value: str) -> str:
    """A trivial task that proves a worker (real or in-process) runs our code."""
    return f"pong:{value}"
