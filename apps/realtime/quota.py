"""The user's quota as one socket last read it. Speech start checks it with
no query; it is read again in the background, at most every QUOTA_REFRESH_S,
when a check finds it old."""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine

from channels.db import database_sync_to_async
from django.conf import settings

from apps.accounts.services import user_quota_problem

from .protocol import ProtocolError


class QuotaGate:
    def __init__(self, *, user_id: int, problem: str, spawn: Callable[[Coroutine], object]):
        self.user_id = user_id
        self.problem = problem
        self.spawn = spawn
        self.read_at = time.monotonic()
        self.reading = False

    def check(self) -> None:
        """Raise quota_exceeded if the user may not talk now."""
        if time.monotonic() - self.read_at > settings.QUOTA_REFRESH_S and not self.reading:
            self.reading = True
            self.spawn(self.refresh())
        if self.problem:
            raise ProtocolError("quota_exceeded", self.problem)

    async def refresh(self) -> None:
        try:
            self.problem = await database_sync_to_async(user_quota_problem)(user_id=self.user_id)
            self.read_at = time.monotonic()
        finally:
            self.reading = False
