"""The `local` LLM kind: the offline reply model (SmolLM2-135M-Instruct) through its
OpenAI-compatible endpoint, `manage.py serve_llm` at LLM_LOCAL_URL, with the same
client, retries and circuit breaker as the `openai` kind.

Made for a model this small (135 M parameters: fluent small talk, often wrong on
facts, and deaf to "keep it short"):
- the reply is capped at LLM_LOCAL_MAX_TOKENS (about 60) and cut after its second
  sentence, before TTS; the cut closes the stream, so the endpoint stops too;
- the temperature is at most LLM_LOCAL_TEMPERATURE (0.2): above it, even simple
  sums go wrong;
- the persona's system prompt gets a short instruction to stay brief, and only the
  latest HISTORY_CHARS of the conversation are sent (its context is 2,048 tokens)."""

from dataclasses import replace

from django.conf import settings

from apps.pipeline.llamacpp import MODEL_NAME

from ..sentences import sentences_at_most
from .base import ChatMessage, ReplyRequest, ReplyStream
from .openai_llm import OpenAILLM

SENTENCES = 2
HISTORY_CHARS = 1500  # about 375 tokens: ~3.4 s of prompt on one core when none is reused
BRIEF = "Answer in one or two short sentences."


def history_recent(history: list[ChatMessage], *, chars: int) -> list[ChatMessage]:
    """The latest messages that fit in `chars` (the last one always, cut to fit)."""
    kept: list[ChatMessage] = []
    room = chars
    for message in reversed(history):
        if kept and len(message.content) > room:
            break
        content = message.content[-room:] if not kept else message.content
        kept.append(ChatMessage(role=message.role, content=content))
        room -= len(content)
    return kept[::-1]


class LocalLLM(OpenAILLM):
    kind = "local"

    def __init__(self, *, base_url: str = "") -> None:
        base_url = base_url or settings.LLM_LOCAL_URL
        if not base_url:
            raise ValueError(
                "LLM kind 'local' needs LLM_LOCAL_URL, the address of `manage.py serve_llm` "
                "(make run sets it)"
            )
        super().__init__(base_url=base_url, api_key="local")

    def stream_reply(self, request: ReplyRequest) -> ReplyStream:
        system = f"{request.system_prompt.strip()}\n{BRIEF}".strip()
        small = replace(
            request,
            system_prompt=system,
            history=history_recent(request.history, chars=HISTORY_CHARS),
            model=MODEL_NAME,
            temperature=min(request.temperature, settings.LLM_LOCAL_TEMPERATURE),
            max_tokens=min(request.max_tokens, settings.LLM_LOCAL_MAX_TOKENS),
        )
        stream = super().stream_reply(small)
        return ReplyStream(deltas=sentences_at_most(stream.deltas, SENTENCES), usage=stream.usage)
