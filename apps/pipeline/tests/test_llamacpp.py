"""The offline model's runtime (apps/pipeline/llamacpp.py): the installed llama.cpp
CPU library and SmolLM2 weights, loaded for real in this process."""

import pytest

from apps.pipeline import llamacpp
from apps.pipeline.llamacpp import Generation, LocalModel

CHAT = [
    {"role": "system", "content": "You are Ada, a friendly café owner."},
    {"role": "user", "content": "Hello! How is your day going?"},
]


@pytest.fixture(scope="module")
def model() -> LocalModel:
    return LocalModel(context_tokens=512, threads=1)


def test_the_library_loads_without_the_package_import_and_without_transformers():
    import sys

    llamacpp.library()

    assert "llama" not in sys.modules  # its __init__ (transformers, hub downloads) never ran
    assert "transformers" not in sys.modules


def test_the_prompt_is_the_models_own_chat_template_ready_for_the_assistant(model):
    prompt = model.prompt(CHAT)

    assert prompt.index("You are Ada") < prompt.index("Hello! How is your day going?")
    assert prompt.rstrip().endswith("assistant")  # ChatML: <|im_start|>assistant
    assert "<|im_start|>system" in prompt


def test_greedy_generation_is_repeatable_and_counts_its_tokens(model):
    first, second = Generation(), Generation()

    one = "".join(model.generate(CHAT, max_tokens=20, result=first))
    two = "".join(model.generate(CHAT, max_tokens=20, result=second))

    assert one == two and one.strip()
    assert first.prompt_tokens == len(model.tokenize(model.prompt(CHAT))) > 10
    assert 0 < first.completion_tokens <= 20
    assert first.finish_reason in ("stop", "length")


def test_max_tokens_ends_a_reply_with_length(model):
    result = Generation()

    "".join(model.generate(CHAT, max_tokens=3, result=result))

    assert (result.completion_tokens, result.finish_reason) == (3, "length")


def test_stopped_ends_the_reply_at_the_next_token(model):
    result = Generation()
    pieces = []

    for piece in model.generate(
        CHAT, max_tokens=40, stopped=lambda: len(pieces) >= 2, result=result
    ):
        pieces.append(piece)

    assert len(pieces) == 2 and result.finish_reason == "cancelled"
    assert result.completion_tokens == 2


def test_pieces_are_whole_characters(model):
    chat = [{"role": "user", "content": "Write the word café three times: café café café"}]

    text = "".join(model.generate(chat, max_tokens=30))

    assert "\ufffd" not in text


def test_a_prompt_past_the_context_is_refused_before_anything_runs(model):
    chat = [{"role": "user", "content": "word " * 600}]
    result = Generation()

    with pytest.raises(ValueError, match="context of 512"):
        list(model.generate(chat, max_tokens=10, result=result))
    assert result.completion_tokens == 0


def test_missing_weights_are_a_clear_error():
    with pytest.raises(llamacpp.LocalModelMissing, match="not installed"):
        llamacpp.package_file("no-such-model-package", "weights.gguf")


def test_a_conversations_next_turn_reuses_its_prompt_and_answers_the_same(model):
    fresh = LocalModel(context_tokens=512, threads=1)
    first = "".join(model.generate(CHAT, max_tokens=12))
    follow_up = CHAT + [
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And what do you bake?"},
    ]
    reused, anew = Generation(), Generation()

    kept = "".join(model.generate(follow_up, max_tokens=12, result=reused))
    fresh_text = "".join(fresh.generate(follow_up, max_tokens=12, result=anew))

    assert kept == fresh_text  # the kept keys and values change nothing
    assert reused.reused_tokens >= len(model.tokenize(model.prompt(CHAT))) - 1
    assert anew.reused_tokens == 0


def test_another_conversation_after_it_is_answered_as_by_a_fresh_model(model):
    other = [{"role": "user", "content": "Tell me about ships."}]
    "".join(model.generate(CHAT, max_tokens=8))
    result = Generation()

    text = "".join(model.generate(other, max_tokens=12, result=result))

    assert text == "".join(LocalModel(context_tokens=512, threads=1).generate(other, max_tokens=12))
    assert result.reused_tokens < 5  # at most the template's opening tokens
