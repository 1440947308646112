"""What a (re)connecting socket is sent of the conversation: the stored turns
after its `resume_from`, replayed once after `hello`, then the live events,
each stored turn (by seq) exactly once. Live events that arrive before the
replay is sent wait for it (at most WS_HELD_EVENTS_MAX of them)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from django.conf import settings


class ResumeGate:
    def __init__(self, *, send: Callable[[dict], Awaitable[None]]) -> None:
        self.send = send
        self.greeted = False
        self.held: list[dict] = []
        self.sent_seqs: set[int] = set()
        self.last_seq = 0  # the newest stored turn this socket knows of (a resync's start)

    async def open(self, replayed: list[dict]) -> None:
        """Send the replay, then what was held while it was read."""
        for message in replayed:
            await self._send_once(message)
        self.greeted = True
        held, self.held = self.held, []
        for message in held:
            await self._send_once(message)

    async def forward(self, message: dict) -> None:
        if not self.greeted:
            if len(self.held) < settings.WS_HELD_EVENTS_MAX:
                self.held.append(message)
            return
        await self._send_once(message)

    async def _send_once(self, message: dict) -> None:
        seq = message.get("seq")
        if seq is not None:
            if seq in self.sent_seqs:
                return
            self.sent_seqs.add(seq)
            self.last_seq = max(self.last_seq, seq)
        await self.send(message)
