"""The energy-gate endpointer, fed real clips in 100 ms frames as a browser sends them."""

import numpy as np
import pytest
from django.conf import settings

from apps.pipeline.vad import BYTES_PER_MS, Endpointer
from tests.audio import pcm_of

FRAME_BYTES = 100 * BYTES_PER_MS  # 3200: what the page sends
PREROLL_MAX_BYTES = 300 * BYTES_PER_MS
ONE_SECOND_OF_SILENCE = bytes(1000 * BYTES_PER_MS)


def endpointer() -> Endpointer:
    return Endpointer(
        end_silence_ms=settings.VAD_END_SILENCE_MS,
        min_speech_ms=settings.VAD_MIN_SPEECH_MS,
        max_utterance_ms=settings.VAD_MAX_UTTERANCE_MS,
        pause_ms=settings.VAD_PAUSE_MS,
    )


def feed(
    gate: Endpointer, pcm: bytes, frame_bytes: int = FRAME_BYTES, *, pauses: bool = False
) -> list[tuple[int, object]]:
    """(offset in bytes of the frame it happened in, event) for what happened; pauses
    only when asked (they have their own test)."""
    happened = []
    for offset in range(0, len(pcm), frame_bytes):
        for event in gate.feed(pcm[offset : offset + frame_bytes]):
            if pauses or event.kind != "pause":
                happened.append((offset, event))
    return happened


@pytest.mark.parametrize("clip", ["speechbrain_spk1_snt1.wav", "faster-whisper_jfk.wav"])
def test_every_end_by_silence_comes_a_fixed_silence_after_a_pause(clip):
    # given
    gate = endpointer()

    # when
    happened = feed(gate, pcm_of(clip) + ONE_SECOND_OF_SILENCE, pauses=True)

    # then the event just before each end is a pause, (end silence - pause) ms earlier
    wait = (settings.VAD_END_SILENCE_MS - settings.VAD_PAUSE_MS) * BYTES_PER_MS
    ends = [i for i, (_, event) in enumerate(happened) if event.kind == "end"]
    assert ends
    for i in ends:
        (pause_at, pause), (end_at, _) = happened[i - 1], happened[i]
        assert pause.kind == "pause"
        assert wait - FRAME_BYTES <= end_at - pause_at <= wait + FRAME_BYTES
    # a pause inside an utterance that does not end it is followed by more speech
    assert sum(event.kind == "pause" for _, event in happened) >= len(ends)


def tone(seconds: float, *, amplitude: float = 0.3, hz: float = 440.0) -> bytes:
    t = np.arange(int(seconds * 16_000)) / 16_000
    return (amplitude * 32767 * np.sin(2 * np.pi * hz * t)).astype("<i2").tobytes()


def kinds(happened) -> list[tuple[str, str]]:
    return [(event.kind, event.reason) for _, event in happened]


@pytest.mark.parametrize(
    "clip",
    [
        "speechbrain_spk1_snt1.wav",
        "speechbrain_spk1_snt3.wav",
        "deepspeech_LDC93S1.wav",
        "cognitive-services-speech-sdk_whatstheweatherlike.wav",
    ],
)
def test_a_short_sentence_is_one_utterance_ended_by_silence(clip):
    # given
    gate = endpointer()
    pcm = pcm_of(clip)

    # when
    happened = feed(gate, pcm + ONE_SECOND_OF_SILENCE)

    # then
    assert kinds(happened) == [("start", ""), ("end", "silence")]
    (start_at, start), (end_at, _) = happened
    assert start_at < 1000 * BYTES_PER_MS  # the speech starts within the first second
    # the end comes after the speech, within the end-silence wait of the clip's end
    assert end_at >= len(pcm) - 1000 * BYTES_PER_MS
    assert end_at <= len(pcm) + (settings.VAD_END_SILENCE_MS + 100) * BYTES_PER_MS
    assert not gate.in_speech


def test_the_preroll_is_the_audio_just_before_the_start_and_at_most_300_ms():
    # given half a second of near-silence before the sentence
    pcm = bytes(500 * BYTES_PER_MS) + pcm_of("speechbrain_spk1_snt1.wav")

    # when
    (start_at, start), _ = feed(endpointer(), pcm + ONE_SECOND_OF_SILENCE)

    # then
    assert start.kind == "start"
    assert 0 < len(start.audio) <= PREROLL_MAX_BYTES
    assert len(start.audio) == min(start_at, PREROLL_MAX_BYTES)  # whole 100 ms frames
    assert start.audio == pcm[start_at - len(start.audio) : start_at]


def test_the_preroll_stays_short_after_a_long_wait():
    gate = endpointer()
    feed(gate, bytes(30_000 * BYTES_PER_MS))  # 30 s of silence first

    [(_, start), *_] = feed(gate, tone(1))

    assert start.kind == "start"
    assert len(start.audio) == PREROLL_MAX_BYTES


@pytest.mark.parametrize("clip", ["speechbrain_spk1_snt1.wav", "speechbrain_example1.wav"])
def test_every_clip_preroll_is_at_most_300_ms(clip):
    happened = feed(endpointer(), pcm_of(clip) + ONE_SECOND_OF_SILENCE)

    for _, event in happened:
        if event.kind == "start":
            assert len(event.audio) <= PREROLL_MAX_BYTES


def test_odd_frame_sizes_find_the_same_utterance():
    # given a worklet that sends 512-sample (32 ms) frames instead of 100 ms ones
    pcm = pcm_of("speechbrain_spk1_snt1.wav") + ONE_SECOND_OF_SILENCE

    # when
    happened = feed(endpointer(), pcm, frame_bytes=1024)

    # then
    assert kinds(happened) == [("start", ""), ("end", "silence")]


def test_silence_and_quiet_never_open_the_gate():
    quiet = (np.random.default_rng(7).normal(0, 30, 16_000 * 5)).astype("<i2").tobytes()

    assert feed(endpointer(), bytes(5000 * BYTES_PER_MS) + quiet) == []


def test_a_click_shorter_than_min_speech_does_not_open_the_gate():
    click = tone(settings.VAD_MIN_SPEECH_MS / 1000 - 0.06)

    assert feed(endpointer(), click + ONE_SECOND_OF_SILENCE) == []


def test_leopard_empty_opens_the_energy_gate_for_the_whole_clip():
    """leopard_empty.wav holds no words but a steady noise at about −26 dBFS, 44 dB
    above the gate's initial floor (−70 dBFS). The floor rises only on subframes
    that are already unvoiced, so it never catches up with a steady noise more
    than 12 dB above it: the gate opens at once and stays open until the silence
    after the clip. That is allowed by design: this cheap gate only cuts
    utterances; the STT worker's Silero VAD (faster-whisper vad_filter) finds no
    speech in it and the utterance ends as transcript.empty."""
    pcm = pcm_of("leopard_empty.wav")

    happened = feed(endpointer(), pcm + ONE_SECOND_OF_SILENCE)

    assert kinds(happened) == [("start", ""), ("end", "silence")]
    (start_at, _), (end_at, _) = happened
    assert start_at <= 200 * BYTES_PER_MS
    assert end_at >= len(pcm)  # held open to the clip's very end


def test_a_25_second_loud_tone_ends_at_the_maximum_length():
    # given
    gate = endpointer()

    # when
    happened = feed(gate, tone(25))

    # then: one utterance cut at VAD_MAX_UTTERANCE_MS, then the next one opens
    assert kinds(happened)[:3] == [("start", ""), ("end", "max_length"), ("start", "")]
    (start_at, _), (end_at, _), (restart_at, _) = happened[:3]
    assert (end_at - start_at) // BYTES_PER_MS == pytest.approx(
        settings.VAD_MAX_UTTERANCE_MS, abs=100
    )
    assert (restart_at - end_at) // BYTES_PER_MS <= settings.VAD_MIN_SPEECH_MS + 100
    assert gate.in_speech


def test_max_length_follows_the_setting():
    gate = Endpointer(max_utterance_ms=3000)

    happened = feed(gate, tone(4))

    (start_at, _), (end_at, end) = happened[:2]
    assert end.reason == "max_length"
    assert (end_at - start_at) // BYTES_PER_MS == pytest.approx(3000, abs=100)


def test_force_end_closes_an_open_utterance_once():
    # given an utterance in progress
    gate = endpointer()
    pcm = pcm_of("speechbrain_spk1_snt1.wav")
    assert kinds(feed(gate, pcm[: 1500 * BYTES_PER_MS])) == [("start", "")]

    # when
    ended = gate.force_end()

    # then
    assert [(e.kind, e.reason) for e in ended] == [("end", "client")]
    assert not gate.in_speech
    assert gate.force_end() == []


def test_force_end_without_an_utterance_does_nothing():
    gate = endpointer()
    feed(gate, bytes(FRAME_BYTES * 5))

    assert gate.force_end() == []


def test_speech_after_force_end_opens_a_new_utterance():
    gate = endpointer()
    feed(gate, tone(1))
    gate.force_end()

    happened = feed(gate, bytes(FRAME_BYTES * 3) + tone(1))

    assert kinds(happened) == [("start", "")]
