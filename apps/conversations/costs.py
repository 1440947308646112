"""What a turn costs, in US dollars, from the prices in settings (COST_PRICES).

Three things are priced, each by the engine kind that did the work:
- "stt": audio seconds transcribed (a voice turn's utterance), per audio minute;
- "llm": tokens in (prompt) and out (completion), per million tokens;
- "tts": seconds of speech synthesised, per audio minute.

COST_PRICES is JSON that overrides DEFAULT_PRICES per stage and kind, e.g.
`{"llm": {"openai": {"in_per_1m": 2.5, "out_per_1m": 10}}}`. A malformed value
stops every process at start-up (ConversationsConfig.ready), with what is wrong.
A kind with no price costs 0 (a turn never fails over pricing), and
`prices_missing` names the engines the registry knows that are not priced.

The defaults are assumptions, written down in docs/observability.md:
- local engines (echo, local, faster_whisper, piper, espeak) cost 0 here: they run on
  machines Parley pays for by the hour whatever the traffic, so their cost is
  the capacity plan's (apps/observability/capacity.py), not a per-turn figure;
  price them here (e.g. CPU-seconds × your hourly rate) to see it per turn;
- "openai" at OpenAI's public list prices (2025) of the default models:
  gpt-4o-mini $0.15 / 1M tokens in and $0.60 / 1M out (LLM_MODEL),
  gpt-4o-mini-transcribe $0.003 / audio minute (OPENAI_STT_MODEL),
  gpt-4o-mini-tts $0.015 / audio minute (OPENAI_TTS_MODEL).
  Another model at another price: set COST_PRICES."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

STAGES = ("stt", "llm", "tts")
# The fields of one kind's price, per stage.
FIELDS = {
    "stt": ("per_minute",),
    "llm": ("in_per_1m", "out_per_1m"),
    "tts": ("per_minute",),
}
DEFAULT_PRICES: dict[str, dict[str, dict[str, float]]] = {
    "stt": {
        "faster_whisper": {"per_minute": 0},
        "openai": {"per_minute": 0.003},
    },
    "llm": {
        "echo": {"in_per_1m": 0, "out_per_1m": 0},
        "local": {"in_per_1m": 0, "out_per_1m": 0},  # the offline model (serve_llm)
        "openai": {"in_per_1m": 0.15, "out_per_1m": 0.60},
    },
    "tts": {
        "piper": {"per_minute": 0},
        "espeak": {"per_minute": 0},
        "openai": {"per_minute": 0.015},
    },
}
# Costs are stored with this many decimal places (Message.cost_usd).
PLACES = Decimal("0.00000001")
ZERO = Decimal(0)


class PriceError(ValueError):
    """COST_PRICES is not what it must be; the message says what and where."""


@dataclass(frozen=True)
class Prices:
    """Per stage, per engine kind: the price of each field, in US dollars."""

    table: dict[str, dict[str, dict[str, Decimal]]]

    def _price(self, stage: str, kind: str, field: str) -> Decimal:
        return self.table[stage].get(kind, {}).get(field, ZERO)

    def stt_usd(self, *, kind: str, audio_seconds: float) -> Decimal:
        per_minute = self._price("stt", kind, "per_minute")
        return _rounded(per_minute * _decimal(audio_seconds) / 60)

    def llm_usd(self, *, kind: str, prompt_tokens: int, completion_tokens: int) -> Decimal:
        tokens_in = self._price("llm", kind, "in_per_1m") * prompt_tokens
        tokens_out = self._price("llm", kind, "out_per_1m") * completion_tokens
        return _rounded((tokens_in + tokens_out) / 1_000_000)

    def tts_usd(self, *, kind: str, audio_seconds: float) -> Decimal:
        per_minute = self._price("tts", kind, "per_minute")
        return _rounded(per_minute * _decimal(audio_seconds) / 60)

    def missing(self, kinds: dict[str, list[str]]) -> list[str]:
        """`stage:kind` of each of `kinds` (stage → engine kinds) with no price."""
        return [
            f"{stage}:{kind}"
            for stage, names in kinds.items()
            for kind in names
            if kind not in self.table.get(stage, {})
        ]


def usd(value: Decimal | float | int | None) -> Decimal:
    """A sum of costs, to the stored places (SQLite sums them as floats)."""
    if value is None:
        return Decimal(0).quantize(PLACES)
    return (value if isinstance(value, Decimal) else _decimal(value)).quantize(PLACES)


def usd_text(value: Decimal | float | int | None) -> str:
    """A cost as the admin and reports show it: '0.03345000' (never '0E-8')."""
    return format(usd(value), "f")


def _decimal(value: float) -> Decimal:
    return Decimal(repr(float(value)))


def _rounded(value: Decimal) -> Decimal:
    return value.quantize(PLACES)


def _price_value(value: Any, where: str) -> Decimal:
    # bool is an int in Python; `true` is not a price
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PriceError(f"COST_PRICES {where}: expected a number of US dollars, got {value!r}")
    if value < 0 or value != value or value in (float("inf"), float("-inf")):
        raise PriceError(f"COST_PRICES {where}: a price must be a finite number >= 0, got {value}")
    return _decimal(value)


@functools.lru_cache(maxsize=8)
def prices_parse(raw: str) -> Prices:
    """DEFAULT_PRICES with the JSON `raw` (COST_PRICES) over them, checked: each
    stage known, each kind an object with exactly that stage's fields, each price
    a finite number >= 0. Raises PriceError saying what is wrong."""
    override: Any = {}
    if raw.strip():
        try:
            override = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise PriceError(f"COST_PRICES is not valid JSON: {exc}") from None
    if not isinstance(override, dict):
        raise PriceError(
            f"COST_PRICES must be a JSON object of stages ({', '.join(STAGES)}), "
            f"got {type(override).__name__}"
        )
    unknown = sorted(set(override) - set(STAGES))
    if unknown:
        raise PriceError(
            f"COST_PRICES: unknown stage {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(STAGES)}"
        )
    table: dict[str, dict[str, dict[str, Decimal]]] = {}
    for stage in STAGES:
        kinds = override.get(stage, {})
        if not isinstance(kinds, dict):
            raise PriceError(f"COST_PRICES {stage}: expected an object of engine kinds")
        merged = {**DEFAULT_PRICES[stage], **kinds}
        table[stage] = {kind: _kind_prices(stage, kind, fields) for kind, fields in merged.items()}
    return Prices(table)


def _kind_prices(stage: str, kind: str, fields: Any) -> dict[str, Decimal]:
    expected = FIELDS[stage]
    where = f"{stage}.{kind}"
    if not isinstance(fields, dict):
        raise PriceError(
            f"COST_PRICES {where}: expected an object with {', '.join(expected)}, got {fields!r}"
        )
    if set(fields) != set(expected):
        raise PriceError(
            f"COST_PRICES {where}: expected exactly {', '.join(expected)}, "
            f"got {', '.join(sorted(fields)) or 'nothing'}"
        )
    return {name: _price_value(fields[name], f"{where}.{name}") for name in expected}


def prices() -> Prices:
    """The prices in settings (parsed once per distinct value)."""
    from django.conf import settings

    return prices_parse(settings.COST_PRICES)


def prices_missing() -> list[str]:
    """Engines of the registry (apps/pipeline/providers/registry.py) with no price."""
    from apps.pipeline.providers import registry

    kinds = {
        "stt": sorted(registry.STT_KINDS),
        "llm": sorted(registry.LLM_KINDS),
        "tts": sorted(registry.TTS_KINDS),
    }
    return prices().missing(kinds)
