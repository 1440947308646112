"""EchoLLM: the deterministic STAND-IN for a chat model.

With neither an LLM endpoint nor the offline model (`local` kind, `manage.py
serve_llm`, which `make run` starts) configured, the pipeline runs on this engine, as
the tests that need determinism do. It does not think: it repeats the last thing the
user said, streamed word by word with a small delay so the rest of the pipeline
(sentence splitting, TTS, barge-in) behaves as it would with a real model. Set
LLM_BASE_URL / LLM_API_KEY (LLM_KIND=openai) to talk to a real model."""

import asyncio
import re
from collections.abc import AsyncIterator

from .base import ReplyRequest, ReplyStream, ReplyUsage, approx_tokens, prompt_text

TOKEN_DELAY_S = 0.02
MAX_ECHO_WORDS = 60


def echo_reply_text(request: ReplyRequest) -> str:
    said = next((m.content for m in reversed(request.history) if m.role == "user"), "")
    words = said.split()
    if not words:
        return "(echo) I did not catch anything. I am the offline stand-in, not a real model."
    quoted = " ".join(words[:MAX_ECHO_WORDS]) + (" ..." if len(words) > MAX_ECHO_WORDS else "")
    return f'(echo) You said: "{quoted}". I am the offline stand-in, not a real model.'


class EchoLLM:
    kind = "echo"

    def stream_reply(self, request: ReplyRequest) -> ReplyStream:
        usage = ReplyUsage()
        return ReplyStream(deltas=self._deltas(request, usage), usage=usage)

    async def _deltas(self, request: ReplyRequest, usage: ReplyUsage) -> AsyncIterator[str]:
        text = echo_reply_text(request)
        for i, token in enumerate(re.findall(r"\S+\s*", text)):
            if i:
                await asyncio.sleep(TOKEN_DELAY_S)
            yield token
        usage.prompt_tokens = approx_tokens(prompt_text(request))
        usage.completion_tokens = approx_tokens(text)
