"""Reply audio out to one socket: each part once and in order (TTS may finish
them out of order), and within a part each piece (`chunk` 0, 1, ..., the
last one marked `last`) as soon as it comes, fetched by key from the audio
store (one copy of the audio, whatever the number of sockets), and none of a
stopped reply. A reply whose audio began before this socket said `hello` is
text only here."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from .events import event

AUDIO_CHUNK_BYTES = 32_768


class AudioSequencer:
    def __init__(
        self,
        *,
        send_event: Callable[[dict], Awaitable[None]],
        send_bytes: Callable[[bytes], Awaitable[None]],
        fetch: Callable[[str], Awaitable[bytes | None]],
        timing: Callable[[str], dict],
    ) -> None:
        self.send_event = send_event
        self.send_bytes = send_bytes
        self.fetch = fetch
        self.timing = timing  # extra fields for a reply's first audio (its latency)
        self.sent: dict[str, int] = {}  # reply id -> parts sent whole
        self.chunks: dict[str, int] = {}  # reply id -> pieces sent of its next part
        self.waiting: dict[str, dict[tuple[int, int], dict]] = {}
        self.dropped: set[str] = set()

    async def push(self, message: dict, *, greeted: bool) -> None:
        reply_id = message["reply_id"]
        if not greeted and reply_id not in self.sent:
            self.dropped.add(reply_id)  # began before this socket: text only
        if reply_id in self.dropped:
            return
        place = (message["index"], message.get("chunk", 0))
        if place < (self.sent.get(reply_id, 0), self.chunks.get(reply_id, 0)):
            return  # redelivered: sent already
        waiting = self.waiting.setdefault(reply_id, {})
        waiting[place] = message
        self.sent.setdefault(reply_id, 0)
        while (self.sent[reply_id], self.chunks.get(reply_id, 0)) in waiting:
            piece = waiting.pop((self.sent[reply_id], self.chunks.get(reply_id, 0)))
            await self._send(piece)
            if piece.get("last", True):  # a worker older than pieces sends whole parts
                self.sent[reply_id] += 1
                self.chunks.pop(reply_id, None)
            else:
                self.chunks[reply_id] = self.chunks.get(reply_id, 0) + 1
            if reply_id in self.dropped:  # stopped while fetching
                return
        if not waiting:
            self.waiting.pop(reply_id, None)

    def known(self, reply_id: str) -> None:
        """A reply this socket sees streaming: its audio is to come (or be dropped)."""
        self.sent.setdefault(reply_id, 0)

    def pending(self, reply_id: str, parts: int) -> bool:
        """Whether some of the reply's `parts` parts are not sent whole yet."""
        return self.sent.get(reply_id, 0) < parts

    def drop_all(self) -> None:
        """A stop: no more audio of any reply this socket knows of."""
        self.dropped.update(self.sent, self.waiting)
        self.waiting.clear()

    async def _send(self, message: dict) -> None:
        pcm = b""
        if message["bytes"]:
            pcm = await self.fetch(message["audio_key"]) or b""
        first = message["index"] == 0 and message.get("chunk", 0) == 0
        extra = self.timing(message["reply_id"]) if first else {}
        await self.send_event(
            event(
                "reply.audio.start",
                reply_id=message["reply_id"],
                index=message["index"],
                sample_rate=message["sample_rate"],
                format="pcm_s16le",
                bytes=len(pcm),
                engine=message.get("engine", ""),
                chunk=message.get("chunk", 0),
                last=message.get("last", True),
                **extra,
            )
        )
        for offset in range(0, len(pcm), AUDIO_CHUNK_BYTES):
            await self.send_bytes(pcm[offset : offset + AUDIO_CHUNK_BYTES])
