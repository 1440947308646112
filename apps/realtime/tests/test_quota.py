"""One socket's share of the daily speaking time (quota.py): reserved in chunks
ahead of use, so a frame costs a subtraction; the utterance that runs past the
day's allowance is cut there; what was not spoken goes back when it closes."""

import asyncio

import pytest
from asgiref.sync import sync_to_async

from apps.accounts import ledger as ledger_module
from apps.accounts.ledger import MemoryLedger, RedisLedger, counter_key, today
from apps.accounts.tests.factories import UserFactory, usage_set
from apps.realtime.protocol import ProtocolError
from apps.realtime.quota import QuotaGate
from tests import live

pytestmark = pytest.mark.usefixtures("transactional_db")


@pytest.fixture
def store(monkeypatch, settings):
    settings.QUOTA_AUDIO_CHUNK_S = 10
    store = MemoryLedger()
    monkeypatch.setattr(ledger_module, "_ledger", store)
    return store


def gate_of(user, *, audio_s: int, tokens: int = 0) -> tuple[QuotaGate, list[asyncio.Task]]:
    tasks: list[asyncio.Task] = []

    def spawn(coro) -> asyncio.Task:
        tasks.append(asyncio.ensure_future(coro))
        return tasks[-1]

    gate = QuotaGate(
        user_id=user.pk, audio_seconds_per_day=audio_s, tokens_per_day=tokens,
        spawn=spawn,
    )  # fmt: skip
    return gate, tasks


async def settled(tasks: list[asyncio.Task]) -> None:
    while any(not t.done() for t in tasks):
        await asyncio.gather(*tasks)


async def test_speech_draws_on_chunks_reserved_ahead_and_stops_at_the_days_end(store):
    # given a user with 25 s of speaking time today, reserved 10 s at a time
    user = await sync_to_async(UserFactory)(audio_seconds_quota=25)
    gate, tasks = gate_of(user, audio_s=25)
    key = counter_key(user.pk, today(), "audio_ms")

    gate.top_up()  # when the socket opens: the first chunk, in the background
    assert len(tasks) == 1 and gate.held_ms == 0
    await gate.may_start()  # the first utterance waits for that answer
    assert (gate.held_ms, await store.spent(key)) == (10_000, 10_000)

    # when the user speaks in 100 ms frames
    spoken_ms = 0
    while gate.spend(100):
        spoken_ms += 100
        await settled(tasks)  # a top-up in flight lands between frames
        assert spoken_ms < 60_000

    # then speech stops at the allowance (25 s), and the ledger holds exactly that
    assert spoken_ms == 24_900  # the frame that reaches 25 s is the one refused
    assert await store.spent(key) == 25_000
    with pytest.raises(ProtocolError) as refused:
        await gate.may_start()
    assert refused.value.code == "quota_exceeded" and "speaking time" in refused.value.message


async def test_a_socket_closing_gives_back_what_it_did_not_speak(store):
    user = await sync_to_async(UserFactory)(audio_seconds_quota=60)
    gate, _ = gate_of(user, audio_s=60)
    await gate.may_start()
    gate.spend(2_500)

    await gate.give_back()

    assert await store.spent(counter_key(user.pk, today(), "audio_ms")) == 2_500
    assert gate.held_ms == 0


async def test_a_socket_closing_while_a_chunk_is_asked_for_gives_that_back_too(store):
    user = await sync_to_async(UserFactory)(audio_seconds_quota=60)
    gate, tasks = gate_of(user, audio_s=60)
    gate.top_up()  # the socket opens: its first chunk is on the way

    await gate.give_back()  # and it closes before the answer came

    assert tasks[0].done()
    assert await store.spent(counter_key(user.pk, today(), "audio_ms")) == 0


async def test_two_sockets_of_one_user_share_the_allowance(store):
    user = await sync_to_async(UserFactory)(audio_seconds_quota=15)
    (first, _), (second, _) = (
        gate_of(user, audio_s=15),
        gate_of(user, audio_s=15),
    )

    await first.may_start()
    await second.may_start()  # granted what is left: 5 s

    assert sorted([first.held_ms, second.held_ms]) == [5_000, 10_000]
    assert first.exhausted or second.exhausted


async def test_speech_persisted_today_counts_against_a_new_socket(store):
    user = await sync_to_async(UserFactory)(audio_seconds_quota=30)
    await sync_to_async(usage_set)(user, audio_seconds=30)
    gate, _ = gate_of(user, audio_s=30)

    with pytest.raises(ProtocolError):
        await gate.may_start()  # before speech.start: the utterance never opens


async def test_unlimited_users_cost_the_ledger_nothing(store):
    user = await sync_to_async(UserFactory)(audio_seconds_quota=0)
    gate, tasks = gate_of(user, audio_s=0)

    await gate.may_start()
    assert all(gate.spend(100) for _ in range(10_000))

    assert tasks == [] and store.counters == {}


async def test_a_ledger_that_is_down_lets_speech_go_on(monkeypatch, settings):
    settings.QUOTA_AUDIO_CHUNK_S = 10
    monkeypatch.setattr(
        ledger_module, "_ledger", RedisLedger(f"redis://127.0.0.1:{live.free_port()}/4")
    )
    user = await sync_to_async(UserFactory)(audio_seconds_quota=60)
    gate, tasks = gate_of(user, audio_s=60)

    await gate.may_start()  # an outage of ours cuts nobody off

    assert all(gate.spend(100) for _ in range(100)) and not gate.exhausted
    await gate.may_start()
    await settled(tasks)
    assert len(tasks) == 1  # and a failed ledger is asked again after a pause, not per frame


async def test_typed_turns_are_refused_when_no_reply_tokens_are_left(store):
    user = await sync_to_async(UserFactory)(tokens_quota=100)
    gate, _ = gate_of(user, audio_s=0, tokens=100)
    await gate.check_tokens()  # some left

    await sync_to_async(usage_set)(user, tokens=100)
    store.clear_sync()  # the counter is read again from what was persisted

    with pytest.raises(ProtocolError) as refused:
        await gate.check_tokens()
    assert refused.value.code == "quota_exceeded" and "reply tokens" in refused.value.message
