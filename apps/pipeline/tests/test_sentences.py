import random
import re

import pytest

from apps.pipeline.providers.base import ChatMessage, ReplyRequest
from apps.pipeline.providers.echo import echo_reply_text
from apps.pipeline.sentences import MIN_CHARS, SentenceSplitter

TEXTS = [
    "Hello there, traveller. The tide is turning! Shall we set sail? Aye.",
    "Hi. Ok. That is a short start, joined to what follows. Then more.",
    'He shouted "Stop right there!" and everyone froze. Then (quietly) they left.',
    "Wait… what was that noise? I heard it too.\nA new line starts here\n\nand another one.",
    "Pi is about 3.14159 and e is about 2.71828. Both are irrational numbers.",
    "No punctuation at all in this reply so it all comes out at the end",
    "Mr. Quilter is the apostle of the middle classes. We are glad to welcome his gospel.",
    "Trailing spaces after the end.   ",
    echo_reply_text(
        ReplyRequest("p", [ChatMessage("user", "What's the weather like?")], "m", 0.5, 9)
    ),
]


def all_at_once(text: str) -> list[str]:
    splitter = SentenceSplitter()
    return splitter.feed(text) + splitter.flush()


def streamed(pieces: list[str]) -> list[str]:
    splitter = SentenceSplitter()
    sentences = []
    for piece in pieces:
        sentences += splitter.feed(piece)
    return sentences + splitter.flush()


def word_tokens(text: str) -> list[str]:
    """How the echo LLM (and most models) stream: a word and its trailing space."""
    return re.findall(r"\S+\s*|\s+", text)


def random_pieces(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    pieces, i = [], 0
    while i < len(text):
        n = rng.randint(1, 6)
        pieces.append(text[i : i + n])
        i += n
    return pieces


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_token_by_token_gives_the_same_sentences_as_all_at_once(text):
    expected = all_at_once(text)

    assert streamed(word_tokens(text)) == expected
    assert streamed(list(text)) == expected  # character by character
    for seed in range(20):
        assert streamed(random_pieces(text, seed)) == expected


@pytest.mark.parametrize("text", TEXTS)
def test_sentences_keep_every_word_in_order(text):
    assert " ".join(all_at_once(text)).split() == text.split()


def test_sentences_are_cut_at_end_punctuation():
    assert all_at_once("The tide is turning! Shall we set sail now? Yes, let us go.") == [
        "The tide is turning!",
        "Shall we set sail now?",
        "Yes, let us go.",
    ]


def test_a_sentence_is_given_out_as_soon_as_it_is_complete():
    splitter = SentenceSplitter()

    assert splitter.feed("The tide is turning!") == []  # could be "!!" or '!"' next
    assert splitter.feed(" Sha") == ["The tide is turning!"]
    assert splitter.feed("ll we?") == []
    assert splitter.flush() == ["Shall we?"]


def test_short_fragments_join_the_next_sentence():
    sentences = all_at_once("Hi. Ok. That is a longer sentence now. Bye.")

    assert sentences == ["Hi. Ok. That is a longer sentence now.", "Bye."]
    assert all(len(s) >= MIN_CHARS for s in sentences[:-1])


def test_closing_quotes_and_brackets_stay_with_their_sentence():
    assert all_at_once('She said "it is done." (And it was done.) The end came.') == [
        'She said "it is done."',
        "(And it was done.)",
        "The end came.",
    ]


def test_newlines_end_a_sentence_without_punctuation():
    assert all_at_once("First line of a list\n\nSecond line of a list\nthird") == [
        "First line of a list",
        "Second line of a list",
        "third",
    ]


def test_decimals_do_not_split():
    assert all_at_once("It costs 3.50 euros today. Cheap.") == [
        "It costs 3.50 euros today.",
        "Cheap.",
    ]


def test_flush_returns_the_rest_once():
    splitter = SentenceSplitter()
    splitter.feed("A whole sentence here. And the rest")

    assert splitter.flush() == ["And the rest"]
    assert splitter.flush() == []


def test_flush_of_whitespace_is_nothing():
    splitter = SentenceSplitter()
    splitter.feed("  \n ")

    assert splitter.flush() == []
