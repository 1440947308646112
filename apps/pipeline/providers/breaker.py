"""A circuit breaker per process and per provider endpoint (stage + base URL).

After LLM_BREAKER_FAILURES calls in a row have failed, the circuit opens for
LLM_BREAKER_COOLDOWN_S: calls fail at once with the stage's ProviderError
("circuit open") and the provider is not asked. The first call after the
cooldown is a trial (half-open; other calls still fail fast meanwhile): its
success closes the circuit, its failure opens it for another cooldown. A call
counts once, after its own retries. State is per process (each web process and
worker finds out for itself) and shown by parley_provider_circuit_state."""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

from django.conf import settings

from apps.observability import metrics

from .base import ProviderError

log = logging.getLogger(__name__)

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"


@dataclass
class Breaker:
    stage: str  # stt, llm, tts: the error code is f"{stage}_unavailable"
    engine: str
    endpoint: str
    state: str = CLOSED
    failures: int = 0  # in a row
    opened_at: float = 0.0  # time.monotonic()
    trial: bool = False  # a half-open trial call is out
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def allow(self) -> None:
        """Before a call: raises ProviderError when the circuit is open (or its
        trial call is out), else lets the call go."""
        with self._lock:
            if self.state == OPEN:
                if time.monotonic() - self.opened_at < settings.LLM_BREAKER_COOLDOWN_S:
                    raise self._refusal()
                self._become(HALF_OPEN)
            if self.state == HALF_OPEN:
                if self.trial:
                    raise self._refusal()
                self.trial = True

    def succeeded(self) -> None:
        with self._lock:
            self.failures, self.trial = 0, False
            if self.state != CLOSED:
                self._become(CLOSED)

    def failed(self) -> None:
        with self._lock:
            self.failures += 1
            self.trial = False
            threshold = settings.LLM_BREAKER_FAILURES
            if self.state == HALF_OPEN or (threshold > 0 and self.failures >= threshold):
                self.opened_at = time.monotonic()
                if self.state != OPEN:
                    self._become(OPEN)

    def released(self) -> None:
        """A call that ended neither way (the user stopped it): a trial may go again."""
        with self._lock:
            self.trial = False

    def _refusal(self) -> ProviderError:
        return ProviderError(f"{self.stage}_unavailable", f"circuit open ({self.endpoint})")

    def _become(self, state: str) -> None:
        was, self.state = self.state, state
        metrics.circuit_state(stage=self.stage, engine=self.engine, state=state)
        if state == OPEN:
            log.warning(
                "circuit of %s %s opened after %d failures in a row: calls fail fast for %s s (%s)",
                self.stage, self.engine, self.failures, settings.LLM_BREAKER_COOLDOWN_S,
                self.endpoint,
            )  # fmt: skip
        elif state == CLOSED:
            log.warning("circuit of %s %s closed (%s, was %s)", self.stage, self.engine,
                        self.endpoint, was)  # fmt: skip
        else:
            log.info("circuit of %s %s half-open: one trial call (%s)", self.stage,
                     self.engine, self.endpoint)  # fmt: skip


_breakers: dict[tuple[str, str], Breaker] = {}
_lock = threading.Lock()


def breaker_for(*, stage: str, engine: str, endpoint: str) -> Breaker:
    """This process's breaker of an endpoint (`endpoint` "" for the vendor's default)."""
    key = (stage, endpoint)
    with _lock:
        breaker = _breakers.get(key)
        if breaker is None:
            # Logged by host and port only: a URL may carry credentials.
            where = urllib.parse.urlsplit(endpoint).netloc.rpartition("@")[2] or "default"
            breaker = _breakers[key] = Breaker(stage=stage, engine=engine, endpoint=where)
            metrics.circuit_state(stage=stage, engine=engine, state=CLOSED)
        return breaker
