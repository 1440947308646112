"""The `local` LLM kind (providers/local_llm.py) and the sentence cap it uses: what it
asks the endpoint for, against the fake OpenAI server, whose request log shows it."""

import json

import pytest

from apps.pipeline.llamacpp import MODEL_NAME
from apps.pipeline.providers import registry
from apps.pipeline.providers.base import ChatMessage, ReplyRequest
from apps.pipeline.providers.local_llm import BRIEF, HISTORY_CHARS, LocalLLM, history_recent
from apps.pipeline.sentences import sentences_at_most
from apps.pipeline.tests import fake_openai

THREE = ["Ahoy", " there", ",", " matey", ".", " The", " sea", " is", " calm", " today", "!",
         " Shall", " we", " sail", "?"]  # fmt: skip


async def deltas_of(pieces: list[str]):
    for piece in pieces:
        yield piece


class Recorded:
    """An async iterator that notes whether it was closed."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces, self.closed = iter(pieces), False

    def __aiter__(self):
        return self

    async def __anext__(self) -> str:
        try:
            return next(self.pieces)
        except StopIteration:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        self.closed = True


async def cut(pieces, count: int) -> str:
    return "".join([d async for d in sentences_at_most(deltas_of(pieces), count)])


@pytest.mark.parametrize(
    ("pieces", "count", "kept"),
    [
        (THREE, 2, "Ahoy there, matey. The sea is calm today!"),
        (THREE, 1, "Ahoy there, matey."),
        (THREE, 5, "Ahoy there, matey. The sea is calm today! Shall we sail?"),
        (["Dr. Smith", " sails", " at", " 3.5", " knots", ".", " Yes", ".", " No."], 2,
         "Dr. Smith sails at 3.5 knots. Yes."),  # an abbreviation and a decimal end nothing
        (["No", " full", " stop", " at", " all"], 2, "No full stop at all"),
        (["One", ".", "\n\n", "Two", "!", "\n", "Three", "."], 2, "One.\n\nTwo!"),
        ([], 2, ""),
    ],
)  # fmt: skip
async def test_a_reply_is_cut_after_its_sentences(pieces, count, kept):
    assert await cut(pieces, count) == kept


async def test_the_same_text_is_cut_the_same_however_it_is_streamed():
    text = "".join(THREE)
    by_character = list(text)
    by_word = [w + " " for w in text.split(" ")]

    assert await cut(by_character, 2) == await cut(THREE, 2) == (await cut(by_word, 2)).rstrip()


async def test_a_cut_closes_the_stream_and_reads_no_further():
    stream = Recorded(THREE)

    text = "".join([d async for d in sentences_at_most(stream, 1)])

    assert text == "Ahoy there, matey." and stream.closed
    assert list(stream.pieces) == THREE[6:]  # read up to the space that ended it, no further


def test_history_keeps_the_latest_messages_that_fit():
    history = [ChatMessage("user", "a" * 50), ChatMessage("assistant", "b" * 30),
               ChatMessage("user", "c" * 20)]  # fmt: skip

    assert [m.content[0] for m in history_recent(history, chars=60)] == ["b", "c"]
    assert history_recent(history, chars=1000) == history
    [only] = history_recent([ChatMessage("user", "x" * 90 + "end")], chars=10)
    assert only.content == "xxxxxxxend"  # the last message always, its end kept


@pytest.fixture
def fake(settings):
    with fake_openai.FakeOpenAI() as server:
        settings.LLM_LOCAL_URL = server.base_url
        settings.LLM_MAX_RETRIES = 0
        settings.LLM_LOCAL_MAX_TOKENS = 60
        settings.LLM_LOCAL_TEMPERATURE = 0.2
        yield server


async def test_the_local_kind_asks_the_endpoint_for_a_short_cool_reply(fake):
    # given a persona asking for a long, hot reply and a long conversation
    fake.reply_tokens = THREE
    history = [ChatMessage("user" if i % 2 else "assistant", f"message {i} " + "x" * 400)
               for i in range(20)] + [ChatMessage("user", "Tell me a story.")]  # fmt: skip
    request = ReplyRequest(system_prompt="You are Captain Rex.", history=history,
                           model="gpt-4o", temperature=0.9, max_tokens=400)  # fmt: skip

    stream = LocalLLM().stream_reply(request)
    text = "".join([d async for d in stream.deltas])

    # then the reply stops after two sentences
    assert text == "Ahoy there, matey. The sea is calm today!"
    # and the endpoint was asked for the local model, capped, with the brief instruction
    [chat] = [r for r in fake.requests if r["path"] == "/v1/chat/completions"]
    sent = json.loads(chat["body"])
    assert sent["model"] == MODEL_NAME
    assert (sent["temperature"], sent["max_tokens"]) == (0.2, 60)
    assert sent["messages"][0] == {"role": "system", "content": f"You are Captain Rex.\n{BRIEF}"}
    assert sent["messages"][-1]["content"] == "Tell me a story."
    assert sum(len(m["content"]) for m in sent["messages"][1:]) <= HISTORY_CHARS
    assert chat["headers"]["authorization"] == "Bearer local"


async def test_a_cooler_persona_keeps_its_own_temperature(fake):
    request = ReplyRequest(system_prompt="", history=[ChatMessage("user", "Hi")],
                           model="", temperature=0.0, max_tokens=20)  # fmt: skip

    [d async for d in LocalLLM().stream_reply(request).deltas]

    sent = json.loads(fake.requests[-1]["body"])
    assert (sent["temperature"], sent["max_tokens"]) == (0.0, 20)
    assert sent["messages"][0] == {"role": "system", "content": BRIEF}


def test_the_local_kind_without_its_endpoint_is_a_clear_error(settings):
    settings.LLM_LOCAL_URL = ""

    with pytest.raises(ValueError, match="LLM_LOCAL_URL"):
        LocalLLM()


def test_the_deployment_default_is_local_when_its_endpoint_is_set(monkeypatch):
    import importlib

    import config.settings as config_settings

    for name in ("LLM_KIND", "LLM_BASE_URL", "LLM_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LLM_LOCAL_URL", "http://127.0.0.1:8088/v1")
    try:
        assert importlib.reload(config_settings).LLM_KIND == "local"
        monkeypatch.setenv("LLM_BASE_URL", "http://127.0.0.1:9/v1")
        assert importlib.reload(config_settings).LLM_KIND == "openai"
        monkeypatch.delenv("LLM_BASE_URL")
        monkeypatch.delenv("LLM_LOCAL_URL")
        assert importlib.reload(config_settings).LLM_KIND == "echo"
    finally:
        monkeypatch.undo()
        importlib.reload(config_settings)
    assert "local" in registry.LLM_KINDS
