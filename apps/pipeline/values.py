"""Typed values that cross module and process boundaries in the voice
pipeline: a window of an utterance to transcribe, the candidate transcript
that comes back, a sentence to speak, and a persona's engines. Tasks take
them as plain keyword arguments (`as_kwargs`), so Celery messages stay JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from django.conf import settings

Purpose = Literal["partial", "candidate", "final"]


@dataclass(frozen=True)
class UtteranceWindow:
    """An utterance's audio up to `end_byte`, to transcribe for `purpose`:
    a draft while the user speaks, the likely final at a pause, or the final."""

    conversation_id: str
    utterance_id: str
    end_byte: int
    purpose: Purpose
    stt_kind: str = ""
    start_ms: int = 0
    speech_end_at: float | None = None

    def as_kwargs(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CandidateTranscript:
    """The transcript of an utterance up to a pause (`end_byte`)."""

    utterance_id: str
    end_byte: int
    text: str
    confidence: float | None
    provider: str
    failed: bool = False

    @classmethod
    def from_event(cls, message: dict) -> CandidateTranscript:
        return cls(
            utterance_id=message["utterance_id"],
            end_byte=message["end_byte"],
            text=message["text"],
            confidence=message["confidence"],
            provider=message["provider"],
            failed=bool(message.get("failed")),
        )


@dataclass(frozen=True)
class SentenceToSpeak:
    conversation_id: str
    reply_id: str
    index: int
    text: str
    tts_kind: str = ""
    voice: str = ""

    def as_kwargs(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PersonaEngines:
    """The engines a persona talks with: its own choice, or the deployment's."""

    stt: str
    llm: str
    tts: str
    voice: str = ""

    @classmethod
    def of(cls, persona) -> PersonaEngines:
        return cls(
            stt=persona.stt_kind or settings.STT_KIND,
            llm=persona.llm_kind or settings.LLM_KIND,
            tts=persona.tts_kind or settings.TTS_KIND,
            voice=persona.voice,
        )
