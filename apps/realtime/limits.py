"""What one socket may send, and for how long (docs/protocol.md, section 12):
token buckets for audio frames (counted as messages, whatever their size),
audio milliseconds, text messages and `hello`; a bucket of strikes that closes
a socket which keeps flooding; the message-size cap; and the hello, idle and
session timers. Pure: every method takes `now`, the event loop's monotonic
clock (`loop.time()`), and refuses by raising ProtocolError; no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field

from django.conf import settings

from .protocol import ProtocolError

CLOSE_TOO_BIG = 1009  # RFC 6455: Message Too Big (Daphne closes with it too)
CLOSE_TIMEOUT = 4408  # no hello in time, idle too long, or the session's maximum length
CLOSE_FLOOD = 4429  # kept sending past the rate limits


@dataclass
class TokenBucket:
    """`burst` tokens at most, refilled at `rate` a second. It starts full."""

    rate: float
    burst: float
    tokens: float = field(default=-1.0, repr=False)
    last: float = field(default=0.0, repr=False)

    def take(self, now: float, amount: float = 1.0) -> bool:
        if self.tokens < 0:
            self.tokens, self.last = self.burst, now
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.last) * self.rate)
        self.last = now
        if amount > self.tokens:
            return False  # a refusal costs nothing
        self.tokens -= amount
        return True


@dataclass
class AudioRateLimiter:
    """Milliseconds of audio: a client may send a little faster than real time
    (`factor`), with a burst (a network stall caught up), but not flood."""

    factor: float
    burst_ms: float
    bucket: TokenBucket = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.bucket = TokenBucket(rate=self.factor * 1000, burst=self.burst_ms)

    def allow(self, audio_ms: float, now: float) -> bool:
        return self.bucket.take(now, audio_ms)


@dataclass(frozen=True)
class Limits:
    message_max_bytes: int
    frames_per_s: float
    frames_burst: int
    audio_factor: float
    audio_burst_ms: float
    control_per_s: float
    control_burst: int
    hello_every_s: float
    flood_drops: int
    flood_forgive_per_s: float
    hello_timeout_s: float
    idle_timeout_s: float
    session_max_s: float

    @classmethod
    def from_settings(cls) -> Limits:
        return cls(
            message_max_bytes=settings.WS_MESSAGE_MAX_BYTES,
            frames_per_s=settings.WS_AUDIO_FRAMES_PER_S,
            frames_burst=settings.WS_AUDIO_FRAMES_BURST,
            audio_factor=settings.AUDIO_RATE_FACTOR,
            audio_burst_ms=settings.AUDIO_RATE_BURST_S * 1000,
            control_per_s=settings.WS_CONTROL_PER_S,
            control_burst=settings.WS_CONTROL_BURST,
            hello_every_s=settings.WS_HELLO_EVERY_S,
            flood_drops=settings.WS_FLOOD_CLOSE_DROPS,
            flood_forgive_per_s=settings.WS_FLOOD_FORGIVE_PER_S,
            hello_timeout_s=settings.WS_HELLO_TIMEOUT_S,
            idle_timeout_s=settings.WS_IDLE_TIMEOUT_S,
            session_max_s=settings.WS_SESSION_MAX_S,
        )


class SocketLimits:
    """One socket's buckets and timers."""

    def __init__(self, limits: Limits, *, now: float) -> None:
        self.limits = limits
        self.opened_at = self.last_seen = now
        self.frames = TokenBucket(rate=limits.frames_per_s, burst=limits.frames_burst)
        self.audio_ms = AudioRateLimiter(factor=limits.audio_factor, burst_ms=limits.audio_burst_ms)
        self.control = TokenBucket(rate=limits.control_per_s, burst=limits.control_burst)
        self.hellos = TokenBucket(rate=1 / limits.hello_every_s, burst=1)
        self.strikes = TokenBucket(rate=limits.flood_forgive_per_s, burst=limits.flood_drops)
        self.dropped = 0  # messages dropped by the rate limits

    # --- per message (the consumer calls one of these first) ---------------------------

    def binary(self, size: int, now: float) -> None:
        """A binary frame arrived: counted as one message, whatever its size."""
        self._message(size, now)
        if not self.frames.take(now):
            self._drop(
                "too_many_frames",
                f"More than {self.limits.frames_per_s:g} audio frames a second; "
                "frames were dropped. Send 100 ms frames.",
                now,
            )

    def text(self, size: int, now: float) -> None:
        """A text frame arrived (any type, valid or not)."""
        self._message(size, now)
        if not self.control.take(now):
            self._drop(
                "too_many_messages",
                f"More than {self.limits.control_per_s:g} text messages a second; "
                "messages were dropped.",
                now,
            )

    def hello(self, now: float) -> None:
        if not self.hellos.take(now):
            self._drop(
                "hello_too_often",
                f"At most one hello every {self.limits.hello_every_s:g} s; this one was dropped.",
                now,
            )

    def audio(self, audio_ms: float, now: float) -> None:
        """A valid frame's audio, in milliseconds."""
        if not self.audio_ms.allow(audio_ms, now):
            self._drop(
                "rate_limited", "Audio is arriving faster than real time; frames were dropped.", now
            )

    # --- timers ------------------------------------------------------------------------

    def expired(self, *, greeted: bool, now: float) -> ProtocolError | None:
        """The timer that ran out (its refusal closes the socket), or None."""
        limits = self.limits
        if not greeted and now - self.opened_at >= limits.hello_timeout_s:
            return ProtocolError(
                "hello_timeout",
                f"No hello within {limits.hello_timeout_s:g} s of connecting.",
                close_code=CLOSE_TIMEOUT,
            )
        if now - self.last_seen >= limits.idle_timeout_s:
            return ProtocolError(
                "idle_timeout",
                f"Nothing was sent for {limits.idle_timeout_s:g} s; reconnect to go on.",
                close_code=CLOSE_TIMEOUT,
            )
        if now - self.opened_at >= limits.session_max_s:
            return ProtocolError(
                "session_too_long",
                f"A socket lasts at most {limits.session_max_s:g} s; reconnect to go on.",
                close_code=CLOSE_TIMEOUT,
            )
        return None

    def next_check(self, *, greeted: bool, now: float) -> float:
        """Seconds until a timer may run out (at least 0.05 s)."""
        limits = self.limits
        due = [
            self.last_seen + limits.idle_timeout_s,
            self.opened_at + limits.session_max_s,
        ]
        if not greeted:
            due.append(self.opened_at + limits.hello_timeout_s)
        return max(0.05, min(due) - now)

    # --- inside --------------------------------------------------------------------------

    def _message(self, size: int, now: float) -> None:
        self.last_seen = now
        if size > self.limits.message_max_bytes:
            raise ProtocolError(
                "message_too_large",
                f"Messages are limited to {self.limits.message_max_bytes} bytes.",
                close_code=CLOSE_TOO_BIG,
            )

    def _drop(self, code: str, message: str, now: float) -> None:
        self.dropped += 1
        if not self.strikes.take(now):
            raise ProtocolError(
                "flood",
                f"Too many messages over the rate limits ({self.dropped} dropped); "
                "reconnect later, and slower.",
                close_code=CLOSE_FLOOD,
            )
        raise ProtocolError(code, message)
