"""Test clips (copied from the shared audio folder with their manifest) and
word error rate after Whisper's English normalisation."""

import csv
import wave
from functools import cache
from pathlib import Path

AUDIO_DIR = Path(__file__).resolve().parent / "data" / "audio"


@cache
def manifest() -> dict[str, dict]:
    with open(AUDIO_DIR / "manifest.tsv", newline="") as handle:
        return {row["file"]: row for row in csv.DictReader(handle, delimiter="\t")}


def english_clips() -> list[str]:
    return [name for name, row in manifest().items() if row["language"] == "en"]


def pcm_of(name: str) -> bytes:
    with wave.open(str(AUDIO_DIR / name)) as clip:
        assert (clip.getframerate(), clip.getnchannels(), clip.getsampwidth()) == (16000, 1, 2)
        return clip.readframes(clip.getnframes())


@cache
def _normalizer():
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def normalize(text: str) -> str:
    return _normalizer()(text)


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """Corpus WER: all the clips' errors over all their reference words."""
    import jiwer

    refs = [normalize(r) for r in references]
    hyps = [normalize(h) for h in hypotheses]
    return jiwer.wer(refs, hyps)
