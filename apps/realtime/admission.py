"""Admission under overload: while the `stt` backlog is past STT_BACKLOG_REFUSE,
a new conversation socket is refused with 1013 (Try Again Later) and a readable
reason, so the sessions already admitted keep their latency and the queue stays
bounded while the workers scale out (deploy/k8s autoscaling).

The depth is the broker's (Redis lists, the same read as /metrics) or, with no
broker, the in-process workers' queue. It is read at most once every
BACKLOG_CACHE_S per process, on a thread, by whichever socket asks first."""

from __future__ import annotations

import asyncio
import logging
import time

from asgiref.sync import sync_to_async
from django.conf import settings

from apps.observability.collectors import QueueCollector

from .leases import CLOSE_TOO_MANY_SOCKETS, socket_leases

log = logging.getLogger(__name__)

BACKLOG_CACHE_S = 1.0
CLOSE_TRY_AGAIN_LATER = 1013
REFUSED = "Too many people are talking right now. Try again in a minute."


class Backlog:
    def __init__(self) -> None:
        self.collector: QueueCollector | None = None
        self.depth = 0
        self.read_at = -1e9
        self.reading: asyncio.Future | None = None

    def _read(self) -> int:
        if self.collector is None:
            self.collector = QueueCollector(settings.CELERY_BROKER_URL, queues=("stt",))
        return self.collector.figures()["stt"][0]

    async def stt_depth(self) -> int:
        if time.monotonic() - self.read_at < BACKLOG_CACHE_S:
            return self.depth
        if self.reading is None:  # one read at a time; the others wait for it
            self.reading = asyncio.ensure_future(
                sync_to_async(self._read, thread_sensitive=False)()
            )
        reading = self.reading
        try:
            self.depth = await asyncio.shield(reading)
        except Exception as exc:  # the broker is down: admit (its own errors say so)
            log.warning("stt backlog unreadable: %r", exc)
        finally:
            if self.reading is reading and reading.done():
                self.reading = None
                self.read_at = time.monotonic()
        return self.depth


backlog = Backlog()


async def overloaded() -> bool:
    """True while new voice sessions must wait (STT_BACKLOG_REFUSE of 0: never)."""
    bound = settings.STT_BACKLOG_REFUSE
    return bool(bound) and await backlog.stt_depth() > bound


async def admission_refusal(*, user_id: int, channel: str) -> tuple[int, str, str] | None:
    """Why a new conversation socket may not open now (close code, error code,
    message), or None, in which case it holds one of the user's socket leases
    (leases.py) until `admission_release`."""
    if await overloaded():
        return CLOSE_TRY_AGAIN_LATER, "overloaded", REFUSED
    if not await socket_leases().acquire(user_id=user_id, channel=channel):
        most = settings.SOCKETS_PER_USER_MAX
        message = f"You have {most} conversations open already. Close one to open another."
        return CLOSE_TOO_MANY_SOCKETS, "too_many_sockets", message
    return None


async def admission_release(*, user_id: int, channel: str) -> None:
    await socket_leases().release(user_id=user_id, channel=channel)
