"""Admission under overload. A new conversation socket is refused with 1013
(Try Again Later) and a readable reason when either:
- the fleet is at its STT capacity: as many sockets open as the live STT
  workers serve at the latency targets (STT_SESSIONS_PER_WORKER each, from
  benchmarks/overload.py; 0: not checked). Counted and taken in one step with
  the socket's lease (leases.py), so a burst cannot overshoot, and known
  before the backlog builds;
- the `stt` backlog is past STT_BACKLOG_REFUSE: the capacity figure was wrong,
  or the workers are slow (a backlog a burst builds shows only later).
So the sessions already admitted keep their latency and the queue stays bounded
while the workers scale out (deploy/k8s autoscaling), which raises the capacity.

The depth is the broker's (Redis lists, the same read as /metrics) or, with no
broker, the in-process workers' queue; the live STT workers are counted from
their registrations (apps/pipeline/stt_fleet.py). Each is read at most once
every FIGURE_CACHE_S per process, on a thread, by whichever socket asks first."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from asgiref.sync import sync_to_async
from django.conf import settings

from apps.observability.collectors import QueueCollector
from apps.pipeline.stt_fleet import stt_workers_count

from .leases import CLOSE_TOO_MANY_SOCKETS, socket_leases

log = logging.getLogger(__name__)

FIGURE_CACHE_S = 1.0
CLOSE_TRY_AGAIN_LATER = 1013
REFUSED = "Too many people are talking right now. Try again in a minute."


class CachedFigure:
    """A figure read on a thread at most every FIGURE_CACHE_S; the readers that
    ask meanwhile wait for the one read. A failed read keeps the last figure."""

    def __init__(self, name: str, read: Callable[[], int]) -> None:
        self.name = name
        self.read = read
        self.value = 0
        self.read_at = -1e9
        self.reading: asyncio.Future | None = None

    async def get(self) -> int:
        if time.monotonic() - self.read_at < FIGURE_CACHE_S:
            return self.value
        if self.reading is None:
            self.reading = asyncio.ensure_future(sync_to_async(self.read, thread_sensitive=False)())
        reading = self.reading
        try:
            self.value = await asyncio.shield(reading)
        except Exception as exc:  # Redis is down: admit on the last figure
            log.warning("%s unreadable: %r", self.name, exc)
        finally:
            if self.reading is reading and reading.done():
                self.reading = None
                self.read_at = time.monotonic()
        return self.value


class _Backlog:
    collector: QueueCollector | None = None

    def __call__(self) -> int:
        if self.collector is None:
            self.collector = QueueCollector(settings.CELERY_BROKER_URL, queues=("stt",))
        return self.collector.figures()["stt"][0]


backlog = CachedFigure("stt backlog", _Backlog())
stt_workers = CachedFigure("stt workers", stt_workers_count)


async def overloaded() -> bool:
    """True while the `stt` backlog is past its bound (STT_BACKLOG_REFUSE of 0: never)."""
    bound = settings.STT_BACKLOG_REFUSE
    return bool(bound) and await backlog.get() > bound


async def fleet_capacity() -> int:
    """The sockets the live STT workers serve at the latency targets (0: not limited)."""
    per_worker = settings.STT_SESSIONS_PER_WORKER
    if not per_worker:
        return 0
    return max(1, await stt_workers.get()) * per_worker  # none registered yet: one's worth


async def admission_refusal(*, user_id: int, channel: str) -> tuple[int, str, str] | None:
    """Why a new conversation socket may not open now (close code, error code,
    message), or None, in which case it holds one of the user's socket leases
    (leases.py) until `admission_release`."""
    if await overloaded():
        return CLOSE_TRY_AGAIN_LATER, "overloaded", REFUSED
    outcome = await socket_leases().acquire(
        user_id=user_id, channel=channel, fleet_max=await fleet_capacity()
    )
    if outcome == "fleet_full":
        return CLOSE_TRY_AGAIN_LATER, "overloaded", REFUSED
    if outcome == "user_full":
        most = settings.SOCKETS_PER_USER_MAX
        message = f"You have {most} conversations open already. Close one to open another."
        return CLOSE_TOO_MANY_SOCKETS, "too_many_sockets", message
    return None


async def admission_release(*, user_id: int, channel: str) -> None:
    await socket_leases().release(user_id=user_id, channel=channel)
