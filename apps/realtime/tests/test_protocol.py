import json
import struct

import pytest
from django.conf import settings

from apps.realtime.limits import AudioRateLimiter
from apps.realtime.protocol import (
    CLIENT_TYPES,
    ProtocolError,
    check_audio_frame,
    parse_control,
    parse_hello,
    parse_text,
)


def refused(call, *args) -> str:
    with pytest.raises(ProtocolError) as caught:
        call(*args)
    assert caught.value.message  # every refusal says why, for people
    return caught.value.code


# --- parse_control --------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(CLIENT_TYPES))
def test_parse_control_accepts_every_client_type(kind):
    assert parse_control(json.dumps({"type": kind, "extra": 1})) == {"type": kind, "extra": 1}


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("{not json", "bad_json"),
        ("", "bad_json"),
        ("[1, 2]", "bad_message"),
        ('"hello"', "bad_message"),
        ("null", "bad_message"),
        ("{}", "bad_message"),
        ('{"type": 5}', "bad_message"),
        ('{"type": null}', "bad_message"),
        ('{"type": "shout"}', "unknown_type"),
        ('{"type": "Hello"}', "unknown_type"),
    ],
)
def test_parse_control_refusals(text, code):
    assert refused(parse_control, text) == code


def test_parse_control_limits_the_encoded_size_not_the_characters():
    room = settings.WS_TEXT_MAX_BYTES - len('{"type": "text", "text": ""}')
    fits = json.dumps({"type": "text", "text": "a" * room})
    # "é" is one character but two bytes in UTF-8 (ensure_ascii=False keeps it raw)
    too_big = json.dumps({"type": "text", "text": "é" * (room // 2 + 1)}, ensure_ascii=False)

    assert len(fits.encode()) == settings.WS_TEXT_MAX_BYTES
    assert parse_control(fits)["type"] == "text"
    assert len(too_big) < settings.WS_TEXT_MAX_BYTES < len(too_big.encode())
    assert refused(parse_control, too_big) == "message_too_large"


def test_parse_control_checks_size_before_json():
    assert refused(parse_control, "x" * (settings.WS_TEXT_MAX_BYTES + 1)) == "message_too_large"


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("[" * 5000 + "]" * 5000, "bad_json"),  # deeper than the parser goes: no RecursionError
        ('{"type": "ping", "t": ' + "[" * 17 + "]" * 17 + "}", "bad_message"),  # > 16 deep
        ('{"type": "ping", "t": ' + "9" * 5000 + "}", "bad_json"),  # past int's 4300 digits
        ('{"type": "ping", "t": 1e999}', "bad_json"),  # not a finite number
        ('{"type": "ping", "t": NaN}', "bad_json"),
        ('{"type": "ping", "t": -Infinity}', "bad_json"),
        ('{"type": "ping"}\x00', "bad_json"),
        (r'{"type": "\u0000"}', "unknown_type"),  # a JSON escape: NUL in a string
        ('{"type": "' + chr(0) + '"}', "bad_json"),  # a raw control character
    ],
)
def test_parse_control_refuses_hostile_json(text, code):
    assert refused(parse_control, text) == code


def test_parse_control_takes_shallow_wide_json():
    wide = json.dumps({"type": "ping", "t": [[i] for i in range(2000)]})
    assert parse_control(wide)["t"][1999] == [1999]
    assert parse_control(json.dumps({"type": "ping", "t": 1.5e300}))["t"] == 1.5e300


def test_unknown_type_message_does_not_echo_a_huge_type():
    with pytest.raises(ProtocolError) as caught:
        parse_control(json.dumps({"type": "z" * 5000}))

    assert len(caught.value.message) < 200


# --- parse_hello ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "resume_from"),
    [
        ({"type": "hello"}, 0),
        ({"type": "hello", "protocol": 1}, 0),
        ({"type": "hello", "resume_from": None}, 0),
        ({"type": "hello", "resume_from": 0}, 0),
        ({"type": "hello", "protocol": 1, "resume_from": 42}, 42),
    ],
)
def test_parse_hello_gives_the_seq_to_resume_after(message, resume_from):
    assert parse_hello(message) == resume_from


@pytest.mark.parametrize("protocol", [0, 2, "1", None])
def test_parse_hello_refuses_other_protocols(protocol):
    assert refused(parse_hello, {"type": "hello", "protocol": protocol}) == "unsupported_protocol"


@pytest.mark.parametrize(
    "resume_from", [-1, 1.5, 2.0, True, False, "3", [1], {"seq": 1}, 2**31, 10**400]
)
def test_parse_hello_refuses_a_bad_resume_from(resume_from):
    assert refused(parse_hello, {"type": "hello", "resume_from": resume_from}) == "bad_message"


# --- parse_text ----------------------------------------------------------------------


def test_parse_text_trims():
    assert parse_text({"type": "text", "text": "  hi there \n"}) == "hi there"


@pytest.mark.parametrize(
    "message",
    [
        {"type": "text"},
        {"type": "text", "text": ""},
        {"type": "text", "text": " \n\t "},
        {"type": "text", "text": 42},
        {"type": "text", "text": None},
        {"type": "text", "text": ["a"]},
    ],
)
def test_parse_text_needs_non_empty_text(message):
    assert refused(parse_text, message) == "bad_message"


@pytest.mark.parametrize("text", ["a\x00b", "\x00", "half a pair \ud800"])
def test_parse_text_refuses_nul_and_unpaired_surrogates(text):
    # the database refuses both (Postgres: NUL in text; UTF-8: a lone surrogate)
    assert refused(parse_text, {"type": "text", "text": text}) == "bad_message"


def test_parse_text_limits_characters():
    limit = settings.TEXT_MESSAGE_MAX_CHARS

    assert parse_text({"type": "text", "text": "é" * limit}) == "é" * limit
    assert refused(parse_text, {"type": "text", "text": "a" * (limit + 1)}) == "text_too_long"


# --- check_audio_frame -----------------------------------------------------------------


def test_check_audio_frame_accepts_pcm_up_to_the_limit():
    check_audio_frame(b"\x00\x00")
    check_audio_frame(bytes(3200))  # what clients send: 100 ms
    check_audio_frame(bytes(settings.AUDIO_FRAME_MAX_BYTES))
    assert settings.AUDIO_FRAME_MAX_BYTES == settings.AUDIO_FRAME_MAX_MS * 32
    check_audio_frame(struct.pack("<4h", 1000, -1000, 32767, -32768))


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"", "bad_audio_frame"),
        (b"\x00", "bad_audio_frame"),
        (bytes(3199), "bad_audio_frame"),
        (bytes(6402), "audio_frame_too_large"),  # AUDIO_FRAME_MAX_MS = 200 by default
        (bytes(64_000), "audio_frame_too_large"),
        (b"RIFF" + bytes(40), "wrong_audio_format"),
        (b"OggS" + bytes(40), "wrong_audio_format"),
        (b"fLaC" + bytes(40), "wrong_audio_format"),
        (b"ID3\x03" + bytes(40), "wrong_audio_format"),
        (b"\x1aE\xdf\xa3" + bytes(40), "wrong_audio_format"),
    ],
)
def test_check_audio_frame_refusals(frame, code):
    assert refused(check_audio_frame, frame) == code


def test_a_whole_wav_file_is_too_large_before_it_is_the_wrong_format():
    assert refused(check_audio_frame, b"RIFF" + bytes(10_000)) == "audio_frame_too_large"


# --- AudioRateLimiter ------------------------------------------------------------------


def limiter() -> AudioRateLimiter:
    return AudioRateLimiter(
        factor=settings.AUDIO_RATE_FACTOR, burst_ms=settings.AUDIO_RATE_BURST_S * 1000
    )


def test_real_time_pace_is_allowed_indefinitely():
    rate = limiter()

    # an hour of 100 ms frames, each 100 ms after the last
    allowed = [rate.allow(100, now=1000 + n * 0.1) for n in range(36_000)]

    assert all(allowed)


def test_real_time_pace_with_network_jitter_is_allowed():
    rate = limiter()
    now = 50.0
    for _ in range(600):
        # frames arrive in bunches: nothing for 900 ms, then ten frames at once
        now += 0.9
        assert all(rate.allow(100, now=now + i * 0.01) for i in range(10))
        now += 0.1


def test_a_flood_is_refused_after_the_burst():
    rate = limiter()
    burst_frames = int(settings.AUDIO_RATE_BURST_S * 1000 / 100)

    allowed = [rate.allow(100, now=7.0) for _ in range(burst_frames + 30)]

    assert allowed == [True] * burst_frames + [False] * 30


def test_sustained_faster_than_the_factor_is_refused():
    rate = limiter()
    speedup = settings.AUDIO_RATE_FACTOR * 1.2  # faster than allowed

    allowed = [rate.allow(100, now=n * 0.1 / speedup) for n in range(2000)]

    assert not all(allowed)
    # what got through is no more than the burst plus the refill
    elapsed_ms = 2000 * 100 / speedup
    through_ms = sum(allowed) * 100
    assert (
        through_ms <= settings.AUDIO_RATE_BURST_S * 1000 + elapsed_ms * settings.AUDIO_RATE_FACTOR
    )


def test_sustained_a_little_faster_than_real_time_is_allowed():
    rate = limiter()
    speedup = settings.AUDIO_RATE_FACTOR * 0.9

    assert all(rate.allow(100, now=n * 0.1 / speedup) for n in range(5000))


def test_after_a_flood_the_bucket_refills():
    rate = limiter()
    while rate.allow(100, now=0.0):
        pass

    assert not rate.allow(100, now=0.05)  # 75 ms of allowance: not enough for 100 ms
    assert rate.allow(100, now=0.1)  # 150 ms refilled
    # a long pause refills only up to the burst
    burst_frames = int(settings.AUDIO_RATE_BURST_S * 1000 / 100)
    allowed = [rate.allow(100, now=3600.0) for _ in range(burst_frames + 1)]
    assert allowed == [True] * burst_frames + [False]


def test_refused_frames_do_not_use_up_the_allowance():
    rate = AudioRateLimiter(factor=1.0, burst_ms=200)
    assert rate.allow(200, now=0.0)

    for _ in range(100):
        assert not rate.allow(100, now=0.0)

    assert rate.allow(100, now=0.1)
