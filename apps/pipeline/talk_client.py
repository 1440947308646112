"""A real WebSocket client for the conversation socket (docs/protocol.md):
it streams PCM at real-time pace and records every event with the time it
arrived. Used by `manage.py talk`, the end-to-end tests, the benchmarks and
the load tests. Built on websocket-client, which is gevent-friendly (Locust)."""

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit

import websocket

FRAME_BYTES = 3200  # 100 ms of PCM16 16 kHz mono
T = TypeVar("T")


@dataclass
class Received:
    t: float  # seconds since the client connected
    event: dict  # a JSON event, or {"type": "binary", "bytes": n}


@dataclass
class TalkClient:
    url: str
    session_cookie: str = ""
    origin: str = ""
    on_event: Callable[[Received], None] | None = None
    received: list[Received] = field(default_factory=list)
    closed: threading.Event = field(default_factory=threading.Event)
    close_code: int | None = None
    keep_audio: bool = True  # False: binary events hold only their size (long load tests)
    request_id: str = ""  # sent as X-Request-ID: the server logs the socket's work under it

    def connect(self, *, resume_from: int = 0, timeout: float = 10, hello: bool = True) -> dict:
        parts = urlsplit(self.url)
        origin = self.origin or f"{'https' if parts.scheme == 'wss' else 'http'}://{parts.netloc}"
        headers = [f"Cookie: sessionid={self.session_cookie}"] if self.session_cookie else []
        if self.request_id:
            headers.append(f"X-Request-ID: {self.request_id}")
        self._t0 = time.monotonic()
        self._changed = threading.Condition()
        self.ws = websocket.create_connection(
            self.url, header=headers, origin=origin, timeout=timeout
        )
        self.ws.settimeout(None)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not hello:
            return {}
        self.send_json({"type": "hello", "protocol": 1, "resume_from": resume_from})
        ready = self.wait_for(lambda e: e["type"] in ("ready", "error"), timeout=timeout).event
        if ready["type"] == "ready" and ready["last_seq"] > resume_from:  # replay follows
            self.wait_for(lambda e: e.get("seq") == ready["last_seq"], timeout=timeout)
        return ready

    def _read(self) -> None:
        while True:
            try:
                opcode, data = self.ws.recv_data()
            except Exception:  # noqa: BLE001 — any failure ends the socket
                break
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                if len(data) >= 2:
                    self.close_code = int.from_bytes(data[:2], "big")
                break
            if opcode == websocket.ABNF.OPCODE_TEXT:
                event = json.loads(data)
            else:
                event = {"type": "binary", "bytes": len(data)}
                if self.keep_audio:
                    event["data"] = data
            self._record(event)
        self.closed.set()
        with self._changed:
            self._changed.notify_all()

    def _record(self, event: dict) -> None:
        item = Received(time.monotonic() - self._t0, event)
        with self._changed:
            self.received.append(item)
            self._changed.notify_all()
        if self.on_event:
            self.on_event(item)

    def now(self) -> float:
        return time.monotonic() - self._t0

    def send_json(self, message: dict) -> None:
        self.ws.send(json.dumps(message))

    def send_bytes(self, data: bytes) -> None:
        self.ws.send_binary(data)

    def stream(self, pcm: bytes, *, pace: float = 1.0, frame_bytes: int = FRAME_BYTES) -> float:
        """Send PCM16 16 kHz mono in 100 ms frames at `pace` × real time;
        returns when the last frame was sent (client clock)."""
        start = time.monotonic()
        frame_s = frame_bytes / 32_000
        for n, offset in enumerate(range(0, len(pcm), frame_bytes)):
            delay = start + n * frame_s / pace - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.send_bytes(pcm[offset : offset + frame_bytes])
        return self.now()

    def wait_for(self, predicate, *, timeout: float = 30, after: int = 0) -> Received:
        """The first event (from index `after`) that matches, waiting for it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for item in self.received[after:]:
                    if predicate(item.event):
                        return item
                left = deadline - time.monotonic()
                if left <= 0 or self.closed.is_set():
                    types = [r.event["type"] for r in self.received[after:]][-15:]
                    raise TimeoutError(f"no matching event within {timeout}s; last: {types}")
                self._changed.wait(left)

    def wait_until(self, check: Callable[[list[Received]], T | None], *, timeout: float = 30) -> T:
        """The first non-None result of `check(received)`, re-evaluated as events
        arrive; TimeoutError after `timeout` seconds or when the socket closes."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                result = check(self.received)
                if result is not None:
                    return result
                left = deadline - time.monotonic()
                if left <= 0 or self.closed.is_set():
                    types = [r.event["type"] for r in self.received][-15:]
                    why = f"closed ({self.close_code})" if self.closed.is_set() else "timed out"
                    raise TimeoutError(f"{why} after {timeout}s; last: {types}")
                self._changed.wait(left)

    def wait_quiet(self, *, quiet: float = 1.5, timeout: float = 30) -> None:
        """Until nothing has arrived for `quiet` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            last = self.received[-1].t if self.received else 0
            if self.now() - last >= quiet:
                return
            time.sleep(0.05)

    def events(self, type_: str | None = None) -> list[dict]:
        return [r.event for r in self.received if type_ is None or r.event["type"] == type_]

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.closed.wait(2)


def turn_after_speech(client: TalkClient, *, after: int, timeout: float = 60) -> dict:
    """Wait for one spoken turn to settle: its final transcript and reply
    (with all its audio), or an empty transcript. Returns a summary."""
    end = client.wait_for(lambda e: e["type"] in ("speech.end",), timeout=timeout, after=after)
    outcome = client.wait_for(
        lambda e: e["type"] in ("transcript.final", "transcript.empty") and not e.get("replayed"),
        timeout=timeout,
        after=after,
    )
    summary = {"speech_end_t": end.t, "final_t": outcome.t, "final": outcome.event}
    if outcome.event["type"] == "transcript.empty":
        return summary
    done = client.wait_for(lambda e: e["type"] == "reply.done", timeout=timeout, after=after)
    summary["reply"] = done.event
    first_delta = client.wait_for(lambda e: e["type"] == "reply.delta", timeout=1, after=after)
    summary["first_token_t"] = first_delta.t
    client.wait_quiet(quiet=1.5, timeout=timeout)
    audio_starts = [r for r in client.received[after:] if r.event["type"] == "reply.audio.start"]
    summary["first_audio_t"] = audio_starts[0].t if audio_starts else None
    summary["audio_bytes"] = sum(r.event["bytes"] for r in audio_starts)
    summary["audio_received"] = sum(
        r.event["bytes"] for r in client.received[after:] if r.event["type"] == "binary"
    )
    summary["sample_rate"] = audio_starts[0].event["sample_rate"] if audio_starts else None
    return summary


# --- Turns timed on the client's clock (the load tests) ---------------------------------


@dataclass
class ReplyTimes:
    """One reply as a socket saw it; times in seconds on the client's clock."""

    reply_id: str
    first_token_t: float | None = None
    first_audio_t: float | None = None
    done_t: float | None = None  # reply.done, or reply.interrupted
    complete_t: float | None = None  # reply.done and every part of its audio, bytes included
    status: str = ""  # "complete", "failed", "interrupted"
    audio_cut: bool = False  # this socket spoke again before the audio was all sent


def reply_times(received: list[Received], reply_id: str) -> ReplyTimes:
    """What `received` holds of one reply: its first token, first audio, end and
    when its audio was complete (all `audio_parts` parts' last pieces and every
    byte each `reply.audio.start` announced), or was cut: a `speech.start` after
    the reply's end stops the rest of its audio without an event (protocol §9)."""
    times = ReplyTimes(reply_id)
    parts = lasts = owed = 0
    mine = False  # whether the binary frames now arriving follow one of its starts
    for item in received:
        event = item.event
        kind = event["type"]
        if kind == "binary":
            if mine:
                owed -= event["bytes"]
        elif kind == "reply.audio.start":
            mine = event["reply_id"] == reply_id
            if mine:
                times.first_audio_t = times.first_audio_t or item.t
                owed += event["bytes"]
                lasts += bool(event.get("last", True))
        elif kind == "speech.start":
            if times.done_t is not None and times.complete_t is None:
                times.complete_t, times.audio_cut = item.t, True
            continue
        elif event.get("reply_id") != reply_id:
            continue
        elif kind == "reply.delta" and times.first_token_t is None:
            times.first_token_t = item.t
        elif kind in ("reply.done", "reply.interrupted") and times.done_t is None:
            times.done_t = item.t
            times.status = event.get("status") or kind.removeprefix("reply.")
            parts = event.get("audio_parts") or 0
        if (
            times.done_t is not None
            and times.complete_t is None
            and (times.status == "interrupted" or (lasts >= parts and owed <= 0))
        ):
            times.complete_t = item.t
    return times


@dataclass
class SpokenTurn:
    """One utterance and its reply; times in seconds on the client's clock."""

    utterance_id: str
    speech_end_t: float
    final_t: float
    text: str  # "" for transcript.empty
    reply: ReplyTimes | None  # None for an empty transcript


def _reply_after(received: list[Received], after: int) -> str | None:
    """The id of the first reply that shows up from index `after`."""
    for item in received[after:]:
        if item.event["type"] in ("reply.delta", "reply.done", "reply.interrupted"):
            return item.event["reply_id"]
    return None


def spoken_turns(received: list[Received], after: int) -> list[SpokenTurn] | None:
    """The utterances that started from index `after`, once every one has ended,
    been transcribed, and had its reply complete (or interrupted); else None."""
    starts = ends = 0
    turns = []
    for index, item in enumerate(received[after:], start=after):
        kind = item.event["type"]
        starts += kind == "speech.start"
        if kind != "speech.end":
            continue
        ends += 1
        uid = item.event["utterance_id"]
        outcome = next(
            (
                (n, r)
                for n, r in enumerate(received[index:], start=index)
                if r.event["type"] in ("transcript.final", "transcript.empty")
                and r.event.get("utterance_id") == uid
            ),
            None,
        )
        if outcome is None:
            return None
        at, final = outcome
        if final.event["type"] == "transcript.empty":
            turns.append(SpokenTurn(uid, item.t, final.t, "", None))
            continue
        reply_id = _reply_after(received, at)
        reply = reply_times(received[at:], reply_id) if reply_id else None
        if reply is None or reply.complete_t is None:
            return None
        turns.append(SpokenTurn(uid, item.t, final.t, final.event["text"], reply))
    return turns if starts == ends else None


@dataclass
class TextTurn:
    sent_t: float
    final_t: float
    reply: ReplyTimes


def text_turn(client: TalkClient, text: str, *, timeout: float = 60) -> TextTurn:
    """Send a typed turn and wait for its reply to end, audio included."""
    after = len(client.received)
    sent = client.now()
    client.send_json({"type": "text", "text": text})

    def settled(received: list[Received]) -> TextTurn | None:
        final = next(
            (
                (n, r)
                for n, r in enumerate(received[after:], start=after)
                if r.event["type"] == "transcript.final" and r.event.get("source") == "text"
            ),
            None,
        )
        reply_id = final and _reply_after(received, final[0])
        if not final or not reply_id:
            return None
        reply = reply_times(received[final[0] :], reply_id)
        return TextTurn(sent, final[1].t, reply) if reply.complete_t is not None else None

    return client.wait_until(settled, timeout=timeout)
