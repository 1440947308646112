"""Whole-file workflows for developer commands (`manage.py transcribe`, `say`):
decode or write a file and run one engine on it, timed."""

import time
from pathlib import Path

from .audio import FileTranscription, decode_to_pcm16, pcm16_seconds, wav_bytes
from .providers import registry


def file_transcribe(*, path: str | Path, kind: str = "") -> FileTranscription:
    """Decode an audio file and transcribe it with the STT engine of `kind`, timed."""
    pcm = decode_to_pcm16(path)
    started = time.perf_counter()
    engine = registry.stt_get(kind)
    loaded = time.perf_counter()
    transcript = engine.transcribe(pcm)
    done = time.perf_counter()
    return FileTranscription(
        text=transcript.text,
        audio_seconds=pcm16_seconds(pcm),
        load_ms=(loaded - started) * 1000,
        transcribe_ms=(done - loaded) * 1000,
        provider=engine.kind,
    )


def text_say_to_wav(*, text: str, out: str | Path, kind: str = "", voice: str = "") -> float:
    """Synthesise `text` with the TTS engine of `kind` into a WAV file; returns seconds."""
    speech = registry.tts_get(kind).synthesize(text, voice=voice)
    Path(out).write_bytes(wav_bytes(speech.pcm, speech.sample_rate))
    return pcm16_seconds(speech.pcm, speech.sample_rate)
