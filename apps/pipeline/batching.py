"""Cross-session batched speech-to-text: one batcher per worker process.

An STT worker runs its tasks on threads (`-P threads`), one task per window.
Each task reads its window's audio, hands it to the process's batcher and
waits. The batcher's one thread takes every window waiting, and while other
tasks are still reading theirs waits up to STT_BATCH_WAIT_MS for them (up to
STT_BATCH_MAX windows), then runs them through the engine's `transcribe_batch`
in one model call. A window alone is never held back: with one speaker there
is no wait at all, and under load the windows that arrive while the model
runs form the next batch. Each waiting task then gets its own transcript and
routes it to its own session. Finals and candidates go
first; drafts (partials) go in a batch of their own after them, only while no
more finals wait than STT_DRAFT_BACKLOG_MAX (here and in the `stt` queue), and
a draft whose utterance already has its final on the way is dropped: a draft
never delays a final. Celery still acknowledges each task on its own, so
redelivery works per window as before."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from django.conf import settings

from apps.observability import metrics

from .providers.base import Transcript
from .providers.registry import stt_get

log = logging.getLogger(__name__)

WAIT_FOR_RESULT_S = 120.0  # a task gives up on its window after this (the task time limit)


@dataclass(eq=False)
class _Window:
    kind: str
    pcm: bytes
    draft: bool
    utterance_id: str
    purpose: str = ""  # partial, candidate, final (metrics)
    future: Future = field(default_factory=Future)


class Skipped(Exception):
    """A draft dropped by the batcher: stale, or finals were waiting."""


class TranscriptionBatcher:
    def __init__(
        self,
        *,
        max_batch: int,
        wait_s: float,
        draft_backlog_max: int,
        finals_queued: Callable[[], int],
        draft_is_stale: Callable[[str], bool],
    ) -> None:
        self.max_batch = max(1, max_batch)
        self.wait_s = wait_s
        self.draft_backlog_max = draft_backlog_max
        self.finals_queued = finals_queued  # finals waiting in the broker's queue
        self.draft_is_stale = draft_is_stale  # the utterance's final is on its way
        self._finals: list[_Window] = []
        self._drafts: list[_Window] = []
        self._arriving = 0  # tasks reading their window's audio
        self._changed = threading.Condition()
        self.batches: list[tuple[str, int]] = []  # (finals|drafts, size), the last few
        threading.Thread(target=self._run, name="stt-batcher", daemon=True).start()

    def transcribe(
        self,
        *,
        kind: str,
        read: Callable[[], bytes],
        draft: bool,
        utterance_id: str,
        purpose: str = "",
    ) -> Transcript:
        """Read the window's audio (`read()`, on the caller's thread; meanwhile the
        batch being formed waits for it), then wait for its transcript. Raises
        Skipped for a dropped draft, or what the engine raised for the batch."""
        with self._changed:
            self._arriving += 1
        try:
            pcm = read()
        finally:
            with self._changed:
                self._arriving -= 1
                self._changed.notify()
        purpose = purpose or ("partial" if draft else "final")
        window = _Window(kind, pcm, draft, utterance_id, purpose)
        with self._changed:
            (self._drafts if draft else self._finals).append(window)
            self._changed.notify()
        return window.future.result(timeout=WAIT_FOR_RESULT_S)

    def finals_waiting(self) -> int:
        with self._changed:
            return len(self._finals)

    # --- the batcher's thread ------------------------------------------------------

    def _run(self) -> None:
        while True:
            finals, drafts = self._collect()
            if finals:
                self._transcribe(finals, draft=False)
            if drafts:
                self._transcribe(drafts, draft=True)

    def _collect(self) -> tuple[list[_Window], list[_Window]]:
        """Wait for work, then up to wait_s for windows still being read; finals first."""
        with self._changed:
            while not self._finals and not self._drafts:
                self._changed.wait()
            deadline = time.monotonic() + self.wait_s
            while self._arriving and len(self._finals) + len(self._drafts) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            finals = self._finals[: self.max_batch]
            del self._finals[: self.max_batch]
            drafts, self._drafts = self._drafts, []
            finals_left = len(self._finals)
        kept = self._drafts_to_run(drafts, finals, finals_left)
        room = self.max_batch - len(finals)
        run, later = kept[:room], kept[room:]
        if later:
            with self._changed:
                self._drafts[:0] = later
        return finals, run

    def _drafts_to_run(
        self, drafts: list[_Window], finals: list[_Window], finals_left: int
    ) -> list[_Window]:
        if not drafts:
            return []
        finalizing = {window.utterance_id for window in finals}
        backlog = finals_left
        if backlog <= self.draft_backlog_max:
            backlog += self._finals_queued()
        kept = []
        for window in drafts:
            if backlog > self.draft_backlog_max:
                reason = "finals waiting"
            elif window.utterance_id in finalizing or self._stale(window):
                reason = "stale"
            else:
                kept.append(window)
                continue
            window.future.set_exception(Skipped(reason))
        return kept

    def _finals_queued(self) -> int:
        try:
            return self.finals_queued()
        except Exception as exc:  # no broker answer: assume no backlog, drafts are cheap
            log.warning("could not read the stt backlog: %s", exc)
            return 0

    def _stale(self, window: _Window) -> bool:
        try:
            return self.draft_is_stale(window.utterance_id)
        except Exception:
            return False

    def _transcribe(self, windows: list[_Window], *, draft: bool) -> None:
        for kind in dict.fromkeys(window.kind for window in windows):
            group = [window for window in windows if window.kind == kind]
            self.batches = [*self.batches[-99:], ("drafts" if draft else "finals", len(group))]
            metrics.STT_BATCH_SIZE.labels("draft" if draft else "final").observe(len(group))
            started = time.perf_counter()
            try:
                transcripts = stt_get(kind).transcribe_batch(
                    [window.pcm for window in group], draft=draft
                )
            except BaseException as exc:  # every waiting task hears of it
                for window in group:
                    window.future.set_exception(exc)
                continue
            _observe(kind, group, time.perf_counter() - started)
            for window, transcript in zip(group, transcripts, strict=True):
                window.future.set_result(transcript)


def _observe(kind: str, group: list[_Window], model_s: float) -> None:
    """Each window's audio seconds, and its share of the model call's time (in
    proportion to its audio: every window of a batch has the batch's RTF)."""
    total = sum(len(window.pcm) for window in group)
    for window in group:
        audio_s = len(window.pcm) / 32_000  # PCM16 16 kHz mono
        share = model_s * len(window.pcm) / total if total else 0.0
        metrics.transcribed(engine=kind, purpose=window.purpose, audio_s=audio_s, model_s=share)


_batcher: TranscriptionBatcher | None = None
_batcher_pid = 0
_lock = threading.Lock()


def batcher() -> TranscriptionBatcher:
    """This process's batcher (a new one after a fork: threads do not survive it)."""
    global _batcher, _batcher_pid
    with _lock:
        if _batcher is None or _batcher_pid != os.getpid():
            from .dispatch import queue_backlog
            from .services import draft_is_stale

            _batcher = TranscriptionBatcher(
                max_batch=settings.STT_BATCH_MAX,
                wait_s=settings.STT_BATCH_WAIT_MS / 1000,
                draft_backlog_max=settings.STT_DRAFT_BACKLOG_MAX,
                finals_queued=lambda: queue_backlog("stt"),
                draft_is_stale=draft_is_stale,
            )
            _batcher_pid = os.getpid()
        return _batcher
