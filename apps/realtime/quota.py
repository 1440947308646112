"""One socket's share of its user's daily quotas (apps/accounts/ledger.py).

Speaking time is reserved in the ledger ahead of use, a chunk of
QUOTA_AUDIO_CHUNK_S at a time (the first when the socket opens), so a frame
costs a subtraction and no I/O.
The next chunk is asked for in the background when less than half of one is
left; when the ledger grants less than asked, the day's allowance is used up,
and the utterance ends (its audio is transcribed) as the socket's share runs
out. What the socket reserved and did not speak is given back when it closes.
Reply tokens are reserved per reply (apps/pipeline/services.py); a typed turn
first checks that some are left."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable, Coroutine

from django.conf import settings

from apps.accounts.ledger import (
    AUDIO_USED,
    TOKENS_USED,
    quota_adjust,
    quota_left,
    quota_reserve,
    today,
)

from .protocol import ProtocolError

log = logging.getLogger(__name__)
RETRY_S = 5.0


class QuotaGate:
    def __init__(
        self,
        *,
        user_id: int,
        audio_seconds_per_day: int,
        tokens_per_day: int,
        spawn: Callable[[Coroutine], asyncio.Task],
    ):
        self.user_id = user_id
        self.audio_limit_ms = audio_seconds_per_day * 1000
        self.tokens_limit = tokens_per_day
        self.spawn = spawn
        self.chunk_ms = round(settings.QUOTA_AUDIO_CHUNK_S * 1000)
        self.held_ms = 0.0  # reserved and not spoken yet (below 0: spoken ahead of a grant)
        self.held_day: dt.date | None = None
        self.exhausted = False  # the ledger granted less than asked: nothing more today
        self.answered = False  # the first reservation came back (or failed)
        self.pending: asyncio.Task | None = None  # the reservation in flight
        self.retry_at = 0.0  # time.monotonic() before which a failed ledger is not asked

    async def may_start(self) -> None:
        """Raise quota_exceeded if the user may not start an utterance now. Only the
        socket's first reservation is waited for (asked for when it opened, so it is
        usually back); later ones run ahead in the background."""
        if not self.audio_limit_ms:
            return
        if not self.answered:
            self.top_up()
            if self.pending is not None:
                await asyncio.shield(self.pending)
        if self.exhausted and self.held_ms <= 0:
            if self.held_day != today():
                self.exhausted = False  # a new day: ask again (this utterance may start)
            else:
                raise ProtocolError("quota_exceeded", AUDIO_USED)
        self.top_up()

    def spend(self, ms: float) -> bool:
        """Count `ms` of speech; False when the socket's share has run out."""
        if not self.audio_limit_ms:
            return True
        self.held_ms -= ms
        if self.held_ms < self.chunk_ms / 2:
            self.top_up()
        return not (self.exhausted and self.held_ms <= 0)

    def top_up(self) -> None:
        """Ask for the next chunk in the background, when less than half of one is held."""
        if not self.audio_limit_ms or self.pending is not None:
            return
        if self.exhausted or self.held_ms >= self.chunk_ms / 2:
            return
        if time.monotonic() < self.retry_at:
            return  # the ledger failed a moment ago: not once a frame
        self.pending = self.spawn(self.reserve())

    async def reserve(self) -> None:
        day = today()
        try:
            if self.held_day not in (None, day) and self.held_ms > 0:
                await self.give_back()  # yesterday's unspoken share goes back to yesterday
            ask = self.chunk_ms + max(0, round(-self.held_ms))  # and cover speech ahead
            granted = await quota_reserve(
                user_id=self.user_id, kind="audio_ms", amount=ask, limit=self.audio_limit_ms
            )
            self.held_ms += granted
            self.held_day = day
            self.exhausted = granted < ask
        except Exception as exc:  # the ledger is away: speech goes on, persisted as usual
            log.warning("speaking time not reserved: %r", exc)
            self.retry_at = time.monotonic() + RETRY_S
        finally:
            self.answered = True
            self.pending = None

    async def give_back(self) -> None:
        """Return what was reserved and not spoken (the socket closes), once a
        reservation in flight has come back."""
        if self.pending is not None:
            await asyncio.shield(self.pending)  # it logs its own failure
        held, day = round(self.held_ms), self.held_day
        if held <= 0 or day is None:
            return
        self.held_ms = 0
        try:
            await quota_adjust(user_id=self.user_id, kind="audio_ms", delta=-held, day=day)
        except Exception as exc:  # kept reserved until the day ends
            log.warning("unspoken time not given back: %r", exc)

    async def check_tokens(self) -> None:
        """Raise quota_exceeded if no reply tokens are left today (a typed turn)."""
        try:
            left = await quota_left(user_id=self.user_id, kind="tokens", limit=self.tokens_limit)
        except Exception as exc:  # the reply's own reservation decides
            log.warning("token quota not read: %r", exc)
            return
        if left == 0:
            raise ProtocolError("quota_exceeded", TOKENS_USED)
