"""One socket's incoming speech: the cheap endpointer, the utterance's audio
buffer, and the STT jobs it dispatches (partial drafts, a candidate at each
pause, the final). Plain asyncio; the consumer owns the transport."""

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

from django.conf import settings

from apps.pipeline.audio_store import audio_store, utterance_key
from apps.pipeline.dispatch import enqueue
from apps.pipeline.services import utterance_finalize_from_candidate, utterance_mark_ended
from apps.pipeline.tasks import transcribe_window_task
from apps.pipeline.vad import BYTES_PER_MS, Endpointer

from .events import event


class Utterance:
    def __init__(self, start_ms: int) -> None:
        self.id = uuid.uuid4().hex
        self.start_ms = start_ms
        self.bytes = 0
        self.candidate_end = 0  # bytes at the last pause, transcribed as a candidate
        self.candidate: dict | None = None  # that transcript, once back
        self.end_ms = 0
        self.speech_end_at = 0.0
        self.partial_at_bytes = 0
        self.partial_in_flight = False


class SpeechIngest:
    def __init__(
        self,
        *,
        conversation_id,
        stt_kind: str,
        send: Callable[[dict], Awaitable[None]],
        may_start: Callable[[], Awaitable[None]],
        started: Callable[[], Awaitable[None]],
    ) -> None:
        self.conversation_id = conversation_id
        self.stt_kind = stt_kind
        self.send = send
        self.may_start = may_start  # raises to refuse an utterance (quota)
        self.started = started  # after speech.start is sent (barge-in)
        self.endpointer = Endpointer(
            end_silence_ms=settings.VAD_END_SILENCE_MS,
            pause_ms=settings.VAD_PAUSE_MS,
            min_speech_ms=settings.VAD_MIN_SPEECH_MS,
            max_utterance_ms=settings.VAD_MAX_UTTERANCE_MS,
        )
        self.utterance: Utterance | None = None
        self.stream_ms = 0.0
        self.awaiting: dict[str, Utterance] = {}  # ended; the final waits for a candidate
        self.mine: set[str] = set()  # utterances heard here whose final is not back yet

    async def frame(self, data: bytes) -> None:
        """One validated frame of PCM16 16 kHz mono."""
        frame_ms = len(data) / BYTES_PER_MS
        self.stream_ms += frame_ms
        happened = self.endpointer.feed(data)
        for start in (h for h in happened if h.kind == "start"):
            await self.start(start.audio, frame_ms)
        await self.append(data)
        if any(h.kind == "pause" for h in happened) and self.utterance is not None:
            self.transcribe(self.utterance, purpose="candidate")
        for end in (h for h in happened if h.kind == "end"):
            await self.end(reason=end.reason)

    async def start(self, preroll: bytes, frame_ms: float) -> None:
        await self.may_start()  # a refusal keeps nothing
        start_ms = max(0, int(self.stream_ms - frame_ms) - len(preroll) // BYTES_PER_MS)
        self.utterance = Utterance(start_ms=start_ms)
        self.mine.add(self.utterance.id)
        await self.send(event("speech.start", utterance_id=self.utterance.id))
        await self.started()
        await self.append(preroll)

    async def append(self, data: bytes) -> None:
        utterance = self.utterance
        if utterance is None or not data:
            return
        key = utterance_key(str(self.conversation_id), utterance.id)
        utterance.bytes = await audio_store().append(key, data)
        due_at = utterance.partial_at_bytes + settings.STT_PARTIAL_EVERY_MS * BYTES_PER_MS
        if utterance.bytes >= due_at and not utterance.partial_in_flight:
            utterance.partial_in_flight = True
            utterance.partial_at_bytes = utterance.bytes
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
        if utterance.partial_in_flight:
            await utterance_mark_ended(utterance_id=utterance.id)
        await self.send(
            event(
                "speech.end",
                utterance_id=utterance.id,
                duration_ms=utterance.bytes // BYTES_PER_MS,
                reason=reason,
            )
        )

    def transcribe(self, utterance: Utterance, *, purpose: str) -> None:
        if purpose == "candidate":
            utterance.candidate_end, utterance.candidate = utterance.bytes, None
        enqueue(
            transcribe_window_task,
            queue="stt_partial" if purpose == "partial" else "stt",
            conversation_id=str(self.conversation_id),
            utterance_id=utterance.id,
            end_byte=utterance.bytes,
            purpose=purpose,
            stt_kind=self.stt_kind,
            start_ms=utterance.start_ms,
            speech_end_at=utterance.speech_end_at or None,
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
        utterance_id = message["utterance_id"]
        utterance = self.awaiting.get(utterance_id)
        if utterance is None and self.utterance is not None and self.utterance.id == utterance_id:
            utterance = self.utterance
        if utterance is None or message["end_byte"] != utterance.candidate_end:
            return  # another socket's, or stale: the user spoke again after that pause
        if message.get("failed"):
            utterance.candidate_end = 0  # the end will run a fresh final
            self.candidate_overdue(utterance_id)
            return
        utterance.candidate = message
        if utterance_id in self.awaiting:
            await self.finalize_from_candidate(utterance)
        elif message["text"]:
            await self.send(
                event("transcript.partial", utterance_id=utterance_id, text=message["text"])
            )

    async def finalize_from_candidate(self, utterance: Utterance) -> None:
        self.awaiting.pop(utterance.id, None)
        await utterance_finalize_from_candidate(
            conversation_id=self.conversation_id,
            utterance_id=utterance.id,
            candidate=utterance.candidate,
            start_ms=utterance.start_ms,
            end_ms=utterance.end_ms,
            speech_end_at=utterance.speech_end_at,
        )

    def candidate_overdue(self, utterance_id: str) -> None:
        """No candidate in time (or it failed, or the socket closes): a fresh final."""
        utterance = self.awaiting.pop(utterance_id, None)
        if utterance is not None:
            self.transcribe(utterance, purpose="final")

    def settled(self, utterance_id: str) -> bool:
        """Whether this socket heard the utterance (once: it then forgets it)."""
        if utterance_id in self.mine:
            self.mine.discard(utterance_id)
            return True
        return False

    async def close(self) -> None:
        """The socket is gone: keep what was said."""
        if self.utterance is not None:
            await self.end(reason="disconnect")
        for utterance_id in list(self.awaiting):
            self.candidate_overdue(utterance_id)
