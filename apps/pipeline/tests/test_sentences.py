import random
import re

import pytest

from apps.pipeline.providers.base import ChatMessage, ReplyRequest
from apps.pipeline.providers.echo import echo_reply_text
from apps.pipeline.sentences import (
    FIRST_CLAUSE_MIN_CHARS,
    FIRST_CLAUSE_MIN_WORDS,
    FIRST_PART_MAX_CHARS,
    LONG_SENTENCE_CHARS,
    MAX_PART_CHARS,
    MIN_CHARS,
    SentenceSplitter,
)

LONG_SENTENCE = (
    "The harbour was quiet that morning, the boats lay still on the water, the gulls "
    "sat on the posts without a sound, and the old man who kept the lighthouse walked "
    "down to the pier, as he had done every day for forty years, to look at the sea."
)

TEXTS = [
    "Hello there, traveller. The tide is turning! Shall we set sail? Aye.",
    "Hi. Ok. That is a short start, joined to what follows. Then more.",
    'He shouted "Stop right there!" and everyone froze. Then (quietly) they left.',
    "Wait… what was that noise? I heard it too.\nA new line starts here\n\nand another one.",
    "Pi is about 3.14159 and e is about 2.71828. Both are irrational numbers.",
    "No punctuation at all in this reply so it all comes out at the end",
    "Mr. Quilter is the apostle of the middle classes. We are glad to welcome his gospel.",
    "Trailing spaces after the end.   ",
    "Well, I think that it costs 3,000 dollars, or 2,500.50 on sale; ask Dr. Smith.",
    "Sure — here is the plan: we leave at 5 p.m., e.g. after tea, and J. R. R. Tolkien waits.",
    "Quick question: do you mean the 1990s — the decade — or the year 1990?",
    LONG_SENTENCE + " " + LONG_SENTENCE,
    "word " * 120,
    "Hi\nthere, this line is long enough to stand alone\n\n- and a list item, next",
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


def test_the_first_clause_is_spoken_before_its_sentence_ends():
    splitter = SentenceSplitter()

    assert splitter.feed("Sure! Here is what I think, and it") == ["Sure! Here is what I think,"]
    assert splitter.feed(" matters, a lot, to me. Then, later on, more") == [
        "and it matters, a lot, to me."  # later parts are whole sentences
    ]
    assert splitter.flush() == ["Then, later on, more"]


@pytest.mark.parametrize("boundary", [",", ";", ":", " —", " -", "—", " --"])
def test_every_clause_mark_ends_a_long_enough_first_clause(boundary):
    parts = all_at_once(f"I have been thinking about it{boundary} and here is my answer.")

    assert parts == [f"I have been thinking about it{boundary}", "and here is my answer."]


@pytest.mark.parametrize(
    "text",
    [
        "Well, I think so, yes it is.",  # "Well, I think so," is under 20 characters
        "Hmm, interesting, indeed, a good question.",  # 25 characters but 3 words
        "(echo) You said: hello there friend.",
    ],
)
def test_a_first_clause_too_short_to_stand_alone_waits_for_more(text):
    assert all_at_once(text) == [text]
    assert len("Hmm, interesting, indeed,") >= FIRST_CLAUSE_MIN_CHARS
    assert len("Hmm, interesting, indeed,".split()) < FIRST_CLAUSE_MIN_WORDS


def test_thresholds_are_the_splitters_own_and_can_be_changed():
    splitter = SentenceSplitter(first_clause_min_chars=5, first_clause_min_words=1)

    assert splitter.feed("Well, I think so.") == ["Well,"]


def test_a_comma_inside_a_number_is_no_clause_boundary():
    assert all_at_once("The total comes to 3,000,000 dollars and 2,500.50 cents today.") == [
        "The total comes to 3,000,000 dollars and 2,500.50 cents today."
    ]
    assert all_at_once("It costs 3,000 dollars, which is a lot of money.") == [
        "It costs 3,000 dollars,",
        "which is a lot of money.",
    ]


def test_abbreviations_and_initials_do_not_end_a_sentence():
    text = (
        "Yesterday I met Dr. Smith and Prof. J. Jones, e.g. at the U.S. embassy at 5 p.m. "
        "sharp. Then we left."
    )

    assert all_at_once(text) == [
        "Yesterday I met Dr. Smith and Prof. J. Jones,",
        "e.g. at the U.S. embassy at 5 p.m. sharp.",
        "Then we left.",
    ]


def test_no_punctuation_at_all_is_spoken_in_word_cut_parts():
    text = " ".join(f"word{i}" for i in range(80))

    parts = all_at_once(text)

    assert len(parts) > 2 and " ".join(parts) == text
    assert FIRST_PART_MAX_CHARS <= len(parts[0]) < FIRST_PART_MAX_CHARS + 8
    assert all(MAX_PART_CHARS <= len(p) < MAX_PART_CHARS + 8 for p in parts[1:-1])


def test_a_short_reply_with_no_punctuation_comes_out_whole_at_the_end():
    splitter = SentenceSplitter()

    assert splitter.feed("no punctuation at all in this reply ") == []
    assert splitter.flush() == ["no punctuation at all in this reply"]


def test_a_very_long_later_sentence_is_cut_at_a_clause_boundary():
    parts = all_at_once("First things first. " + LONG_SENTENCE)

    assert parts[0] == "First things first."
    assert len(parts) == 3 and " ".join(parts[1:]) == LONG_SENTENCE
    assert len(parts[1]) >= LONG_SENTENCE_CHARS and parts[1].endswith(",")
    assert parts[2] == "as he had done every day for forty years, to look at the sea."


def test_flush_at_the_end_gives_the_unfinished_clause_once():
    splitter = SentenceSplitter()

    assert splitter.feed("One sentence is over now. And a clause, then some") == [
        "One sentence is over now."
    ]
    assert splitter.flush() == ["And a clause, then some"]
    assert splitter.flush() == []
    assert splitter.feed("") == []
