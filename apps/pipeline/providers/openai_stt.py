"""Speech-to-text through an OpenAI-compatible /v1/audio/transcriptions endpoint."""

import openai
from django.conf import settings

from apps.observability.metrics import retry_hook

from ..audio import wav_bytes
from .base import SAMPLE_RATE, ProviderError, Transcript
from .breaker import breaker_for


def sync_client(stage: str = "stt") -> openai.OpenAI:
    """A sync client of the OpenAI STT or TTS engine (thread-safe). Its retries
    are counted in parley_provider_retries_total{stage}."""
    return openai.OpenAI(
        base_url=settings.OPENAI_BASE_URL or None,
        api_key=settings.LLM_API_KEY or "missing",
        timeout=settings.LLM_TIMEOUT_S,
        max_retries=settings.LLM_MAX_RETRIES,
        http_client=openai.DefaultHttpxClient(
            event_hooks={"request": [retry_hook(stage, "openai")]}
        ),
    )


class OpenAISTT:
    kind = "openai"

    def __init__(self) -> None:
        self.client = sync_client()
        self.model = settings.OPENAI_STT_MODEL
        self.breaker = breaker_for(
            stage="stt", engine=self.kind, endpoint=settings.OPENAI_BASE_URL or ""
        )

    def transcribe(self, pcm: bytes) -> Transcript:
        if len(pcm) < 2:
            return Transcript("")
        self.breaker.allow()  # an open circuit: ProviderError at once
        try:
            result = self.client.audio.transcriptions.create(
                model=self.model,
                file=("audio.wav", wav_bytes(pcm, SAMPLE_RATE), "audio/wav"),
            )
        except openai.OpenAIError as exc:
            self.breaker.failed()
            raise ProviderError(
                "stt_unavailable", f"speech recognition service failed: {exc}"
            ) from exc
        except BaseException:
            self.breaker.released()
            raise
        self.breaker.succeeded()
        return Transcript((result.text or "").strip())

    def transcribe_batch(self, pcms: list[bytes], *, draft: bool = False) -> list[Transcript]:
        """One request per window; the API has no batch endpoint."""
        return [self.transcribe(pcm) for pcm in pcms]
