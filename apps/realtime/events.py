"""Every event the server sends, declared once (see docs/protocol.md).

Events are built with `event(type, **fields)`, which refuses unknown types
and missing fields, and reach sockets through the conversation's group
(`conversation.<uuid>`), so every socket of the conversation sees them.
Services publish them after the transaction that stored their data commits."""

import asyncio
from functools import partial

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

PROTOCOL_VERSION = 1

# type -> required fields. Optional fields may be added freely.
SERVER_EVENTS: dict[str, frozenset[str]] = {
    "ready": frozenset({"protocol", "conversation_id", "persona", "last_seq", "audio"}),
    "speech.start": frozenset({"utterance_id"}),
    "speech.end": frozenset({"utterance_id", "duration_ms"}),
    "transcript.partial": frozenset({"utterance_id", "text"}),
    "transcript.final": frozenset({"utterance_id", "seq", "text", "source"}),
    "transcript.empty": frozenset({"utterance_id"}),
    "reply.delta": frozenset({"reply_id", "text"}),
    "reply.done": frozenset({"reply_id", "seq", "text"}),
    "reply.interrupted": frozenset({"reply_id", "seq", "text"}),
    "reply.audio.start": frozenset({"reply_id", "index", "sample_rate", "format", "bytes"}),
    "error": frozenset({"code", "message"}),
    "pong": frozenset(),
}
# Internal events that travel on the channel layer only.
GROUP_ONLY_EVENTS: dict[str, frozenset[str]] = {
    "reply.audio": frozenset({"reply_id", "index", "sample_rate", "pcm"}),
    "transcript.candidate": frozenset(
        {"utterance_id", "end_byte", "text", "confidence", "provider"}
    ),
}


def event(type_: str, **fields) -> dict:
    required = SERVER_EVENTS.get(type_, GROUP_ONLY_EVENTS.get(type_))
    if required is None:
        raise ValueError(f"undeclared event type {type_!r}")
    missing = required - fields.keys()
    if missing:
        raise ValueError(f"event {type_!r} lacks {', '.join(sorted(missing))}")
    return {"type": type_, **fields}


def group_name(conversation_id) -> str:
    return f"conversation.{conversation_id}"


def publish(conversation_id, message: dict) -> None:
    """Send to the conversation's group from sync code: a service, a Celery
    worker, or an in-process worker thread (which hands it to the web loop)."""
    from apps.pipeline.dispatch import home_loop

    layer = get_channel_layer()
    group = group_name(conversation_id)
    loop = home_loop()
    if loop is not None and loop.is_running():
        asyncio.run_coroutine_threadsafe(layer.group_send(group, message), loop).result(timeout=10)
    else:
        async_to_sync(layer.group_send)(group, message)


def publish_on_commit(conversation_id, message: dict) -> None:
    transaction.on_commit(partial(publish, conversation_id, message))


async def apublish(conversation_id, message: dict) -> None:
    await get_channel_layer().group_send(group_name(conversation_id), message)
