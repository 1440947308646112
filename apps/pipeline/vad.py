"""Cheap endpointing on the event loop: an energy gate over 20 ms subframes
with an adaptive noise floor. It costs microseconds a frame. It only decides
when an utterance starts and ends; the STT worker's Silero VAD then decides
whether the utterance holds any speech at all (noise makes no transcript)."""

from collections import deque
from dataclasses import dataclass, field

import numpy as np

SAMPLE_RATE = 16_000
BYTES_PER_MS = SAMPLE_RATE * 2 // 1000  # 32
SUBFRAME_MS = 20
SUBFRAME_SAMPLES = SAMPLE_RATE * SUBFRAME_MS // 1000


@dataclass
class EndpointEvent:
    # "start" (with preroll audio) | "pause" (silence reached pause_ms: the end
    # may be near) | "end" (reason: "silence", "max_length" or "client")
    kind: str
    audio: bytes = b""
    reason: str = ""


@dataclass
class Endpointer:
    end_silence_ms: int = 500
    pause_ms: int = 200
    min_speech_ms: int = 200
    max_utterance_ms: int = 20_000
    preroll_ms: int = 300
    margin_db: float = 12.0
    min_level_db: float = -50.0

    in_speech: bool = False
    utterance_ms: int = 0
    _floor_db: float = -70.0
    _voiced_ms: int = 0
    _silence_ms: int = 0
    _carry: bytes = b""
    _preroll: deque = field(default_factory=deque)
    _preroll_bytes: int = 0

    def feed(self, frame: bytes) -> list[EndpointEvent]:
        """Take one frame of PCM16 mono 16 kHz; return what happened."""
        events: list[EndpointEvent] = []
        data = self._carry + frame
        usable = len(data) - len(data) % (SUBFRAME_SAMPLES * 2)
        self._carry = data[usable:]
        if usable:
            samples = np.frombuffer(data[:usable], dtype="<i2").astype(np.float32)
            power = np.mean(np.square(samples.reshape(-1, SUBFRAME_SAMPLES)), axis=1)
            levels = 10 * np.log10(power / (32768.0**2) + 1e-12)
            for level in levels.tolist():
                self._step(level, events)
        if not self.in_speech:
            self._remember(frame)
        return events

    def _step(self, level_db: float, events: list[EndpointEvent]) -> None:
        voiced = level_db > max(self._floor_db + self.margin_db, self.min_level_db)
        # The floor follows quiet quickly and loud slowly (≈ 3 dB a second).
        if level_db < self._floor_db:
            self._floor_db = 0.7 * self._floor_db + 0.3 * level_db
        elif not voiced:
            self._floor_db += 0.06
        if not self.in_speech:
            self._voiced_ms = (
                self._voiced_ms + SUBFRAME_MS if voiced else max(0, self._voiced_ms - SUBFRAME_MS)
            )
            if self._voiced_ms >= self.min_speech_ms:
                self.in_speech = True
                self.utterance_ms = 0
                self._silence_ms = 0
                events.append(EndpointEvent("start", audio=b"".join(self._preroll)))
                self._preroll.clear()
                self._preroll_bytes = 0
            return
        self.utterance_ms += SUBFRAME_MS
        before = self._silence_ms
        self._silence_ms = 0 if voiced else self._silence_ms + SUBFRAME_MS
        if before < self.pause_ms <= self._silence_ms:
            events.append(EndpointEvent("pause"))
        if self._silence_ms >= self.end_silence_ms:
            self._end("silence", events)
        elif self.utterance_ms >= self.max_utterance_ms:
            self._end("max_length", events)

    def _end(self, reason: str, events: list[EndpointEvent]) -> None:
        self.in_speech = False
        self._voiced_ms = 0
        events.append(EndpointEvent("end", reason=reason))

    def force_end(self) -> list[EndpointEvent]:
        """The client said audio.end: close the utterance if one is open."""
        if not self.in_speech:
            return []
        events: list[EndpointEvent] = []
        self._end("client", events)
        return events

    def _remember(self, frame: bytes) -> None:
        self._preroll.append(frame)
        self._preroll_bytes += len(frame)
        limit = self.preroll_ms * BYTES_PER_MS
        while self._preroll_bytes - len(self._preroll[0]) >= limit:
            self._preroll_bytes -= len(self._preroll.popleft())
