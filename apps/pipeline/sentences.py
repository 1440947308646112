"""Cut a streamed reply into sentences, so each can be spoken as soon as it is complete."""

import re

_BOUNDARY = re.compile(r"(?<=[.!?…])[\"')\]]*\s+|\n+")
MIN_CHARS = 12  # "Hi." alone makes a poor TTS request; join it to what follows


class SentenceSplitter:
    def __init__(self) -> None:
        self._buffer = ""

    def feed(self, delta: str) -> list[str]:
        self._buffer += delta
        sentences = []
        start = 0
        for match in _BOUNDARY.finditer(self._buffer):
            candidate = self._buffer[start : match.end()].strip()
            if len(candidate) >= MIN_CHARS:
                sentences.append(candidate)
                start = match.end()
        self._buffer = self._buffer[start:]
        return sentences

    def flush(self) -> list[str]:
        rest, self._buffer = self._buffer.strip(), ""
        return [rest] if rest else []
