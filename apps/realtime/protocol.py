"""Parsing and validation of what clients send (docs/protocol.md). Pure
functions: every refusal is a (code, message) pair the socket answers with."""

import json
import time
from dataclasses import dataclass

from django.conf import settings

from .events import PROTOCOL_VERSION

CLIENT_TYPES = {"hello", "audio.end", "text", "interrupt", "ping"}


class ProtocolError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def parse_control(text: str) -> dict:
    """A JSON control message, checked for size, shape and known type."""
    if len(text.encode()) > settings.WS_TEXT_MAX_BYTES:
        raise ProtocolError(
            "message_too_large",
            f"Control messages are limited to {settings.WS_TEXT_MAX_BYTES} bytes.",
        )
    try:
        message = json.loads(text)
    except ValueError:
        raise ProtocolError("bad_json", "That message is not valid JSON.") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError("bad_message", 'A control message is a JSON object with a "type".')
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
    if not isinstance(resume_from, int) or isinstance(resume_from, bool) or resume_from < 0:
        raise ProtocolError("bad_message", "resume_from must be a whole number ≥ 0.")
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
    return text.strip()


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


@dataclass
class AudioRateLimiter:
    """A token bucket over milliseconds of audio: a client may send audio a
    little faster than real time, with a burst, but not flood the server."""

    factor: float
    burst_ms: float
    _allowance: float = -1.0
    _last: float = 0.0

    def allow(self, audio_ms: float, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if self._allowance < 0:
            self._allowance, self._last = self.burst_ms, now
        self._allowance = min(
            self.burst_ms, self._allowance + (now - self._last) * 1000 * self.factor
        )
        self._last = now
        if audio_ms > self._allowance:
            return False
        self._allowance -= audio_ms
        return True
