"""Chat replies from any OpenAI-compatible /v1/chat/completions endpoint, streamed.

Each attempt is bounded by LLM_TIMEOUT_S and the whole reply, first byte to last
token, by LLM_DEADLINE_S. An attempt that fails before its first token (429, 5xx,
408/409, a timeout, an unreachable endpoint, a stream that breaks or is malformed)
is retried, at most LLM_MAX_RETRIES times, after the SDK's backoff (0.5 s, 1 s, 2 s …
less up to 25 % jitter) or, for a `Retry-After`, that long plus up to 25 %; never past
the deadline. Once a token has reached the user nothing is retried: the error ends
the reply. Every failure ends as a ProviderError, and the endpoint's circuit breaker
(breaker.py) counts each reply's outcome once."""

import asyncio
import logging
import random
from collections.abc import AsyncIterator

import openai
from django.conf import settings
from openai.types.chat import ChatCompletionMessageParam

from apps.observability import metrics
from apps.realtime.per_loop import PerLoop

from .base import ChatMessage, ProviderError, ReplyRequest, ReplyStream, ReplyUsage
from .breaker import breaker_for

log = logging.getLogger(__name__)

RETRY_BASE_S = 0.5  # the openai SDK's backoff, kept for our own retries
RETRY_MAX_S = 8.0


class AttemptFailed(Exception):
    """One attempt's failure: the client's error, whether another attempt may
    succeed, and the wait the server asked for (Retry-After), if any."""

    def __init__(self, error: ProviderError, *, retryable: bool, retry_after: float | None = None):
        super().__init__(error.detail)
        self.error = error
        self.retryable = retryable
        self.retry_after = retry_after


def _retry_after(response) -> float | None:
    """Retry-After(-ms) in seconds, when it is a number."""
    headers = getattr(response, "headers", None) or {}
    for name, divisor in (("retry-after-ms", 1000), ("retry-after", 1)):
        try:
            return max(0.0, float(headers[name]) / divisor)
        except (KeyError, ValueError):
            continue
    return None


def _attempt_failed(exc: BaseException) -> AttemptFailed:
    # Order matters: RateLimitError is an APIStatusError, APITimeoutError an
    # APIConnectionError.
    if isinstance(exc, openai.RateLimitError):
        error = ProviderError("llm_rate_limited", f"HTTP 429: {exc}")
        return AttemptFailed(error, retryable=True, retry_after=_retry_after(exc.response))
    if isinstance(exc, openai.APITimeoutError | TimeoutError):
        return AttemptFailed(ProviderError("llm_timeout", f"timed out: {exc!r}"), retryable=True)
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        error = ProviderError("llm_unavailable", f"HTTP {status}: {exc}")
        retryable = status >= 500 or status in (408, 409)
        return AttemptFailed(error, retryable=retryable, retry_after=_retry_after(exc.response))
    if isinstance(exc, openai.APIConnectionError):  # unreachable, or the stream was cut
        cause = exc.__cause__ or exc.__context__
        return AttemptFailed(
            ProviderError("llm_unavailable", f"connection failed: {exc!r} ({cause!r})"),
            retryable=True,
        )
    # The SDK's own error events in a stream, and what a malformed one raises while it
    # is read (a data line that is not JSON: json.JSONDecodeError).
    return AttemptFailed(ProviderError("llm_unavailable", f"bad stream: {exc!r}"), retryable=True)


def _message(message: ChatMessage) -> ChatCompletionMessageParam:
    # History holds Message.Role values ("user", "assistant").
    if message.role == "assistant":
        return {"role": "assistant", "content": message.content}
    if message.role == "system":
        return {"role": "system", "content": message.content}
    return {"role": "user", "content": message.content}


def _chunk_read(chunk, usage: ReplyUsage) -> tuple[list[str], bool]:
    """A chunk's text deltas and whether it ends the reply; usage filled in.
    The SDK does not check a chunk's shape: a wrong one is a malformed stream."""
    choices = getattr(chunk, "choices", None)
    if not isinstance(choices, list):
        raise ValueError(f"a chunk without a list of choices: {chunk!r:.200}")
    if chunk.usage is not None:
        usage.prompt_tokens = chunk.usage.prompt_tokens or 0
        usage.completion_tokens = chunk.usage.completion_tokens or 0
    deltas, finished = [], False
    for choice in choices:
        delta = getattr(choice, "delta", None)
        content = getattr(delta, "content", None) if delta is not None else None
        if content is not None and not isinstance(content, str):
            raise ValueError(f"a chunk whose content is not text: {chunk!r:.200}")
        if content:
            deltas.append(content)
        finished = finished or bool(getattr(choice, "finish_reason", None))
    return deltas, finished or (not choices and chunk.usage is not None)


class OpenAILLM:
    kind = "openai"

    def __init__(self, *, base_url: str | None = None, api_key: str | None = None) -> None:
        self.base_url = base_url or settings.LLM_BASE_URL or None
        self.api_key = api_key or settings.LLM_API_KEY or "missing"
        self.timeout_s = settings.LLM_TIMEOUT_S
        self.max_retries = settings.LLM_MAX_RETRIES
        self.deadline_s = settings.LLM_DEADLINE_S
        self.breaker = breaker_for(stage="llm", engine=self.kind, endpoint=self.base_url or "")
        self._clients = PerLoop(
            lambda: openai.AsyncOpenAI(
                base_url=self.base_url,
                api_key=self.api_key,
                timeout=self.timeout_s,
                max_retries=0,  # retried here, where a stream that breaks early is retried too
            )
        )

    def client(self) -> openai.AsyncOpenAI:
        return self._clients.get()

    def stream_reply(self, request: ReplyRequest) -> ReplyStream:
        usage = ReplyUsage()
        return ReplyStream(deltas=self._deltas(request, usage), usage=usage)

    async def _deltas(self, request: ReplyRequest, usage: ReplyUsage) -> AsyncIterator[str]:
        """The reply's deltas, through the circuit breaker: the first token closes
        it (a half-open trial succeeded), a ProviderError counts as a failure."""
        self.breaker.allow()
        outcome = ""
        try:
            async for delta in self._attempts(request, usage):
                if not outcome:
                    outcome = "ok"
                    self.breaker.succeeded()
                yield delta
            if not outcome:  # an empty reply is an answer too
                outcome = "ok"
                self.breaker.succeeded()
        except ProviderError:
            outcome = "failed"
            self.breaker.failed()
            raise
        finally:
            if not outcome:  # stopped before the first token
                self.breaker.released()

    async def _attempts(self, request: ReplyRequest, usage: ReplyUsage) -> AsyncIterator[str]:
        messages = [_message(m) for m in request.history]
        if request.system_prompt:
            messages.insert(0, {"role": "system", "content": request.system_prompt})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.deadline_s
        attempt = 0
        while True:
            streamed = False
            try:
                async for delta in self._attempt(request, messages, usage, deadline):
                    streamed = True
                    yield delta
                return
            except AttemptFailed as failed:
                delay = None if streamed else self._retry_delay(failed, attempt, deadline)
                if delay is None:
                    raise failed.error from failed
                log.info(
                    "LLM attempt %d failed (%s), retrying in %.2f s: %s",
                    attempt + 1, failed.error.code, delay, failed.error.detail,
                )  # fmt: skip
            metrics.provider_retried(stage="llm", engine=self.kind)
            attempt += 1
            await asyncio.sleep(delay)

    def _retry_delay(self, failed: AttemptFailed, attempt: int, deadline: float) -> float | None:
        """How long to wait before the next attempt; None: do not retry."""
        if not failed.retryable or attempt >= self.max_retries:
            return None
        if failed.retry_after:
            delay = failed.retry_after * (1 + 0.25 * random.random())  # never sooner
        else:
            delay = min(RETRY_BASE_S * 2**attempt, RETRY_MAX_S) * (1 - 0.25 * random.random())
        if asyncio.get_running_loop().time() + delay >= deadline:
            return None  # it would not fit before the deadline: fail now
        return delay

    async def _attempt(self, request: ReplyRequest, messages, usage, deadline: float):
        """One request's deltas; any failure as AttemptFailed. The deadline wraps
        each await, never a yield, so it holds whichever task iterates and however
        slowly the consumer reads."""
        stream = None
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    stream = await self.client().chat.completions.create(
                        model=request.model,
                        messages=messages,
                        temperature=request.temperature,
                        max_tokens=request.max_tokens,
                        stream=True,
                        stream_options={"include_usage": True},
                    )
            except Exception as exc:
                raise _attempt_failed(exc) from exc
            chunks = aiter(stream)
            finished = False
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        chunk = await anext(chunks)
                    deltas, ends = _chunk_read(chunk, usage)
                except StopAsyncIteration:
                    break
                except Exception as exc:  # cut, malformed, timed out: the provider's fault
                    raise _attempt_failed(exc) from exc
                finished = finished or ends
                for delta in deltas:
                    yield delta
            if not finished:
                error = ProviderError("llm_unavailable", "the stream ended before its last chunk")
                raise AttemptFailed(error, retryable=True)
        finally:
            if stream is not None:
                try:
                    await stream.close()
                except Exception as exc:  # a broken connection may fail to close too
                    log.debug("closing the LLM stream failed: %r", exc)
