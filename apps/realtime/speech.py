"""One socket's incoming speech, the owner of its utterances: the cheap
endpointer, each utterance's audio (buffered in the process, written in
batches by the LiveWriter), and the STT jobs it dispatches (drafts while the
user speaks, a candidate at each pause, the final). Plain asyncio; the
consumer owns the transport. A frame costs the endpointer and a buffer append:
no I/O, no await unless something happened."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

from django.conf import settings

from apps.accounts.ledger import AUDIO_USED
from apps.pipeline.audio_store import utterance_key
from apps.pipeline.dispatch import enqueue
from apps.pipeline.services import final_requested_key, utterance_finalize_from_candidate
from apps.pipeline.tasks import transcribe_window_task
from apps.pipeline.vad import BYTES_PER_MS, Endpointer
from apps.pipeline.values import CandidateTranscript, Purpose, UtteranceWindow

from .events import event
from .live import LiveWriter, OpenAudio

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Utterance:
    id: str
    start_ms: int
    audio: OpenAudio
    candidate_end: int = 0  # bytes at the last pause, transcribed as a candidate
    candidate: CandidateTranscript | None = None  # that transcript, once back
    end_ms: int = 0
    speech_end_at: float = 0.0
    partial_at_bytes: int = 0
    partial_in_flight: bool = False

    @property
    def bytes(self) -> int:
        return len(self.audio.pcm)


class SpeechIngest:
    def __init__(
        self,
        *,
        conversation_id,
        stt_kind: str,
        live: LiveWriter,
        send: Callable[[dict], Awaitable[None]],
        report: Callable[[str, str], object],
        may_start: Callable[[], Awaitable[None]],
        spend: Callable[[float], bool],
        started: Callable[[], Awaitable[None]],
        finalized: Callable[[str], Awaitable[None]],
    ) -> None:
        self.conversation_id = str(conversation_id)
        self.stt_kind = stt_kind
        self.live = live
        self.send = send
        self.report = report  # (code, message): an error for the client, sent soon
        self.may_start = may_start  # raises to refuse an utterance (quota)
        self.spend = spend  # counts speech (ms) against the quota; False: used up
        self.started = started  # after speech.start is sent (barge-in)
        self.finalized = finalized  # a final stored here (message id): reply to it
        self.endpointer = Endpointer(
            end_silence_ms=settings.VAD_END_SILENCE_MS,
            pause_ms=settings.VAD_PAUSE_MS,
            min_speech_ms=settings.VAD_MIN_SPEECH_MS,
            max_utterance_ms=settings.VAD_MAX_UTTERANCE_MS,
        )
        self.partial_every_bytes = settings.STT_PARTIAL_EVERY_MS * BYTES_PER_MS
        first_ms = min(settings.STT_FIRST_PARTIAL_MS, settings.STT_PARTIAL_EVERY_MS)
        self.first_partial_bytes = first_ms * BYTES_PER_MS
        self.utterance: Utterance | None = None
        self.stream_ms = 0.0
        self.awaiting: dict[str, Utterance] = {}  # ended; the final waits for a candidate
        self.mine: set[str] = set()  # utterances heard here whose final is not back yet
        self.answered: set[str] = set()  # finalized here, their reply already started

    async def frame(self, data: bytes) -> None:
        """One validated frame of PCM16 16 kHz mono."""
        frame_ms = len(data) / BYTES_PER_MS
        self.stream_ms += frame_ms
        happened = self.endpointer.feed(data)
        if not happened:
            if self.utterance is not None:
                self.append(self.utterance, data)
                if not self.spend(frame_ms):
                    await self.quota_end()
            return
        for start in (h for h in happened if h.kind == "start"):
            await self.start(start.audio, frame_ms)
        if self.utterance is not None:
            self.append(self.utterance, data)
        if any(h.kind == "pause" for h in happened) and self.utterance is not None:
            self.transcribe(self.utterance, purpose="candidate")
        for end in (h for h in happened if h.kind == "end"):
            await self.end(reason=end.reason)
        if self.utterance is not None and not self.spend(frame_ms):
            await self.quota_end()

    async def quota_end(self) -> None:
        """The day's speaking time ran out mid-utterance: what was said is kept."""
        self.endpointer.force_end()
        await self.end(reason="quota")
        self.report("quota_exceeded", AUDIO_USED)

    async def start(self, preroll: bytes, frame_ms: float) -> None:
        await self.may_start()  # a refusal keeps nothing
        start_ms = max(0, int(self.stream_ms - frame_ms) - len(preroll) // BYTES_PER_MS)
        utterance_id = uuid.uuid4().hex
        audio = self.live.audio_open(
            key=utterance_key(self.conversation_id, utterance_id),
            utterance_id=utterance_id,
            record={
                "conversation": self.conversation_id,
                "start_ms": str(start_ms),
                "stt_kind": self.stt_kind,
            },
            on_error=self.store_failed,
        )
        utterance = self.utterance = Utterance(id=utterance_id, start_ms=start_ms, audio=audio)
        self.mine.add(utterance_id)
        await self.send(event("speech.start", utterance_id=utterance_id))
        await self.started()
        self.append(utterance, preroll)
        self.spend(len(preroll) / BYTES_PER_MS)  # a share run out ends it at the next frame

    def append(self, utterance: Utterance, data: bytes) -> None:
        if not data:
            return
        length = self.live.audio_append(utterance.audio, data)
        due_at = utterance.partial_at_bytes + (
            self.partial_every_bytes if utterance.partial_at_bytes else self.first_partial_bytes
        )
        if length >= due_at and not utterance.partial_in_flight:
            utterance.partial_in_flight = True
            utterance.partial_at_bytes = length
            self.transcribe(utterance, purpose="partial")

    async def end(self, *, reason: str) -> None:
        """Close the utterance. After a pause (the usual end), the candidate
        transcribed at the pause becomes the final: at once if it is back,
        else when it comes (with a fallback to a fresh final)."""
        if reason == "client" and not self.endpointer.force_end():
            return
        utterance, self.utterance = self.utterance, None
        if utterance is None:
            return
        utterance.speech_end_at = time.time()
        utterance.end_ms = utterance.start_ms + utterance.bytes // BYTES_PER_MS
        self.live.audio_end(
            utterance.id,
            {"end_ms": str(utterance.end_ms), "speech_end_at": str(utterance.speech_end_at)},
        )
        if utterance.partial_in_flight:
            self.live.flag(final_requested_key(utterance.id), 300)
        if reason == "silence" and utterance.candidate_end:
            self.awaiting[utterance.id] = utterance
            if utterance.candidate is not None:
                await self.finalize_from_candidate(utterance)
            else:
                asyncio.get_running_loop().call_later(
                    settings.STT_CANDIDATE_WAIT_S, self.candidate_overdue, utterance.id
                )
        else:
            self.transcribe(utterance, purpose="final")
        duration_ms = utterance.bytes // BYTES_PER_MS
        log.info("utterance ended: %s, %d ms, %s", utterance.id, duration_ms, reason)
        await self.send(
            event("speech.end", utterance_id=utterance.id, duration_ms=duration_ms, reason=reason)
        )

    def transcribe(self, utterance: Utterance, *, purpose: Purpose) -> None:
        """Queue an STT job for the audio so far, once the store holds it."""
        if purpose == "candidate":
            utterance.candidate_end, utterance.candidate = utterance.bytes, None
        window = UtteranceWindow(
            conversation_id=self.conversation_id,
            utterance_id=utterance.id,
            end_byte=utterance.bytes,
            purpose=purpose,
            stt_kind=self.stt_kind,
            start_ms=utterance.start_ms,
            speech_end_at=utterance.speech_end_at or None,
        )
        draft = purpose == "partial"
        job = partial(
            enqueue,
            transcribe_window_task,
            queue="stt_partial" if draft else "stt",
            expires=settings.STT_PARTIAL_EXPIRES_S if draft else None,
            on_error=partial(self.enqueue_failed, utterance, purpose),
            **window.as_kwargs(),
        )
        self.live.when_stored(utterance.audio, job)

    def enqueue_failed(self, utterance: Utterance, purpose: Purpose, exc: Exception) -> None:
        if purpose == "partial":
            utterance.partial_in_flight = False  # the next draft is due soon anyway
            return
        if purpose == "candidate":
            utterance.candidate_end = 0  # the end runs a fresh final
            self.candidate_overdue(utterance.id)
            return
        self.report(
            "stt_unavailable",
            "Speech recognition is not reachable right now; that utterance was not "
            "transcribed. Please say it again in a moment.",
        )

    def store_failed(self, exc: Exception) -> None:
        self.report(
            "store_unavailable",
            "Live audio storage is not reachable right now; your audio is kept and "
            "will be transcribed when it is back.",
        )

    async def partial(self, message: dict) -> None:
        """Drafts go to the socket that is speaking, while it still speaks."""
        utterance = self.utterance
        if utterance is None or message["utterance_id"] != utterance.id:
            return
        utterance.partial_in_flight = False
        if message["text"]:
            await self.send(message)

    async def candidate(self, message: dict) -> None:
        """The transcript of an utterance up to a pause."""
        candidate = CandidateTranscript.from_event(message)
        utterance = self.awaiting.get(candidate.utterance_id)
        if utterance is None and self.utterance is not None:
            utterance = self.utterance if self.utterance.id == candidate.utterance_id else None
        if utterance is None or candidate.end_byte != utterance.candidate_end:
            return  # another socket's, or stale: the user spoke again after that pause
        if candidate.failed:
            utterance.candidate_end = 0  # the end will run a fresh final
            self.candidate_overdue(utterance.id)
            return
        utterance.candidate = candidate
        if utterance.id in self.awaiting:
            await self.finalize_from_candidate(utterance)
        elif candidate.text:
            await self.send(
                event("transcript.partial", utterance_id=utterance.id, text=candidate.text)
            )

    async def finalize_from_candidate(self, utterance: Utterance) -> None:
        self.awaiting.pop(utterance.id, None)
        assert utterance.candidate is not None
        try:
            message_id = await utterance_finalize_from_candidate(
                conversation_id=self.conversation_id,
                utterance_id=utterance.id,
                candidate=utterance.candidate,
                start_ms=utterance.start_ms,
                end_ms=utterance.end_ms,
                speech_end_at=utterance.speech_end_at,
            )
        except Exception:  # the database is unreachable: a worker's final retries
            self.transcribe(utterance, purpose="final")
            raise
        if message_id is not None and self.heard(utterance.id) == "mine":
            self.answered.add(utterance.id)
            await self.finalized(message_id)

    def candidate_overdue(self, utterance_id: str) -> None:
        """No candidate in time (or it failed, or the socket closes): a fresh final."""
        utterance = self.awaiting.pop(utterance_id, None)
        if utterance is not None:
            self.transcribe(utterance, purpose="final")

    def heard(self, utterance_id: str) -> Literal["mine", "answered", "other"]:
        """Its final (or empty) transcript is known: did this socket hear the
        utterance ("mine", once: answer it), answer it already, or not?"""
        self.live.audio_forget(utterance_id)
        if utterance_id in self.answered:
            self.answered.discard(utterance_id)
            return "answered"
        if utterance_id in self.mine:
            self.mine.discard(utterance_id)
            return "mine"
        return "other"

    async def close(self) -> None:
        """The socket is gone: keep what was said (its final is queued once the
        store holds the audio, which is written now)."""
        if self.utterance is not None:
            await self.end(reason="disconnect")
        for utterance_id in list(self.awaiting):
            self.candidate_overdue(utterance_id)
        await self.live.settle()
