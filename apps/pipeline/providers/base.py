from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

SAMPLE_RATE = 16_000  # what every STT engine is given: PCM16 LE mono


@dataclass(frozen=True)
class Transcript:
    text: str
    confidence: float | None = None


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class ReplyRequest:
    system_prompt: str
    history: list[ChatMessage]
    model: str
    temperature: float
    max_tokens: int


@dataclass
class ReplyUsage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class Speech:
    pcm: bytes  # PCM16 LE mono
    sample_rate: int


@dataclass
class ReplyStream:
    """What an LLM engine yields: text deltas, and usage filled in by the end."""

    deltas: AsyncIterator[str]
    usage: ReplyUsage = field(default_factory=ReplyUsage)


class SpeechToText(Protocol):
    kind: str

    def transcribe(self, pcm: bytes) -> Transcript:
        """Transcribe 16 kHz PCM16 mono audio; empty text when nothing was said."""
        ...

    def transcribe_batch(self, pcms: list[bytes]) -> list[Transcript]:
        """Several windows at once (from different sessions); same order out."""
        ...


class LanguageModel(Protocol):
    kind: str

    def stream_reply(self, request: ReplyRequest) -> ReplyStream: ...


class TextToSpeech(Protocol):
    kind: str

    def synthesize(self, text: str, *, voice: str = "") -> Speech: ...


class ProviderError(Exception):
    """An engine failed in a way the user should hear about (code, message)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
