"""Cross-session batched speech-to-text with the real model: windows from many
sessions in one batch come back as they would one by one, each to its own
caller; finals go first; drafts back off under a backlog; a redelivered window
stores one segment."""

import asyncio
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from apps.conversations.models import TranscriptSegment
from apps.conversations.tests.factories import ConversationFactory
from apps.pipeline.audio_store import Batch, audio_store, utterance_key
from apps.pipeline.batching import Skipped, TranscriptionBatcher
from apps.pipeline.providers import registry
from apps.pipeline.services import transcribe_window
from apps.pipeline.values import UtteranceWindow
from tests.audio import english_clips, manifest, pcm_of, word_error_rate


@pytest.fixture(scope="module")
def whisper():
    return registry.stt_get("faster_whisper")


def make_batcher(**overrides) -> TranscriptionBatcher:
    options = dict(
        max_batch=16,
        wait_s=0.5,  # long enough that every window being read joins the first batch
        draft_backlog_max=0,
        finals_queued=lambda: 0,
        draft_is_stale=lambda utterance_id: False,
    )
    options.update(overrides)
    return TranscriptionBatcher(**options)


def submit_all(batcher, windows: list[tuple[bytes, bool, str]]) -> list:
    """Each window from its own thread, as Celery's task threads do, all reading
    their audio at the same moment; results or errors."""
    together = threading.Barrier(len(windows))

    def read(pcm: bytes) -> bytes:
        together.wait()
        return pcm

    def one(window):
        pcm, draft, utterance_id = window
        try:
            return batcher.transcribe(
                kind="faster_whisper",
                read=lambda: read(pcm),
                draft=draft,
                utterance_id=utterance_id,
            )
        except Skipped as exc:
            return exc

    with ThreadPoolExecutor(len(windows)) as pool:
        return list(pool.map(one, windows))


def test_windows_from_many_sessions_come_back_as_one_by_one(whisper):
    # given windows of different lengths (2 s to 11 s, and silence) from 15 sessions
    names = [*english_clips(), "leopard_empty.wav", "speechbrain_noise2.wav"]
    pcms = [pcm_of(name) for name in names]
    alone = [whisper.transcribe_batch([pcm])[0].text for pcm in pcms]
    batcher = make_batcher()

    # when they are transcribed at the same time through one batcher
    results = submit_all(batcher, [(pcm, False, uuid.uuid4().hex) for pcm in pcms])

    # then they ran as one batch, and each caller got its own window's text
    assert batcher.batches == [("finals", len(pcms))]
    batched = [result.text for result in results]
    differences = [(n, a, b) for n, a, b in zip(names, alone, batched, strict=True) if a != b]
    references = [manifest()[name]["reference_transcript"] for name in english_clips()]
    count = len(english_clips())
    assert word_error_rate(references, batched[:count]) <= word_error_rate(
        references, alone[:count]
    ), differences
    assert len(differences) <= 1, differences  # batched numerics may move a word, no more
    assert batched[count:] == ["", ""]  # silence stays silent
    assert "dog" in batched[names.index("speechbrain_spk1_snt1.wav")].lower()


def test_finals_go_before_drafts_and_drafts_batch_apart():
    speech = pcm_of("speechbrain_spk1_snt1.wav")
    batcher = make_batcher()

    results = submit_all(
        batcher,
        [(speech, True, "u1"), (speech, False, "u2"), (speech, True, "u3"), (speech, False, "u4")],
    )

    assert batcher.batches == [("finals", 2), ("drafts", 2)]
    assert all("dog" in result.text.lower() for result in results)


def test_drafts_back_off_while_finals_wait_and_finals_still_arrive():
    # given a broker whose `stt` queue holds finals not yet taken
    speech = pcm_of("speechbrain_spk1_snt2.wav")
    batcher = make_batcher(finals_queued=lambda: 5)

    # when drafts and finals arrive together
    results = submit_all(batcher, [(speech, True, "u1"), (speech, False, "u2")] * 2)

    # then the drafts were skipped and the finals transcribed
    assert [type(r) for r in results] == [Skipped, type(results[1]), Skipped, type(results[1])]
    assert all("figures" in r.text.lower() for r in results[1::2])
    assert batcher.batches == [("finals", 2)]


def test_a_draft_of_an_utterance_whose_final_is_coming_is_dropped():
    speech = pcm_of("speechbrain_spk1_snt3.wav")
    batcher = make_batcher(draft_is_stale=lambda utterance_id: utterance_id == "ended")

    results = submit_all(
        batcher, [(speech, True, "ended"), (speech, True, "u2"), (speech, False, "u3")]
    )

    assert isinstance(results[0], Skipped)
    assert "pure" in results[1].text.lower() and "pure" in results[2].text.lower()


def test_a_draft_is_dropped_when_its_own_final_is_in_the_batch():
    speech = pcm_of("speechbrain_spk1_snt4.wav")
    batcher = make_batcher()

    results = submit_all(batcher, [(speech, True, "u1"), (speech, False, "u1")])

    assert isinstance(results[0], Skipped)
    assert "stripe" in results[1].text.lower()


def test_an_engine_failure_reaches_every_window_of_the_batch(settings):
    # given an engine that cannot load (a model path that does not exist)
    settings.STT_MODEL = "/nonexistent/whisper-model"
    registry._cached.cache_clear()
    try:
        batcher = make_batcher()
        windows = [(pcm_of("speechbrain_spk1_snt5.wav"), False, f"u{i}") for i in range(3)]

        def one(window):
            try:
                batcher.transcribe(kind="faster_whisper", read=lambda: window[0], draft=False,
                                   utterance_id=window[2])  # fmt: skip
            except Exception as exc:
                return exc

        with ThreadPoolExecutor(3) as pool:
            errors = list(pool.map(one, windows))
    finally:
        settings.STT_MODEL = ""
        registry._cached.cache_clear()

    # then each waiting task hears why, and the batcher goes on
    assert [getattr(e, "code", None) for e in errors] == ["stt_unavailable"] * 3
    assert "dog" in batcher.transcribe(
        kind="faster_whisper", read=lambda: pcm_of("speechbrain_spk1_snt1.wav"), draft=False,
        utterance_id="after",
    ).text.lower()  # fmt: skip


@pytest.mark.django_db(transaction=True)
def test_a_window_redelivered_into_the_same_batch_stores_one_segment():
    # given an utterance's audio in the store, and its final window delivered twice
    conversation = ConversationFactory()
    utterance_id = uuid.uuid4().hex
    key = utterance_key(str(conversation.id), utterance_id)
    pcm = pcm_of("speechbrain_spk1_snt1.wav")
    asyncio.run(audio_store().write_batch(Batch(appends=[(key, pcm)], expiring=[key])))
    window = UtteranceWindow(
        conversation_id=str(conversation.id),
        utterance_id=utterance_id,
        end_byte=len(pcm),
        purpose="final",
    )
    start = threading.Barrier(2)

    def deliver():
        start.wait()
        transcribe_window(window=window)

    # when both deliveries run at once (one batch)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda _: deliver(), range(2)))

    # then one segment was stored
    segments = TranscriptSegment.objects.filter(utterance_id=utterance_id)
    assert segments.count() == 1
    assert "dog" in segments.get().text.lower()


def test_a_window_alone_is_not_held_back():
    # given a batcher that would wait a long time for windows still being read
    batcher = make_batcher(wait_s=5.0)
    speech = pcm_of("speechbrain_spk1_snt1.wav")

    # when one window arrives and no other task is reading audio
    started = time.monotonic()
    transcript = batcher.transcribe(
        kind="faster_whisper", read=lambda: speech, draft=False, utterance_id="alone"
    )

    # then it ran at once, not after the wait
    assert "dog" in transcript.text.lower()
    assert time.monotonic() - started < 4.0
