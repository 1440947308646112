"""Python 3.11's `asyncio.wait_for` can lose a cancellation that lands as the
awaited thing completes (fixed in 3.12), and redis-py runs every command's send
through it under a socket timeout. A task whose CancelledError was lost still
counts the request (`Task.cancelling()`), so each loop of ours that waits
forever asks here once a round, and ends."""

from __future__ import annotations

import asyncio


def raise_if_cancelled() -> None:
    """Raise CancelledError if this task was asked to stop, even if the
    CancelledError itself was lost on the way."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
