"""What turns cost: the prices (COST_PRICES over the defaults, checked at start-up),
and the cost stored on each turn by the services that store the turn's work:
transcript_finalize (audio transcribed), reply_finish (tokens), reply_speech_add
(each TTS part's speech, from the TTS worker's synthesize_sentence)."""

import json
import os
import subprocess
import sys
import uuid
from decimal import Decimal

import pytest
from django.conf import settings as django_settings
from prometheus_client import REGISTRY

from apps.accounts.tests.factories import usage_of
from apps.conversations import costs
from apps.conversations.costs import PriceError, prices_parse
from apps.conversations.models import Message
from apps.conversations.services import (
    reply_begin,
    reply_finish,
    reply_speech_add,
    transcript_finalize,
)
from apps.pipeline import services as pipeline_services
from apps.pipeline.services import synthesize_sentence
from apps.pipeline.values import SentenceToSpeak

from .factories import ConversationFactory

OPENAI = json.dumps(
    {
        "stt": {"faster_whisper": {"per_minute": 0.006}},
        "llm": {"echo": {"in_per_1m": 1.0, "out_per_1m": 4.0}},
        "tts": {"espeak": {"per_minute": 0.6}},
    }
)


def cost_metric(stage: str, engine: str) -> float:
    value = REGISTRY.get_sample_value("parley_cost_usd_total", {"stage": stage, "engine": engine})
    return value or 0.0


# --- Prices ------------------------------------------------------------------------------


def test_the_defaults_price_local_engines_at_zero_and_openai_at_list_prices():
    prices = prices_parse("")

    assert prices.llm_usd(kind="echo", prompt_tokens=10_000, completion_tokens=10_000) == 0
    assert prices.stt_usd(kind="faster_whisper", audio_seconds=600) == 0
    assert prices.tts_usd(kind="piper", audio_seconds=600) == 0
    # gpt-4o-mini: $0.15 / 1M in, $0.60 / 1M out
    assert prices.llm_usd(kind="openai", prompt_tokens=1000, completion_tokens=500) == Decimal(
        "0.00045"
    )
    assert prices.stt_usd(kind="openai", audio_seconds=90) == Decimal("0.0045")  # $0.003 / min
    assert prices.tts_usd(kind="openai", audio_seconds=30) == Decimal("0.0075")  # $0.015 / min


def test_every_engine_the_registry_knows_has_a_default_price():
    assert costs.prices_missing() == []


def test_a_setting_overrides_one_kind_and_keeps_the_other_defaults():
    prices = prices_parse('{"llm": {"openai": {"in_per_1m": 2.5, "out_per_1m": 10}}}')

    assert prices.llm_usd(kind="openai", prompt_tokens=1_000_000, completion_tokens=0) == Decimal(
        "2.5"
    )
    assert prices.llm_usd(kind="openai", prompt_tokens=0, completion_tokens=100) == Decimal("0.001")
    assert prices.stt_usd(kind="openai", audio_seconds=60) == Decimal("0.003")  # default kept


def test_a_new_kind_can_be_priced_and_an_unpriced_kind_costs_nothing():
    prices = prices_parse('{"tts": {"elevenlabs": {"per_minute": 0.3}}}')

    assert prices.tts_usd(kind="elevenlabs", audio_seconds=120) == Decimal("0.6")
    assert prices.tts_usd(kind="nobody-priced-me", audio_seconds=120) == 0
    assert prices.missing({"tts": ["elevenlabs", "nobody-priced-me"]}) == ["tts:nobody-priced-me"]


def test_costs_are_rounded_to_the_stored_places():
    prices = prices_parse('{"llm": {"echo": {"in_per_1m": 0.15, "out_per_1m": 0}}}')

    # 1 token at $0.15 / 1M = 0.00000015, stored with 8 places
    assert prices.llm_usd(kind="echo", prompt_tokens=1, completion_tokens=0) == Decimal(
        "0.00000015"
    )
    assert prices.llm_usd(kind="echo", prompt_tokens=0, completion_tokens=0) == Decimal("0E-8")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("{not json", "COST_PRICES is not valid JSON"),
        ("[1, 2]", "COST_PRICES must be a JSON object of stages (stt, llm, tts), got list"),
        ('{"lmm": {}}', "COST_PRICES: unknown stage 'lmm'; known: stt, llm, tts"),
        ('{"llm": []}', "COST_PRICES llm: expected an object of engine kinds"),
        ('{"llm": {"openai": 0.15}}', "COST_PRICES llm.openai: expected an object with"),
        (
            '{"llm": {"openai": {"in_per_1m": 0.15}}}',
            "COST_PRICES llm.openai: expected exactly in_per_1m, out_per_1m, got in_per_1m",
        ),
        (
            '{"stt": {"openai": {"per_minute": 0.003, "per_hour": 1}}}',
            "COST_PRICES stt.openai: expected exactly per_minute, got per_hour, per_minute",
        ),
        (
            '{"tts": {"openai": {"per_minute": "0.015"}}}',
            "COST_PRICES tts.openai.per_minute: expected a number of US dollars, got '0.015'",
        ),
        (
            '{"tts": {"openai": {"per_minute": true}}}',
            "COST_PRICES tts.openai.per_minute: expected a number of US dollars, got True",
        ),
        (
            '{"tts": {"openai": {"per_minute": -1}}}',
            "COST_PRICES tts.openai.per_minute: a price must be a finite number >= 0, got -1",
        ),
        (
            '{"tts": {"openai": {"per_minute": NaN}}}',
            "COST_PRICES tts.openai.per_minute: a price must be a finite number >= 0, got nan",
        ),
        (
            '{"tts": {"openai": {"per_minute": Infinity}}}',
            "COST_PRICES tts.openai.per_minute: a price must be a finite number >= 0, got inf",
        ),
    ],
)
def test_a_malformed_setting_is_refused_with_what_is_wrong(raw, message):
    with pytest.raises(PriceError) as refused:
        prices_parse(raw)

    assert str(refused.value).startswith(message)


def test_no_process_starts_on_malformed_prices():
    # given the settings of a real process, with a typo in a price's field
    env = {**os.environ, "COST_PRICES": '{"llm": {"openai": {"in_per_1m": 1, "out_per_m": 2}}}'}
    env["DJANGO_SETTINGS_MODULE"] = "config.settings"

    # when Django starts (as Daphne, a worker or manage.py does)
    started = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=django_settings.BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    # then it stops, saying what is wrong
    assert started.returncode != 0
    assert "ImproperlyConfigured" in started.stderr
    assert (
        "COST_PRICES llm.openai: expected exactly in_per_1m, out_per_1m, got in_per_1m, out_per_m"
        in started.stderr
    )


# --- Stored on each turn -----------------------------------------------------------------


@pytest.fixture
def priced(settings):
    settings.COST_PRICES = OPENAI


@pytest.fixture
def conversation(db):
    return ConversationFactory()


def finalize(conversation, *, start_ms=1000, end_ms=5500, provider="faster_whisper"):
    return transcript_finalize(
        conversation_id=conversation.id,
        utterance_id=f"u-{uuid.uuid4().hex[:8]}",
        text="What does it cost?",
        confidence=0.9,
        start_ms=start_ms,
        end_ms=end_ms,
        speech_end_at=None,
        provider=provider,
    )


@pytest.mark.django_db
def test_a_voice_turn_stores_its_audio_seconds_and_their_cost(priced, conversation):
    before = cost_metric("stt", "faster_whisper")

    message = finalize(conversation, start_ms=1000, end_ms=5500)

    stored = Message.objects.get(pk=message.id)
    assert stored.stt_audio_seconds == 4.5
    assert stored.cost_usd == Decimal("0.00045")  # 4.5 s at $0.006 / min
    assert cost_metric("stt", "faster_whisper") - before == pytest.approx(0.00045)
    assert usage_of(conversation.user)[0] == 4.5  # and the day's usage


@pytest.mark.django_db
def test_a_redelivered_final_is_not_counted_twice(priced, conversation):
    first = finalize(conversation)
    before = cost_metric("stt", "faster_whisper")

    again = transcript_finalize(
        conversation_id=conversation.id,
        utterance_id=first.segment.utterance_id,
        text="What does it cost?",
        confidence=0.9,
        start_ms=1000,
        end_ms=5500,
        speech_end_at=None,
        provider="faster_whisper",
    )

    assert again is not None and again.id == first.id
    assert cost_metric("stt", "faster_whisper") == before
    assert Message.objects.get(pk=first.id).cost_usd == Decimal("0.00045")


@pytest.mark.django_db
def test_a_reply_adds_its_tokens_cost_to_the_speech_already_counted(priced, conversation):
    # given a reply whose first part was spoken before the reply finished
    reply = reply_begin(conversation_id=conversation.id, provider="echo")
    reply_speech_add(reply_id=reply.id, tts_kind="espeak", audio_seconds=2.0)
    before = cost_metric("llm", "echo")

    # when it finishes: 1000 tokens in at $1 / 1M, 250 out at $4 / 1M
    reply_finish(
        reply=reply,
        text="It costs little.",
        status=Message.Status.COMPLETE,
        prompt_tokens=1000,
        completion_tokens=250,
        final_to_first_token_ms=100,
        reply_total_ms=400,
    )
    reply_speech_add(reply_id=reply.id, tts_kind="espeak", audio_seconds=1.0)

    # then both parts' speech (3 s at $0.6 / min = 0.03) and the tokens (0.002) are counted
    stored = Message.objects.get(pk=reply.id)
    assert stored.tts_audio_seconds == 3.0
    assert stored.cost_usd == Decimal("0.032")
    assert (stored.prompt_tokens, stored.completion_tokens) == (1000, 250)
    assert cost_metric("llm", "echo") - before == pytest.approx(0.002)


@pytest.mark.django_db
def test_an_interrupted_reply_still_pays_its_tokens(priced, conversation):
    reply = reply_begin(conversation_id=conversation.id, provider="echo")

    reply_finish(
        reply=reply,
        text="It cos",
        status=Message.Status.INTERRUPTED,
        prompt_tokens=500,
        completion_tokens=0,
        final_to_first_token_ms=None,
        reply_total_ms=None,
    )

    assert Message.objects.get(pk=reply.id).cost_usd == Decimal("0.0005")


@pytest.mark.django_db
def test_the_tts_worker_counts_each_parts_speech_on_its_reply(priced, conversation, monkeypatch):
    # given a reply, and the real espeak engine
    monkeypatch.setattr(pipeline_services, "publish", lambda conversation_id, message: None)
    reply = reply_begin(conversation_id=conversation.id, provider="echo")
    before = cost_metric("tts", "espeak")

    # when the worker speaks two of its parts
    for index, text in enumerate(["Hello there.", "It costs almost nothing at all."]):
        synthesize_sentence(
            sentence=SentenceToSpeak(
                conversation_id=str(conversation.id),
                reply_id=str(reply.id),
                index=index,
                text=text,
                tts_kind="espeak",
            )
        )

    # then the reply holds their seconds, priced at $0.6 / min
    stored = Message.objects.get(pk=reply.id)
    assert 1.0 < stored.tts_audio_seconds < 10.0
    expected = costs.prices().tts_usd(kind="espeak", audio_seconds=stored.tts_audio_seconds)
    assert abs(stored.cost_usd - expected) <= Decimal("0.00000002")  # two parts, each rounded
    assert cost_metric("tts", "espeak") - before == pytest.approx(float(stored.cost_usd))
