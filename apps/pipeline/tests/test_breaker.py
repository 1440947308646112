import time

import pytest

from apps.observability.metrics import PROVIDER_CIRCUIT
from apps.pipeline.providers import breaker
from apps.pipeline.providers.base import ProviderError


@pytest.fixture
def circuit(settings):
    settings.LLM_BREAKER_FAILURES = 3
    settings.LLM_BREAKER_COOLDOWN_S = 0.2
    yield breaker.Breaker(stage="tts", engine="openai", endpoint="127.0.0.1:1")


def gauge() -> float:
    return PROVIDER_CIRCUIT.labels("tts", "openai")._value.get()


def fail(circuit: breaker.Breaker, times: int) -> None:
    for _ in range(times):
        circuit.allow()
        circuit.failed()


def test_it_opens_after_n_failures_in_a_row_and_then_refuses_at_once(circuit):
    fail(circuit, 2)
    circuit.allow()
    circuit.succeeded()  # a success in between: the count starts again
    fail(circuit, 2)
    assert circuit.state == breaker.CLOSED

    fail(circuit, 1)

    assert circuit.state == breaker.OPEN and gauge() == 2
    with pytest.raises(ProviderError) as refused:
        circuit.allow()
    assert refused.value.code == "tts_unavailable"
    assert "circuit open" in refused.value.detail
    assert refused.value.message == "Speech synthesis failed."


def test_after_the_cooldown_one_trial_goes_and_its_success_closes_it(circuit, caplog):
    fail(circuit, 3)
    time.sleep(0.25)

    circuit.allow()  # the trial
    assert circuit.state == breaker.HALF_OPEN and gauge() == 1
    with pytest.raises(ProviderError):
        circuit.allow()  # only one trial at a time
    circuit.succeeded()

    assert circuit.state == breaker.CLOSED and gauge() == 0
    circuit.allow()
    messages = [r.getMessage() for r in caplog.records]
    assert any("circuit of tts openai opened after 3 failures" in m for m in messages)
    assert any("circuit of tts openai closed" in m for m in messages)


def test_a_failed_trial_opens_it_for_another_cooldown(circuit):
    fail(circuit, 3)
    time.sleep(0.25)

    circuit.allow()
    circuit.failed()

    assert circuit.state == breaker.OPEN
    with pytest.raises(ProviderError):
        circuit.allow()


def test_a_trial_that_was_stopped_lets_the_next_call_try(circuit):
    fail(circuit, 3)
    time.sleep(0.25)
    circuit.allow()

    circuit.released()

    circuit.allow()  # not refused
    assert circuit.state == breaker.HALF_OPEN


def test_zero_failures_never_opens(circuit, settings):
    settings.LLM_BREAKER_FAILURES = 0

    fail(circuit, 10)

    assert circuit.state == breaker.CLOSED


def test_one_breaker_per_stage_and_endpoint_logged_without_credentials():
    one = breaker.breaker_for(stage="llm", engine="openai", endpoint="http://u:secret@h:1/v1")
    again = breaker.breaker_for(stage="llm", engine="openai", endpoint="http://u:secret@h:1/v1")
    other = breaker.breaker_for(stage="stt", engine="openai", endpoint="http://u:secret@h:1/v1")

    assert one is again and one is not other
    assert one.endpoint == "h:1"
