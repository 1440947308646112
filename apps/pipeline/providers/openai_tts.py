"""Text-to-speech through an OpenAI-compatible /v1/audio/speech endpoint (raw PCM)."""

from collections.abc import Iterator

import openai
from django.conf import settings

from .base import ProviderError, Speech, SpeechChunk, speech_in_one_chunk
from .breaker import breaker_for
from .openai_stt import sync_client

OPENAI_PCM_RATE = 24_000  # response_format="pcm" is 24 kHz PCM16 LE mono
DEFAULT_VOICE = "alloy"


class OpenAITTS:
    kind = "openai"

    def __init__(self) -> None:
        self.client = sync_client("tts")
        self.model = settings.OPENAI_TTS_MODEL
        self.breaker = breaker_for(
            stage="tts", engine=self.kind, endpoint=settings.OPENAI_BASE_URL or ""
        )

    def synthesize_stream(self, text: str, *, voice: str = "") -> Iterator[SpeechChunk]:
        return speech_in_one_chunk(self.synthesize(text, voice=voice))  # one request, one piece

    def synthesize(self, text: str, *, voice: str = "") -> Speech:
        if not text.strip():
            return Speech(pcm=b"", sample_rate=OPENAI_PCM_RATE)
        self.breaker.allow()  # an open circuit: ProviderError at once
        try:
            response = self.client.audio.speech.create(
                model=self.model,
                voice=voice or DEFAULT_VOICE,
                input=text,
                response_format="pcm",
            )
            pcm = response.read()
        except openai.OpenAIError as exc:
            self.breaker.failed()
            raise ProviderError(
                "tts_unavailable", f"speech synthesis service failed: {exc}"
            ) from exc
        except BaseException:
            self.breaker.released()
            raise
        self.breaker.succeeded()
        return Speech(pcm=pcm[: len(pcm) - len(pcm) % 2], sample_rate=OPENAI_PCM_RATE)
