"""Helpers for the end-to-end socket tests: they speak the socket protocol
(docs/protocol.md) through TalkClient and read the stored models, nothing else."""

import time
import uuid

from apps.conversations.models import Message
from apps.pipeline.talk_client import TalkClient

SILENCE_2S = bytes(64_000)
BYTES_PER_S = 32_000  # PCM16 16 kHz mono


def assert_no_error(*clients: TalkClient) -> None:
    """A happy path: no `error` event reached any of these sockets."""
    for client in clients:
        errors = client.events("error")
        assert errors == [], f"errors on {client.url}: {errors}"


def ping(client: TalkClient, *, timeout: float = 10) -> None:
    """Until the server has handled everything sent before (one message at a time, in order)."""
    marker = uuid.uuid4().hex
    after = len(client.received)
    client.send_json({"type": "ping", "t": marker})
    client.wait_for(
        lambda e: e["type"] == "pong" and e["t"] == marker, after=after, timeout=timeout
    )


def wait_until(found, *, timeout: float = 60, every: float = 0.2):
    """Poll `found()` (e.g. a database query) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = found()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"nothing found within {timeout}s")


def stored_turns(conversation, *, after_seq: int = 0) -> list[int]:
    return list(
        Message.objects.filter(conversation=conversation, seq__gt=after_seq)
        .exclude(status="streaming")
        .order_by("seq")
        .values_list("seq", flat=True)
    )


def speak(client: TalkClient, pcm: bytes, *, timeout: float = 90) -> list[dict]:
    """Stream `pcm` at real-time pace, then 2 s of silence; wait until every
    utterance has its final (or empty) transcript and the last reply is done.
    Returns the events that arrived."""
    after = len(client.received)
    client.stream(pcm + SILENCE_2S)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = [r.event for r in client.received[after:]]
        ends = sum(e["type"] == "speech.end" for e in events)
        settled = sum(e["type"] in ("transcript.final", "transcript.empty") for e in events)
        finals = sum(e["type"] == "transcript.final" for e in events)
        replies = sum(e["type"] in ("reply.done", "reply.interrupted") for e in events)
        if ends == settled and replies >= finals and _audio_complete(events):
            client.wait_quiet(quiet=2.0, timeout=deadline - time.monotonic())
            return [r.event for r in client.received[after:]]
        time.sleep(0.1)
    raise TimeoutError([e["type"] for e in events][-20:])


def _audio_complete(events: list[dict]) -> bool:
    """The last finished reply's audio has started for every sentence it spoke."""
    done = [e for e in events if e["type"] == "reply.done"]
    if not done:
        return True
    parts = {
        e["index"]
        for e in events
        if e["type"] == "reply.audio.start" and e["reply_id"] == done[-1]["reply_id"]
    }
    return len(parts) >= done[-1]["audio_parts"]
