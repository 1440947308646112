"""Daily quotas reserved before the work (ledger.py), against both counters: the
process's own (embedded defaults) and a Redis of this test's own."""

import asyncio
import datetime as dt

import pytest
from asgiref.sync import sync_to_async
from redis.exceptions import ConnectionError as RedisConnectionError

from apps.accounts import ledger as ledger_module
from apps.accounts.ledger import (
    MemoryLedger,
    RedisLedger,
    counter_key,
    quota_adjust,
    quota_left,
    quota_reserve,
    today,
)
from apps.accounts.services import usage_reset_today
from tests import live

from .factories import UserFactory, usage_of, usage_set

pytestmark = pytest.mark.usefixtures("transactional_db")


@pytest.fixture(scope="module")
def own_redis():
    port = live.free_port()
    process = live.start_redis(port)
    yield f"redis://127.0.0.1:{port}/4"
    live.stop_by_pid(process)


@pytest.fixture(params=["memory", "redis"])
def store(request, monkeypatch):
    store = MemoryLedger() if request.param == "memory" else RedisLedger(
        request.getfixturevalue("own_redis")
    )  # fmt: skip
    store.clear_sync()
    monkeypatch.setattr(ledger_module, "_ledger", store)
    return store


async def test_reservations_stop_at_the_limit_even_when_they_race(store):
    user = await sync_to_async(UserFactory)()

    # when 20 reservations of 10 race for a limit of 95
    granted = await asyncio.gather(
        *(quota_reserve(user_id=user.pk, kind="tokens", amount=10, limit=95) for _ in range(20))
    )

    # then exactly the limit is granted: nine whole, one cut to what was left, the rest none
    assert sum(granted) == 95
    assert sorted(granted, reverse=True)[:11] == [10] * 9 + [5, 0]
    assert await store.spent(counter_key(user.pk, today(), "tokens")) == 95


async def test_a_missing_counter_starts_from_what_was_persisted_today(store):
    # given 40 s used today, persisted; the counter is gone (a Redis restart, a new process)
    user = await sync_to_async(UserFactory)()
    await sync_to_async(usage_set)(user, audio_seconds=40, tokens=7)

    granted = await quota_reserve(user_id=user.pk, kind="audio_ms", amount=30_000, limit=60_000)

    assert granted == 20_000  # 60 s - 40 s
    assert await quota_left(user_id=user.pk, kind="tokens", limit=10) == 3


async def test_adjust_gives_back_what_was_not_used_and_never_goes_below_zero(store):
    user = await sync_to_async(UserFactory)()
    day = today()
    key = counter_key(user.pk, day, "tokens")
    assert await quota_reserve(user_id=user.pk, kind="tokens", amount=500, limit=1000) == 500

    await quota_adjust(user_id=user.pk, kind="tokens", delta=-380, day=day)  # used 120
    assert await store.spent(key) == 120
    await quota_adjust(user_id=user.pk, kind="tokens", delta=-10_000, day=day)
    assert await store.spent(key) == 0


async def test_adjusting_a_lost_counter_leaves_it_to_the_persisted_figure(store):
    user = await sync_to_async(UserFactory)()
    day = today()

    await quota_adjust(user_id=user.pk, kind="tokens", delta=25, day=day)

    assert await store.spent(counter_key(user.pk, day, "tokens")) is None


async def test_unlimited_grants_everything_and_counts_nothing(store):
    user = await sync_to_async(UserFactory)()

    assert await quota_reserve(user_id=user.pk, kind="tokens", amount=10**9, limit=0) == 10**9
    assert await quota_left(user_id=user.pk, kind="tokens", limit=0) is None
    assert await store.spent(counter_key(user.pk, today(), "tokens")) is None


async def test_each_day_has_its_own_counter(store):
    user = await sync_to_async(UserFactory)()
    yesterday = counter_key(user.pk, today() - dt.timedelta(days=1), "tokens")
    await store.reserve(yesterday, 100, 100, 0)  # yesterday's allowance used up

    assert await quota_reserve(user_id=user.pk, kind="tokens", amount=60, limit=100) == 60


async def test_staff_reset_clears_todays_row_and_counter(store):
    user = await sync_to_async(UserFactory)()
    await sync_to_async(usage_set)(user, tokens=100)
    assert await quota_reserve(user_id=user.pk, kind="tokens", amount=50, limit=100) == 0

    await sync_to_async(usage_reset_today)(user_ids=[user.pk])

    assert await sync_to_async(usage_of)(user) == (0.0, 0)
    assert await quota_reserve(user_id=user.pk, kind="tokens", amount=50, limit=100) == 50


async def test_a_ledger_that_is_down_raises_for_its_caller_to_decide():
    # the callers (QuotaGate, the reply) let the work go on and log it: tested there
    port = live.free_port()  # nothing listens
    ledger_module._ledger, saved = RedisLedger(f"redis://127.0.0.1:{port}/4"), ledger_module._ledger
    try:
        user = await sync_to_async(UserFactory)()
        with pytest.raises(RedisConnectionError):
            await quota_reserve(user_id=user.pk, kind="tokens", amount=5, limit=10)
    finally:
        ledger_module._ledger = saved
