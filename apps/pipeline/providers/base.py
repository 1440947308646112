from collections.abc import AsyncIterator, Iterator
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


@dataclass(frozen=True)
class SpeechChunk:
    """One piece of a text's audio, given out as soon as it is made."""

    pcm: bytes  # PCM16 LE mono
    sample_rate: int
    last: bool  # no more pieces of this text follow


def speech_in_one_chunk(speech: Speech) -> Iterator[SpeechChunk]:
    """`synthesize_stream` for an engine that makes a text's audio in one piece."""
    yield SpeechChunk(pcm=speech.pcm, sample_rate=speech.sample_rate, last=True)


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

    def transcribe_batch(self, pcms: list[bytes], *, draft: bool = False) -> list[Transcript]:
        """Several windows at once (from different sessions); same order out.
        `draft`: a live draft, which may take a cheaper, less exact path."""
        ...


class LanguageModel(Protocol):
    kind: str

    def stream_reply(self, request: ReplyRequest) -> ReplyStream: ...


class TextToSpeech(Protocol):
    kind: str

    def synthesize(self, text: str, *, voice: str = "") -> Speech: ...

    def synthesize_stream(self, text: str, *, voice: str = "") -> Iterator[SpeechChunk]:
        """The same audio as `synthesize`, in pieces in speaking order, each as soon
        as it exists; the last has `last=True`. At least one piece, even for no text."""
        ...


# What a client is told for each provider error code: one plain sentence. The
# engine's own words (exception text, hosts, paths, HTTP bodies) never reach a
# socket; they go to the log and the command line as the error's `detail`.
CLIENT_MESSAGES = {
    "stt_unavailable": "Speech recognition failed for that utterance.",
    "tts_unavailable": "Speech synthesis failed.",
    "llm_unavailable": "The persona could not answer just now.",
    "llm_rate_limited": "The language model is busy; try again shortly.",
    "llm_timeout": "The language model took too long to answer.",
}
CLIENT_MESSAGE_OTHER = "Something went wrong; try again."


class ProviderError(Exception):
    """An engine failed in a way the user should hear about. `code` and `message`
    (CLIENT_MESSAGES) are for the client; `detail`, also `str(error)`, is for
    operators only."""

    def __init__(self, code: str, detail: str = "") -> None:
        self.code = code
        self.message = CLIENT_MESSAGES.get(code, CLIENT_MESSAGE_OTHER)
        self.detail = detail or self.message
        super().__init__(self.detail)


def approx_tokens(text: str) -> int:
    """About four characters a token, and never fewer tokens than words."""
    return max(len(text) // 4, len(text.split()))


def prompt_text(request: ReplyRequest) -> str:
    return " ".join([request.system_prompt, *(m.content for m in request.history)])


def usage_or_estimate(usage: ReplyUsage, *, request: ReplyRequest, text: str) -> ReplyUsage:
    """The provider's counts, or an estimate where it sent none: a reply that was
    interrupted or failed mid-stream never gets the stream's last chunk, which is
    where usage comes, yet the provider bills the prompt and what it streamed.
    Nothing is estimated for a reply that streamed nothing."""
    if not text:
        return usage
    return ReplyUsage(
        prompt_tokens=usage.prompt_tokens or approx_tokens(prompt_text(request)),
        completion_tokens=usage.completion_tokens or approx_tokens(text),
    )
