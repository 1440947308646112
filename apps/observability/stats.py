"""A report without Prometheus (`manage.py stats --since 1h`): per-stage latency
percentiles, turns by status, tokens, audio and cost, from what is stored on
the turns (conversations.Message).

Two queries over the window's turns (by `created_at`, which has no index of its
own: a report an operator runs reads the table, rather than every turn's INSERT
writing one more index): one grouped aggregate (exact counts and sums), and the
stage timings of the complete turns, newest first, at most `limit` of them
(`sampled` says when the window held more). Only complete turns enter the
percentiles; interrupted and failed replies are counted apart, as in the
metrics (parley_stage_seconds)."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.db.models import Count, DecimalField, Q, Sum
from django.utils import timezone

from apps.conversations.costs import usd, usd_text
from apps.conversations.models import Message

# The stored timings, each a stage of a voice turn (docs/protocol.md); reply_total
# is the whole reply, final → last token stored.
STAGE_FIELDS = (
    "speech_end_to_final_ms",
    "final_to_first_token_ms",
    "first_token_to_first_audio_ms",
    "reply_total_ms",
)
PERCENTILES = (50, 95, 99)
TURN_LIMIT = 100_000  # complete turns whose timings are read, at most
SINCE_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
SINCE_MAX = timedelta(days=366)
_SINCE = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")


def since_parse(value: str) -> timedelta:
    """`30m`, `1h`, `2d` (also `s`): a positive duration of at most a year.
    Raises ValueError saying what was expected."""
    if value.strip().startswith("-"):
        raise ValueError(f"--since {value!r}: must be more than 0 (how far back from now)")
    match = _SINCE.match(value)
    if match is None:
        raise ValueError(
            f"--since {value!r}: expected a whole number and a unit (s, m, h, d), e.g. 30m, 1h, 2d"
        )
    number, unit = int(match.group(1)), match.group(2)
    if number <= 0:
        raise ValueError(f"--since {value!r}: must be more than 0")
    try:
        span = timedelta(**{SINCE_UNITS[unit]: number})
    except OverflowError:
        span = SINCE_MAX + timedelta(days=1)
    if span > SINCE_MAX:
        raise ValueError(f"--since {value!r}: at most {SINCE_MAX.days} days")
    return span


def percentile(ordered: list[int], p: float) -> int | None:
    """The nearest-rank percentile of an ascending list: the smallest value with
    at least p % of the values at or below it (None for no values)."""
    if not ordered:
        return None
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class StageStats:
    stage: str  # the field's name without `_ms`
    count: int
    p50_ms: int | None
    p95_ms: int | None
    p99_ms: int | None


@dataclass(frozen=True)
class TurnStats:
    since: datetime
    until: datetime
    stages: list[StageStats]
    # "user voice", "user text", "assistant complete", "assistant interrupted", ...
    turns: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    stt_audio_seconds: float = 0.0
    tts_audio_seconds: float = 0.0
    cost_usd: Decimal = Decimal(0)
    sampled: bool = False  # more complete turns than the limit: percentiles of the newest

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["since"] = self.since.isoformat()
        data["until"] = self.until.isoformat()
        data["cost_usd"] = usd_text(self.cost_usd)
        return data


def turn_stats(
    *, since: datetime, until: datetime | None = None, limit: int = TURN_LIMIT
) -> TurnStats:
    """What the turns stored in [since, until) took, did and cost."""
    until = until or timezone.now()
    window = Message.objects.filter(created_at__gte=since, created_at__lt=until).order_by()
    groups = window.values("role", "source", "status").annotate(
        n=Count("*"),
        prompt_tokens=Sum("prompt_tokens"),
        completion_tokens=Sum("completion_tokens"),
        stt_audio_seconds=Sum("stt_audio_seconds"),
        tts_audio_seconds=Sum("tts_audio_seconds"),
        cost_usd=Sum("cost_usd", output_field=DecimalField(max_digits=20, decimal_places=8)),
    )
    turns: dict[str, int] = {}
    sums: dict[str, Any] = {
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "stt_audio_seconds": 0.0,
        "tts_audio_seconds": 0.0,
        "cost_usd": Decimal(0),
    }
    for group in groups:
        row: dict[str, Any] = dict(group)
        # a user's turn is always complete: by source; a reply by how it ended
        key = row["source"] if row["role"] == Message.Role.USER else row["status"]
        name = f"{row['role']} {key}"
        turns[name] = turns.get(name, 0) + row["n"]
        for total in sums:
            sums[total] += row[total] or 0
    timed = Q()
    for name in STAGE_FIELDS:
        timed |= Q(**{f"{name}__isnull": False})
    rows = list(
        window.filter(timed, status=Message.Status.COMPLETE)
        .order_by("-created_at")
        .values_list(*STAGE_FIELDS)[: limit + 1]
    )
    sampled = len(rows) > limit
    rows = rows[:limit]
    stages = []
    for i, name in enumerate(STAGE_FIELDS):
        values = sorted(row[i] for row in rows if row[i] is not None)
        p50, p95, p99 = (percentile(values, p) for p in PERCENTILES)
        stages.append(StageStats(name.removesuffix("_ms"), len(values), p50, p95, p99))
    return TurnStats(
        since=since,
        until=until,
        stages=stages,
        turns=dict(sorted(turns.items())),
        prompt_tokens=int(sums["prompt_tokens"]),
        completion_tokens=int(sums["completion_tokens"]),
        stt_audio_seconds=round(float(sums["stt_audio_seconds"]), 3),
        tts_audio_seconds=round(float(sums["tts_audio_seconds"]), 3),
        cost_usd=usd(sums["cost_usd"]),
        sampled=sampled,
    )


def stats_table(stats: TurnStats) -> str:
    """The report as plain text: a table of the stages, then the turns and totals."""

    def ms(value: int | None) -> str:
        return "-" if value is None else str(value)

    lines = [
        f"Turns stored from {stats.since:%Y-%m-%d %H:%M:%S} to {stats.until:%Y-%m-%d %H:%M:%S} "
        f"({stats.until.tzname() or 'UTC'}); latency of complete turns only",
        "",
        f"{'stage':<28} {'count':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}",
    ]
    for stage in stats.stages:
        lines.append(
            f"{stage.stage:<28} {stage.count:>7} {ms(stage.p50_ms):>8} "
            f"{ms(stage.p95_ms):>8} {ms(stage.p99_ms):>8}"
        )
    if stats.sampled:
        lines.append("(more complete turns than the limit: percentiles of the newest)")
    lines += ["", f"{'turns':<28} {'count':>7}"]
    lines += [f"{name:<28} {count:>7}" for name, count in stats.turns.items()] or [
        f"{'(none)':<28} {0:>7}"
    ]
    lines += [
        "",
        f"tokens in / out        {stats.prompt_tokens} / {stats.completion_tokens}",
        f"audio transcribed      {stats.stt_audio_seconds:.1f} s",
        f"speech synthesised     {stats.tts_audio_seconds:.1f} s",
        f"cost                   ${usd_text(stats.cost_usd)}",
    ]
    return "\n".join(lines)
