"""`manage.py stats`: per-stage percentiles of complete turns, turns by status,
tokens, audio and cost, from the turns stored in a window back from now."""

import json
from datetime import timedelta
from decimal import Decimal

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from apps.conversations.models import Message
from apps.conversations.tests.factories import ConversationFactory, MessageFactory
from apps.observability.stats import percentile, since_parse, turn_stats

pytestmark = pytest.mark.django_db

ASSISTANT = {"role": "assistant", "source": "llm"}


def stored(conversation, *, ago: timedelta = timedelta(minutes=5), **fields) -> Message:
    message = MessageFactory(conversation=conversation, **fields)
    Message.objects.filter(pk=message.pk).update(created_at=timezone.now() - ago)
    return message


@pytest.fixture
def turns():
    """Within the last hour: 10 voice turns (speech end → final 100…1000 ms), one typed
    turn, 3 complete replies, one interrupted and one failed; 3 hours ago, one of each
    kind with timings far off."""
    conversation = ConversationFactory()
    for i in range(1, 11):
        stored(
            conversation,
            source="voice",
            speech_end_to_final_ms=i * 100,
            stt_audio_seconds=2.5,
            cost_usd=Decimal("0.00025"),
        )
    stored(conversation, source="text")
    for first_token, first_audio, total in ((200, 300, 900), (400, 100, 1100), (300, 200, 1000)):
        stored(
            conversation,
            **ASSISTANT,
            final_to_first_token_ms=first_token,
            first_token_to_first_audio_ms=first_audio,
            reply_total_ms=total,
            prompt_tokens=100,
            completion_tokens=20,
            tts_audio_seconds=2.0,
            cost_usd=Decimal("0.001"),
        )
    stored(
        conversation,
        **ASSISTANT,
        status="interrupted",
        final_to_first_token_ms=5,
        first_token_to_first_audio_ms=5,
        reply_total_ms=5,
        prompt_tokens=100,
        completion_tokens=3,
        tts_audio_seconds=0.5,
        cost_usd=Decimal("0.0002"),
    )
    stored(conversation, **ASSISTANT, status="failed", final_to_first_token_ms=9000)
    old = timedelta(hours=3)
    stored(conversation, ago=old, source="voice", speech_end_to_final_ms=60_000)
    stored(
        conversation,
        ago=old,
        **ASSISTANT,
        final_to_first_token_ms=60_000,
        reply_total_ms=60_000,
        prompt_tokens=5000,
        cost_usd=Decimal("1"),
    )


def stages_of(stats) -> dict:
    return {s.stage: (s.count, s.p50_ms, s.p95_ms, s.p99_ms) for s in stats.stages}


def test_percentiles_are_nearest_rank():
    values = list(range(1, 101))  # 1…100

    assert [percentile(values, p) for p in (50, 95, 99, 100)] == [50, 95, 99, 100]
    assert [percentile([7], p) for p in (50, 99)] == [7, 7]
    assert percentile([100, 200, 300], 50) == 200
    assert percentile([], 50) is None


def test_the_last_hour_counts_complete_turns_in_the_percentiles_and_the_rest_apart(turns):
    stats = turn_stats(since=timezone.now() - timedelta(hours=1))

    assert stages_of(stats) == {
        "speech_end_to_final": (10, 500, 1000, 1000),
        "final_to_first_token": (3, 300, 400, 400),
        "first_token_to_first_audio": (3, 200, 300, 300),
        "reply_total": (3, 1000, 1100, 1100),
    }
    assert stats.turns == {
        "assistant complete": 3,
        "assistant failed": 1,
        "assistant interrupted": 1,
        "user text": 1,
        "user voice": 10,
    }
    # the interrupted reply's tokens, speech and cost count: they were paid for
    assert (stats.prompt_tokens, stats.completion_tokens) == (400, 63)
    assert stats.stt_audio_seconds == 25.0
    assert stats.tts_audio_seconds == 6.5
    assert stats.cost_usd == Decimal("0.0057")  # 10 × 0.00025 + 3 × 0.001 + 0.0002
    assert not stats.sampled


def test_a_longer_window_takes_the_older_turns_in(turns):
    stats = turn_stats(since=timezone.now() - timedelta(days=2))

    assert stages_of(stats)["speech_end_to_final"] == (11, 600, 60_000, 60_000)
    assert stages_of(stats)["final_to_first_token"] == (4, 300, 60_000, 60_000)
    assert stats.cost_usd == Decimal("1.0057")


def test_a_limit_reads_the_newest_complete_turns_and_says_so(turns):
    stats = turn_stats(since=timezone.now() - timedelta(days=2), limit=5)

    # the newest five with timings: the three replies and the last two voice turns
    assert stats.sampled
    assert stages_of(stats)["speech_end_to_final"] == (2, 900, 1000, 1000)
    assert stages_of(stats)["final_to_first_token"] == (3, 300, 400, 400)
    assert stats.turns["user voice"] == 11  # counts stay exact


def test_an_empty_window_reports_zeros():
    stats = turn_stats(since=timezone.now() - timedelta(minutes=30))

    assert stages_of(stats)["reply_total"] == (0, None, None, None)
    assert stats.turns == {} and stats.cost_usd == 0


@pytest.mark.parametrize(
    ("value", "span"),
    [
        ("30m", timedelta(minutes=30)),
        ("1h", timedelta(hours=1)),
        ("2d", timedelta(days=2)),
        ("45s", timedelta(seconds=45)),
        (" 3h ", timedelta(hours=3)),
    ],
)
def test_since_takes_a_number_and_a_unit(value, span):
    assert since_parse(value) == span


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("soon", "--since 'soon': expected a whole number and a unit (s, m, h, d), e.g. 30m"),
        ("1", "--since '1': expected a whole number and a unit"),
        ("1.5h", "--since '1.5h': expected a whole number and a unit"),
        ("1w", "--since '1w': expected a whole number and a unit"),
        ("-1h", "--since '-1h': must be more than 0"),
        ("0m", "--since '0m': must be more than 0"),
        ("400d", "--since '400d': at most 366 days"),
        ("99999999999999999999d", "--since '99999999999999999999d': at most 366 days"),
    ],
)
def test_since_refuses_anything_else_saying_what_it_expects(value, message):
    with pytest.raises(ValueError) as refused:
        since_parse(value)

    assert str(refused.value).startswith(message)


# --- The command ----------------------------------------------------------------------


def test_the_command_prints_the_table(turns, capsys):
    call_command("stats", "--since", "1h")

    out = capsys.readouterr().out
    lines = [" ".join(line.split()) for line in out.splitlines()]
    assert "stage count p50 ms p95 ms p99 ms" in lines
    assert "speech_end_to_final 10 500 1000 1000" in lines
    assert "final_to_first_token 3 300 400 400" in lines
    assert "first_token_to_first_audio 3 200 300 300" in lines
    assert "reply_total 3 1000 1100 1100" in lines
    assert "assistant interrupted 1" in lines and "assistant failed 1" in lines
    assert "tokens in / out 400 / 63" in lines
    assert "audio transcribed 25.0 s" in lines
    assert "speech synthesised 6.5 s" in lines
    assert "cost $0.00570000" in lines


def test_the_command_prints_the_same_as_json(turns, capsys):
    call_command("stats", "--since", "30m", "--json")

    data = json.loads(capsys.readouterr().out)
    stages = {s["stage"]: s for s in data["stages"]}
    assert stages["speech_end_to_final"] == {
        "stage": "speech_end_to_final",
        "count": 10,
        "p50_ms": 500,
        "p95_ms": 1000,
        "p99_ms": 1000,
    }
    assert stages["reply_total"]["p95_ms"] == 1100
    assert data["turns"]["assistant complete"] == 3
    assert data["prompt_tokens"] == 400 and data["completion_tokens"] == 63
    assert data["stt_audio_seconds"] == 25.0 and data["tts_audio_seconds"] == 6.5
    assert data["cost_usd"] == "0.00570000"
    assert data["sampled"] is False
    assert data["since"] < data["until"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "soon"], "--since 'soon': expected a whole number and a unit"),
        (["--since=-1h"], "--since '-1h': must be more than 0"),
        (["--limit", "0"], "--limit 0: must be more than 0"),
    ],
)
def test_the_command_refuses_bad_input_with_a_clear_error(args, message):
    with pytest.raises(CommandError) as refused:
        call_command("stats", *args)

    assert str(refused.value).startswith(message)
