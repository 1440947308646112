"""Cut a streamed reply into the parts that are spoken one by one: the first
clause as soon as it is long enough to stand alone, then whole sentences (and
clauses of very long sentences), each given out as soon as it is complete.

Parts end only between words, and whether a part ends after a word depends on
nothing but the text up to that word and the whitespace after it. So a reply
streamed token by token, or character by character, is cut exactly as the same
text given all at once, and every word is kept, in order.

Why these thresholds (Piper `joe` speaks about 15 characters, 2.5 words, a second):
- The first audio waits for the first part, so the first part ends at the first
  clause boundary (`,` `;` `:` or a dash) once it has FIRST_CLAUSE_MIN_WORDS words
  and FIRST_CLAUSE_MIN_CHARS characters: about 1.3 s of speech. Shorter openers
  ("Well,", "Oh, I see,") said alone sound clipped, and 1.3 s of playing covers
  what the next part needs: the rest of the sentence from the LLM (well under a
  second at 30 tokens/s) and its synthesis (about 0.05 s of CPU per second of
  speech). The part keeps its comma, so Piper gives it a clause's rising end, not
  a full stop.
- With no clause boundary at all, the first part ends at a word boundary after
  FIRST_PART_MAX_CHARS (about 7 s of speech): a cut mid-phrase is better than
  silence until the whole unpunctuated reply is in.
- Later parts are whole sentences: the first one already plays while they are
  made, and a sentence said in one go sounds best. A sentence longer than
  LONG_SENTENCE_CHARS (10 s) ends at its next clause boundary, one longer than
  MAX_PART_CHARS at its next word boundary.
- A sentence shorter than MIN_CHARS ("Hi.") joins the next one.
- A period after a known abbreviation or an initial ("Dr.", "e.g.", "J.") ends
  nothing; neither does a comma inside a number ("3,000"): no space follows it."""

import re
from collections.abc import AsyncIterator

MIN_CHARS = 12  # "Hi." alone makes a poor TTS request; join it to what follows
FIRST_CLAUSE_MIN_CHARS = 20
FIRST_CLAUSE_MIN_WORDS = 4
FIRST_PART_MAX_CHARS = 100
LONG_SENTENCE_CHARS = 150
MAX_PART_CHARS = 250

_GAP = re.compile(r"\s+")
_GAPS = re.compile(r"(\s+)")  # words and the whitespace between them
_CLOSERS = "\"')]}”’»"
_SENTENCE_END = ".!?…"
_CLAUSE_END = ",;:"
_DASHES = ("-", "--", "–", "—")
_INITIAL = re.compile(r"^[A-Z]\.$")
ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt vs etc e.g i.e cf approx dept fig inc ltd a.m p.m "
    "u.s u.k".split()
)


def _is_abbreviation(word: str) -> bool:
    word = word.lstrip("\"'([{“‘«")
    return bool(_INITIAL.match(word)) or word.lower().rstrip(".") in ABBREVIATIONS


def _ends_sentence(word: str) -> bool:
    bare = word.rstrip(_CLOSERS)
    return bool(bare) and bare[-1] in _SENTENCE_END and not _is_abbreviation(bare)


def _ends_clause(word: str) -> bool:
    bare = word.rstrip(_CLOSERS)
    return bool(bare) and (bare[-1] in _CLAUSE_END or bare in _DASHES or bare[-1] in "—–")


class SentenceSplitter:
    def __init__(
        self,
        *,
        first_clause_min_chars: int = FIRST_CLAUSE_MIN_CHARS,
        first_clause_min_words: int = FIRST_CLAUSE_MIN_WORDS,
        first_part_max_chars: int = FIRST_PART_MAX_CHARS,
        long_sentence_chars: int = LONG_SENTENCE_CHARS,
        max_part_chars: int = MAX_PART_CHARS,
    ) -> None:
        self.first_clause_min_chars = first_clause_min_chars
        self.first_clause_min_words = first_clause_min_words
        self.first_part_max_chars = first_part_max_chars
        self.long_sentence_chars = long_sentence_chars
        self.max_part_chars = max_part_chars
        self._buffer = ""
        self._parts = 0  # parts given out so far

    def feed(self, delta: str) -> list[str]:
        """The parts that `delta` completes (often none)."""
        self._buffer += delta
        parts = []
        start = 0
        for gap in _GAP.finditer(self._buffer):
            part = self._buffer[start : gap.start()].strip()
            if part and self._ends_after(part, newline="\n" in gap.group()):
                parts.append(part)
                self._parts += 1
                start = gap.end()
        self._buffer = self._buffer[start:]
        return parts

    def flush(self) -> list[str]:
        """The rest, once the reply is complete."""
        rest, self._buffer = self._buffer.strip(), ""
        if not rest:
            return []
        self._parts += 1
        return [rest]

    def _ends_after(self, part: str, *, newline: bool) -> bool:
        """Whether `part` (complete words, then whitespace) is a part of its own.
        A gap still growing at the end of the buffer is asked again when more comes,
        and "no" can only become "yes" (a newline): the cut is the same either way."""
        word = part.rsplit(None, 1)[-1]
        if (newline or _ends_sentence(word)) and len(part) >= MIN_CHARS:
            return True
        if self._parts == 0:
            if len(part) >= self.first_part_max_chars:
                return True
            return (
                _ends_clause(word)
                and len(part) >= self.first_clause_min_chars
                and len(part.split()) >= self.first_clause_min_words
            )
        if len(part) >= self.max_part_chars:
            return True
        return _ends_clause(word) and len(part) >= self.long_sentence_chars


async def sentences_at_most(deltas: AsyncIterator[str], count: int) -> AsyncIterator[str]:
    """`deltas` as they come, up to the end of the `count`-th sentence: the rest is
    never read, and `deltas` is closed (a stream from an endpoint then ends there).
    A sentence ends where `SentenceSplitter` would end one: at a word ending in
    `.` `!` `?` or `…` (not an abbreviation) once the whitespace after it arrives,
    or at the end of the text."""
    ended = 0
    word = ""  # the text since the last whitespace, held back until we know where it ends
    try:
        async for delta in deltas:
            out = ""
            for part in _GAPS.split(delta):
                if not part:
                    continue
                if not part.isspace():
                    word += part
                    continue
                if word and _ends_sentence(word):
                    ended += 1
                    if ended >= count:
                        yield out + word
                        return
                out += word + part
                word = ""
            if out:
                yield out
        if word:
            yield word
    finally:
        close = getattr(deltas, "aclose", None)
        if close is not None:
            await close()
