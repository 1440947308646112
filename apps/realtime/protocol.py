"""Parsing and validation of what clients send (docs/protocol.md). Pure
functions: every refusal is a (code, message) pair the socket answers with."""

import json
import math

from django.conf import settings

from .events import PROTOCOL_VERSION

CLIENT_TYPES = {"hello", "audio.end", "text", "interrupt", "ping"}
JSON_MAX_DEPTH = 16  # arrays and objects inside each other; clients need 2
SEQ_MAX = 2**31 - 1  # the largest seq a turn can have (a PositiveIntegerField)


class ProtocolError(Exception):
    """A refusal: the client gets `error` `code`, and with a `close_code` the
    socket is closed after it (the error then says `fatal: true`)."""

    def __init__(self, code: str, message: str, *, close_code: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.close_code = close_code


def _finite(number: str) -> float:
    value = float(number)
    if not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


def _depth_over(value: object, limit: int) -> bool:
    """Whether arrays and objects nest deeper than `limit` (no recursion)."""
    level = [value]
    for _ in range(limit):
        level = [
            child
            for item in level
            if isinstance(item, (dict, list))
            for child in (item.values() if isinstance(item, dict) else item)
        ]
        if not any(isinstance(item, (dict, list)) for item in level):
            return False
    return True


def parse_control(text: str) -> dict:
    """A JSON control message, checked for size, shape and known type."""
    if len(text.encode()) > settings.WS_TEXT_MAX_BYTES:
        raise ProtocolError(
            "message_too_large",
            f"Control messages are limited to {settings.WS_TEXT_MAX_BYTES} bytes.",
        )
    try:  # NaN, Infinity and 1e999 are not JSON numbers; a 5000-digit integer is refused
        message = json.loads(text, parse_float=_finite, parse_constant=_finite)
    except (ValueError, RecursionError):
        raise ProtocolError("bad_json", "That message is not valid JSON.") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError("bad_message", 'A control message is a JSON object with a "type".')
    if (text.count("[") + text.count("{") > JSON_MAX_DEPTH) and _depth_over(
        message, JSON_MAX_DEPTH
    ):
        raise ProtocolError(
            "bad_message", f"Arrays and objects may nest at most {JSON_MAX_DEPTH} deep."
        )
    if message["type"] not in CLIENT_TYPES:
        raise ProtocolError(
            "unknown_type",
            f"Unknown message type {message['type'][:40]!r}; "
            f"expected one of {', '.join(sorted(CLIENT_TYPES))}.",
        )
    return message


def parse_hello(message: dict) -> int:
    """The seq to resume after (0: from the start)."""
    if message.get("protocol", PROTOCOL_VERSION) != PROTOCOL_VERSION:
        raise ProtocolError(
            "unsupported_protocol", f"This server speaks protocol {PROTOCOL_VERSION}."
        )
    resume_from = message.get("resume_from", 0)
    if resume_from is None:
        resume_from = 0
    if (
        not isinstance(resume_from, int)
        or isinstance(resume_from, bool)
        or not 0 <= resume_from <= SEQ_MAX
    ):
        raise ProtocolError("bad_message", f"resume_from must be a whole number 0 … {SEQ_MAX}.")
    return resume_from


def parse_text(message: dict) -> str:
    text = message.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ProtocolError("bad_message", 'A "text" message needs non-empty "text".')
    if len(text) > settings.TEXT_MESSAGE_MAX_CHARS:
        raise ProtocolError(
            "text_too_long",
            f"Messages are limited to {settings.TEXT_MESSAGE_MAX_CHARS} characters.",
        )
    if "\x00" in text or _has_surrogates(text):
        raise ProtocolError(
            "bad_message", "Text may not hold NUL characters or unpaired surrogates."
        )
    return text.strip()


def _has_surrogates(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    return False


def check_audio_frame(data: bytes) -> None:
    if not data or len(data) % 2:
        raise ProtocolError(
            "bad_audio_frame",
            "Audio frames are raw PCM16 LE mono at 16 kHz: an even, non-zero number of bytes.",
        )
    if len(data) > settings.AUDIO_FRAME_MAX_BYTES:
        raise ProtocolError(
            "audio_frame_too_large",
            f"Audio frames carry at most {settings.AUDIO_FRAME_MAX_MS} ms "
            f"({settings.AUDIO_FRAME_MAX_BYTES} bytes); "
            f"this one had {len(data)}.",
        )
    if data[:4] in (b"RIFF", b"OggS", b"fLaC", b"\x1aE\xdf\xa3") or data[:3] == b"ID3":
        raise ProtocolError(
            "wrong_audio_format",
            "Send raw PCM16 LE mono 16 kHz samples, not a container (WAV, Ogg, FLAC, MP3, WebM).",
        )
