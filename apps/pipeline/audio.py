"""Small, pure audio helpers: PCM16 <-> float32, WAV in memory, decoding any file PyAV
reads to the 16 kHz mono PCM16 every STT engine is given, and the two file-level
workflows behind the `transcribe` and `say` management commands."""

import io
import wave
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from .providers.base import SAMPLE_RATE


def pcm16_to_float32(pcm: bytes) -> np.ndarray:
    """PCM16 LE mono -> float32 in [-1, 1). A trailing odd byte is dropped."""
    usable = len(pcm) - (len(pcm) % 2)
    return np.frombuffer(pcm[:usable], dtype="<i2").astype(np.float32) / 32768.0


def float32_to_pcm16(audio: np.ndarray) -> bytes:
    clipped = np.clip(audio, -1.0, 32767 / 32768)
    return (clipped * 32768.0).astype("<i2").tobytes()


def pcm16_resample(pcm: bytes, *, from_rate: int, to_rate: int) -> bytes:
    """Linear-interpolation resampling; good enough for speech going into Whisper."""
    if from_rate == to_rate or not pcm:
        return pcm
    audio = pcm16_to_float32(pcm)
    duration = len(audio) / from_rate
    n_out = max(1, round(duration * to_rate))
    t_out = np.arange(n_out) / to_rate
    t_in = np.arange(len(audio)) / from_rate
    return float32_to_pcm16(np.interp(t_out, t_in, audio))


def pcm16_seconds(pcm: bytes, sample_rate: int = SAMPLE_RATE) -> float:
    return len(pcm) / 2 / sample_rate


def wav_bytes(pcm: bytes, sample_rate: int) -> bytes:
    """Wrap PCM16 LE mono in a WAV container, in memory."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(pcm)
    return buffer.getvalue()


def wav_read(data: bytes) -> tuple[bytes, int]:
    """(PCM16 LE mono, sample rate) from a WAV held in memory.

    Tolerates the bogus data length that streaming writers (espeak-ng --stdout) put in
    the header: frames are read up to what the bytes actually hold."""
    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            if wav.getsampwidth() != 2 or wav.getnchannels() != 1:
                raise ValueError(
                    f"expected 16-bit mono WAV, got {wav.getsampwidth() * 8}-bit "
                    f"{wav.getnchannels()}-channel"
                )
            rate = wav.getframerate()
            pcm = wav.readframes(len(data) // 2)
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"not a readable WAV: {exc}") from exc
    return pcm[: len(pcm) - len(pcm) % 2], rate


def decode_to_pcm16(source: str | Path | bytes, *, container_format: str | None = None) -> bytes:
    """Decode any audio PyAV reads to 16 kHz mono PCM16 LE.

    `source` is a file path (PyAV opens it by path; `container_format` may name the
    container explicitly) or raw bytes, which must come with `container_format`: the
    container of user-supplied bytes is never guessed. Raises ValueError with a readable
    message when the input cannot be decoded or holds no audio."""
    if isinstance(source, bytes):
        if not container_format:
            raise ValueError("decoding raw bytes needs an explicit container_format")
        target: str | io.BytesIO = io.BytesIO(source)
        label = f"<{len(source)} bytes of {container_format}>"
    else:
        target = str(source)
        label = str(source)
        if not Path(source).is_file():
            raise ValueError(f"{label}: no such file")
    chunks: list[bytes] = []
    try:
        with av.open(target, mode="r", format=container_format) as container:
            if not container.streams.audio:
                raise ValueError(f"{label}: contains no audio stream")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().tobytes())
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().tobytes())
    except (av.FFmpegError, OSError) as exc:  # InvalidDataError is also a ValueError
        raise ValueError(f"{label}: not a readable audio file ({exc})") from exc
    return b"".join(chunks)


@dataclass(frozen=True)
class FileTranscription:
    text: str
    audio_seconds: float
    load_ms: float
    transcribe_ms: float
    provider: str

    @property
    def rtf(self) -> float:
        """Real-time factor: seconds of compute per second of audio (< 1 is faster)."""
        return self.transcribe_ms / 1000 / self.audio_seconds if self.audio_seconds else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "text": self.text,
            "audio_seconds": round(self.audio_seconds, 3),
            "load_ms": round(self.load_ms, 1),
            "transcribe_ms": round(self.transcribe_ms, 1),
            "rtf": round(self.rtf, 4),
            "provider": self.provider,
        }
