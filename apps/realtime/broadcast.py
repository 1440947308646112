"""Sending events to a conversation's group (their schemas are in events.py).

Code on the web process's event loop awaits `apublish`. Sync code (a service
in a database thread, a Celery task, an in-process worker thread) calls
`publish`, which hands the send to one long-lived event loop of its process:
the web process's own loop once it serves sockets, else a publisher thread
started once per process (at Celery's `worker_process_init`). Every send reuses
that loop's channel-layer connection: no loop and no connection per event."""

from __future__ import annotations

import asyncio
import os
import threading
from functools import partial

from channels.layers import get_channel_layer
from django.db import transaction

from .events import group_name

PUBLISH_TIMEOUT_S = 5.0


class _Loops:
    """The process's publishing loops; a forked child starts its own."""

    lock = threading.Lock()
    home: asyncio.AbstractEventLoop | None = None  # the web process's loop
    thread_loop: asyncio.AbstractEventLoop | None = None
    pid = 0


def bind_home_loop(loop: asyncio.AbstractEventLoop) -> None:
    """The web process's loop: sync code of this process publishes through it."""
    _Loops.home = loop


def home_loop() -> asyncio.AbstractEventLoop | None:
    loop = _Loops.home
    return loop if loop is not None and loop.is_running() else None


def publisher_start() -> asyncio.AbstractEventLoop:
    """This process's publisher loop, on a daemon thread started once (per pid)."""
    with _Loops.lock:
        loop = _Loops.thread_loop
        if loop is None or _Loops.pid != os.getpid() or loop.is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="publisher", daemon=True).start()
            _Loops.thread_loop, _Loops.pid = loop, os.getpid()
        return loop


def publish(conversation_id, message: dict) -> None:
    """Send from sync code; returns once the layer took the event, so one
    caller's events keep their order."""
    group_publish(group_name(conversation_id), message)


def group_publish(group: str, message: dict) -> None:
    loop = home_loop() or publisher_start()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        raise RuntimeError("publish() was called on the event loop: await apublish()")
    send = get_channel_layer().group_send(group, message)
    asyncio.run_coroutine_threadsafe(send, loop).result(timeout=PUBLISH_TIMEOUT_S)


def publish_on_commit(conversation_id, message: dict) -> None:
    transaction.on_commit(partial(publish, conversation_id, message))


async def apublish(conversation_id, message: dict) -> None:
    await get_channel_layer().group_send(group_name(conversation_id), message)
