"""Chat replies from any OpenAI-compatible /v1/chat/completions endpoint, streamed.

Each attempt is bounded by LLM_TIMEOUT_S (with LLM_MAX_RETRIES retries done by the
client) and the whole reply, first byte to last token, by LLM_DEADLINE_S."""

import asyncio
import weakref
from collections.abc import AsyncIterator

import openai
from django.conf import settings
from openai.types.chat import ChatCompletionMessageParam

from apps.observability.metrics import async_retry_hook

from .base import ChatMessage, ProviderError, ReplyRequest, ReplyStream, ReplyUsage


def _provider_error(exc: BaseException) -> ProviderError:
    # Order matters: RateLimitError is an APIStatusError, APITimeoutError an
    # APIConnectionError.
    if isinstance(exc, openai.RateLimitError):
        return ProviderError("llm_rate_limited", "The language model is busy; try again shortly.")
    if isinstance(exc, openai.APITimeoutError | TimeoutError):
        return ProviderError("llm_timeout", "The language model took too long to answer.")
    if isinstance(exc, openai.APIStatusError):
        return ProviderError(
            "llm_unavailable", f"The language model failed (HTTP {exc.status_code})."
        )
    return ProviderError("llm_unavailable", f"The language model is unreachable: {exc}")


def _message(message: ChatMessage) -> ChatCompletionMessageParam:
    # History holds Message.Role values ("user", "assistant").
    if message.role == "assistant":
        return {"role": "assistant", "content": message.content}
    if message.role == "system":
        return {"role": "system", "content": message.content}
    return {"role": "user", "content": message.content}


class OpenAILLM:
    kind = "openai"

    def __init__(self) -> None:
        self.base_url = settings.LLM_BASE_URL or None
        self.api_key = settings.LLM_API_KEY or "missing"
        self.timeout_s = settings.LLM_TIMEOUT_S
        self.max_retries = settings.LLM_MAX_RETRIES
        self.deadline_s = settings.LLM_DEADLINE_S
        # httpx clients bind to the event loop they are first used on: one per loop.
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, openai.AsyncOpenAI]
        self._clients = weakref.WeakKeyDictionary()

    def client(self) -> openai.AsyncOpenAI:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = openai.AsyncOpenAI(
                base_url=self.base_url,
                api_key=self.api_key,
                timeout=self.timeout_s,
                max_retries=self.max_retries,
                http_client=openai.DefaultAsyncHttpxClient(  # retries counted
                    event_hooks={"request": [async_retry_hook("llm", self.kind)]}
                ),
            )
            self._clients[loop] = client
        return client

    def stream_reply(self, request: ReplyRequest) -> ReplyStream:
        usage = ReplyUsage()
        return ReplyStream(deltas=self._deltas(request, usage), usage=usage)

    async def _deltas(self, request: ReplyRequest, usage: ReplyUsage) -> AsyncIterator[str]:
        messages = [_message(m) for m in request.history]
        if request.system_prompt:
            messages.insert(0, {"role": "system", "content": request.system_prompt})
        # The deadline wraps each await, never a yield, so it holds whichever task
        # iterates and however slowly the consumer reads.
        deadline = asyncio.get_running_loop().time() + self.deadline_s
        stream = None
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
            chunks = aiter(stream)
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                if chunk.usage is not None:
                    usage.prompt_tokens = chunk.usage.prompt_tokens or 0
                    usage.completion_tokens = chunk.usage.completion_tokens or 0
                for choice in chunk.choices:
                    if choice.delta is not None and choice.delta.content:
                        yield choice.delta.content
        except (openai.OpenAIError, TimeoutError) as exc:
            raise _provider_error(exc) from exc
        finally:
            if stream is not None:
                await stream.close()
