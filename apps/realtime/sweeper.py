"""What a dead web process leaves behind, found and finished by the others.

Each web process records its open utterances and streaming replies in the
audio store under its owner id, with a heartbeat that expires LIVE_HEARTBEAT_S
x 3 after its last write (live.py). Every web process sweeps once every
LIVE_SWEEP_S: an owner whose heartbeat has been gone on two sweeps at least
LIVE_HEARTBEAT_S apart is dead (one missed beat during a Redis restart is not
death). One process claims it (SET NX) and, for each of its records:

- an utterance whose final is not stored: its final is transcribed from the
  audio in the store, exactly as if its socket had closed; a socket of the
  conversation (or the client when it reconnects and resumes) then answers it;
- a reply still `streaming`: stored as interrupted (its streamed text lived
  only in the dead process), which the conversation's sockets are told.

A reply whose record the process never wrote (it died within AUDIO_FLUSH_MS of
the reply's start) is caught by the backstop: one process a minute stores every
reply streaming for longer than LLM_DEADLINE_S allows as interrupted.

So a SIGKILLed process's turns end within about LIVE_HEARTBEAT_S x 3 +
LIVE_SWEEP_S x 2 (13 s by default), instead of never."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta

from channels.db import database_sync_to_async
from django.conf import settings
from django.core.exceptions import ValidationError
from django.utils import timezone

from apps.conversations.models import Conversation, Message, TranscriptSegment
from apps.conversations.services import reply_finish
from apps.pipeline.audio_store import RedisAudioStore, audio_store, utterance_key
from apps.pipeline.dispatch import enqueue
from apps.pipeline.tasks import transcribe_window_task
from apps.pipeline.values import UtteranceWindow

from .cancel import raise_if_cancelled

log = logging.getLogger(__name__)

CLAIM_TTL_S = 120
STALE_EVERY_S = 60
STALE_MARGIN_S = 30


@dataclass
class Swept:
    owners: list[str] = field(default_factory=list)
    utterances: int = 0  # finals requested
    replies: int = 0  # stored as interrupted


@dataclass
class Sweeper:
    store: RedisAudioStore
    silent_since: dict[str, float] = field(default_factory=dict)

    def sweep(self, now: float | None = None) -> Swept:
        now = time.monotonic() if now is None else now
        silent = set(self.store.owners_silent())
        self.silent_since = {o: t for o, t in self.silent_since.items() if o in silent}
        swept = Swept()
        if self.store.flag_add("live:sweeping-stale", STALE_EVERY_S):
            swept.replies += stale_replies_interrupt()
        for owner in sorted(silent):
            since = self.silent_since.setdefault(owner, now)
            if now - since < settings.LIVE_HEARTBEAT_S:
                continue  # silent on one sweep only: maybe a blip
            if not self.store.flag_add(f"live:sweeping:{owner}", CLAIM_TTL_S):
                continue  # another process sweeps it
            owner_sweep(self.store, owner, swept)
            del self.silent_since[owner]
        return swept


def owner_sweep(store: RedisAudioStore, owner: str, swept: Swept) -> None:
    finals = replies = 0
    for key, record in store.owned_records(owner).items():
        try:
            if key.startswith("live:utterance:") and record.get("conversation"):
                finals += utterance_finish(key.removeprefix("live:utterance:"), record)
            elif key.startswith("live:reply:"):
                replies += orphan_reply_interrupt(key.removeprefix("live:reply:"))
        except (ValueError, ValidationError, KeyError) as exc:  # not a record we wrote
            log.warning("sweeping %s: skipped %s (%r)", owner, key, exc)
    store.owner_forget(owner)
    swept.owners.append(owner)
    swept.utterances += finals
    swept.replies += replies
    log.warning(
        "swept dead web process %s: %d finals requested, %d replies interrupted",
        owner, finals, replies,
    )  # fmt: skip


def utterance_finish(utterance_id: str, record: dict[str, str]) -> int:
    """Transcribe the final of a dead process's utterance from its stored audio,
    unless its final is stored already. (The STT task itself is safe to run twice.)"""
    conversation_id = record["conversation"]
    if not Conversation.objects.filter(pk=conversation_id).exists():
        return 0  # deleted since (or a record of another deployment's database)
    if TranscriptSegment.objects.filter(
        conversation_id=conversation_id, utterance_id=utterance_id
    ).exists():
        return 0
    store = audio_store()
    assert isinstance(store, RedisAudioStore)
    end_byte = store.length(utterance_key(conversation_id, utterance_id))
    if not end_byte:
        return 0  # its audio never reached the store, or expired
    speech_end_at = float(record.get("speech_end_at") or time.time())
    window = UtteranceWindow(
        conversation_id=conversation_id,
        utterance_id=utterance_id,
        end_byte=end_byte,
        purpose="final",
        stt_kind=record.get("stt_kind", ""),
        start_ms=int(record.get("start_ms") or 0),
        speech_end_at=speech_end_at,
    )
    enqueue(transcribe_window_task, queue="stt", **window.as_kwargs())
    return 1


def stale_replies_interrupt() -> int:
    """The backstop, by one process every STALE_EVERY_S: a reply streaming for
    longer than any reply may (LLM_DEADLINE_S) lost its process before the
    process recorded it (its record goes with the next batch, AUDIO_FLUSH_MS)."""
    cutoff = timezone.now() - timedelta(seconds=settings.LLM_DEADLINE_S + STALE_MARGIN_S)
    stale = Message.objects.filter(status=Message.Status.STREAMING, created_at__lt=cutoff)
    return sum(orphan_reply_interrupt(str(pk)) for pk in stale.values_list("pk", flat=True)[:100])


def orphan_reply_interrupt(reply_id: str) -> int:
    reply = Message.objects.filter(pk=reply_id, status=Message.Status.STREAMING).first()
    if reply is None:
        return 0  # it ended before its process died
    reply_finish(
        reply=reply,
        text=reply.text,
        status=Message.Status.INTERRUPTED,
        prompt_tokens=0,
        completion_tokens=0,
        final_to_first_token_ms=None,
        reply_total_ms=None,
        error_code="server_lost",
    )
    return 1


async def sweep_forever() -> None:
    """Every web process runs this once (started with its first socket)."""
    store = audio_store()
    if not isinstance(store, RedisAudioStore):
        return  # one process holds all the live state: if it died, so did it
    sweeper = Sweeper(store)
    while True:
        raise_if_cancelled()
        await asyncio.sleep(settings.LIVE_SWEEP_S)
        try:
            await database_sync_to_async(sweeper.sweep)()
        except Exception:  # Redis or the database is down: the next sweep tries again
            log.warning("sweeping dead web processes failed", exc_info=True)


class _Started:
    task: asyncio.Task | None = None


def sweeper_start() -> None:
    """Once per process, on the loop of its first connection (config/asgi.py);
    LIVE_SWEEP_S=0 turns it off."""
    if _Started.task is None and settings.LIVE_SWEEP_S > 0:
        _Started.task = asyncio.get_running_loop().create_task(
            sweep_forever(), name="live-sweeper", context=contextvars.Context()
        )
