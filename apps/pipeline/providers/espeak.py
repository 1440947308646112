"""Text-to-speech with Debian's `espeak-ng`: robotic, instant, and a second voice for
tests. The text goes to the process as one argument (after `--`), never through a shell."""

import re
import shutil
import subprocess
from collections.abc import Iterator

from ..audio import wav_read
from .base import ProviderError, Speech, SpeechChunk, speech_in_one_chunk

DEFAULT_VOICE = "en-us"
VOICE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_+\-]{0,40}$")
TIMEOUT_S = 30


class EspeakTTS:
    kind = "espeak"

    def __init__(self) -> None:
        self.binary = shutil.which("espeak-ng")

    def synthesize_stream(self, text: str, *, voice: str = "") -> Iterator[SpeechChunk]:
        return speech_in_one_chunk(self.synthesize(text, voice=voice))  # one request, one piece

    def synthesize(self, text: str, *, voice: str = "") -> Speech:
        if self.binary is None:
            raise ProviderError(
                "tts_unavailable", "espeak-ng is not installed (apt-get install espeak-ng)"
            )
        voice = voice or DEFAULT_VOICE
        if not VOICE_RE.match(voice):
            raise ProviderError("tts_unavailable", f"not an espeak-ng voice name: {voice!r}")
        try:
            result = subprocess.run(
                [self.binary, "-v", voice, "--stdout", "--", text],
                capture_output=True,
                timeout=TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ProviderError("tts_unavailable", f"espeak-ng failed: {exc}") from exc
        if result.returncode != 0:
            message = result.stderr.decode(errors="replace").strip()
            raise ProviderError("tts_unavailable", f"espeak-ng failed: {message}")
        try:
            pcm, sample_rate = wav_read(result.stdout)
        except ValueError as exc:
            raise ProviderError("tts_unavailable", f"espeak-ng gave no audio: {exc}") from exc
        return Speech(pcm=pcm, sample_rate=sample_rate)
