import io
import json
import re

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command

from apps.pipeline.audio import decode_to_pcm16, pcm16_seconds, wav_bytes, wav_read

AUDIO = settings.BASE_DIR / "tests" / "data" / "audio"
JFK = AUDIO / "faster-whisper_jfk.wav"


def normalised(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


def run(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_transcribe_prints_the_transcript_alone_on_stdout():
    out, err = run("transcribe", str(JFK))

    assert len(out.strip().splitlines()) == 1
    assert "ask not what your country can do for you" in normalised(out)
    assert "RTF" in err and "load" in err


def test_transcribe_json_is_one_valid_object():
    out, _ = run("transcribe", str(JFK), "--json", "--stt", "faster_whisper")

    result = json.loads(out)
    assert set(result) == {"text", "audio_seconds", "load_ms", "transcribe_ms", "rtf", "provider"}
    assert result["provider"] == "faster_whisper"
    assert result["audio_seconds"] == pytest.approx(11.0, abs=0.01)
    assert 0 < result["rtf"] < 5
    assert "ask not what your country" in normalised(result["text"])


def test_transcribe_non_audio_file_is_a_command_error(tmp_path):
    fake_wav = tmp_path / "notes.wav"
    fake_wav.write_text("this is a text file, not audio\n" * 20)

    with pytest.raises(CommandError, match="not a readable audio file"):
        run("transcribe", str(fake_wav))


def test_transcribe_missing_file_is_a_command_error(tmp_path):
    with pytest.raises(CommandError, match="no such file"):
        run("transcribe", str(tmp_path / "absent.wav"))


@pytest.mark.parametrize(("tts", "voice"), [("piper", ""), ("espeak", "en-us")])
def test_say_writes_a_wav_that_decodes(tmp_path, tts, voice):
    out_path = tmp_path / "hello.wav"

    run(
        "say",
        "Hello, this is Parley speaking.",
        "-o",
        str(out_path),
        "--tts",
        tts,
        "--voice",
        voice,
    )

    pcm = decode_to_pcm16(out_path)
    assert 1.0 < pcm16_seconds(pcm) < 6.0


def test_decode_reads_other_containers_and_resamples(tmp_path):
    # given a 24 kHz WAV (not the 16 kHz the engines take)
    pcm24k = b"\x10\x00\xf0\xff" * 12_000  # 1 s
    path = tmp_path / "tone.wav"
    path.write_bytes(wav_bytes(pcm24k, 24_000))

    pcm = decode_to_pcm16(path)

    assert pcm16_seconds(pcm) == pytest.approx(1.0, abs=0.02)
    assert decode_to_pcm16(path.read_bytes(), container_format="wav") == pcm


def test_decode_refuses_to_guess_the_container_of_bytes():
    with pytest.raises(ValueError, match="container_format"):
        decode_to_pcm16(JFK.read_bytes())


def test_wav_bytes_round_trip():
    pcm = bytes(range(256)) * 10

    assert wav_read(wav_bytes(pcm, 16_000)) == (pcm, 16_000)
