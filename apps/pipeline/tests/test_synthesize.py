"""Speaking a reply: reply_run hands its first clause to TTS before the sentence
is over; synthesize_sentence, the TTS worker's service, stores and announces each
piece of a part's audio as soon as the engine has made it (the real Piper voice);
and a socket's AudioSequencer plays the pieces of every part in order."""

import time
import uuid

import pytest
from asgiref.sync import sync_to_async

from apps.accounts.tests.factories import UserFactory
from apps.conversations.services import conversation_start, text_message_add
from apps.personas.tests.factories import PersonaFactory
from apps.pipeline import services
from apps.pipeline.audio_store import audio_store
from apps.pipeline.providers import registry
from apps.pipeline.providers.base import ProviderError, SpeechChunk
from apps.pipeline.services import ReplyState, reply_audio_skip, reply_run, synthesize_sentence
from apps.pipeline.values import SentenceToSpeak
from apps.realtime.audio_out import AudioSequencer

TWO_SENTENCES = "Hi there. I would like to book a table for two."  # one part, two pieces


@pytest.fixture
def published(monkeypatch) -> list[dict]:
    events: list[dict] = []
    monkeypatch.setattr(
        services, "publish", lambda conversation_id, message: events.append(message)
    )
    return events


@pytest.fixture(autouse=True)
def speech_counted(monkeypatch) -> list[tuple[str, str, float]]:
    """The speech each part adds to its reply (reply_id, engine, seconds): these tests
    have no reply rows (the real UPDATE: apps/conversations/tests/test_costs.py)."""
    counted: list[tuple[str, str, float]] = []
    monkeypatch.setattr(
        services,
        "reply_speech_add",
        lambda *, reply_id, tts_kind, audio_seconds: counted.append(
            (reply_id, tts_kind, audio_seconds)
        ),
    )
    return counted


@pytest.fixture
def sentences_made(monkeypatch) -> list[int]:
    """How many sentences the real Piper voice has made, counted as it makes them."""
    voice = registry.tts_get("piper")._voice(registry.tts_get("piper").default_path)
    made: list[int] = []
    real = voice.phoneme_ids_to_audio
    monkeypatch.setattr(
        voice, "phoneme_ids_to_audio", lambda *a, **kw: made.append(1) or real(*a, **kw)
    )
    return made


def part(reply_id: str, index: int, text: str, tts_kind: str = "piper") -> SentenceToSpeak:
    return SentenceToSpeak(
        conversation_id=str(uuid.uuid4()),
        reply_id=reply_id,
        index=index,
        text=text,
        tts_kind=tts_kind,
    )


def audio_events(events: list[dict]) -> list[dict]:
    return [e for e in events if e["type"] == "reply.audio"]


@pytest.mark.django_db(transaction=True)
async def test_the_first_clause_goes_to_tts_before_its_sentence_is_over(settings, monkeypatch):
    # given an echo persona asked something whose echo opens with a long clause
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    said = "Well then, I have been thinking about it for a while, and my answer is yes."
    conversation = await sync_to_async(conversation_start)(
        user=await sync_to_async(UserFactory)(),
        persona=await sync_to_async(PersonaFactory)(llm_kind="echo", tts_kind="piper"),
    )
    await sync_to_async(text_message_add)(conversation_id=conversation.id, text=said)
    state = ReplyState()
    queued: list[tuple[SentenceToSpeak, str]] = []  # each part, and the text streamed by then
    monkeypatch.setattr(services, "enqueue_tts", lambda part: queued.append((part, state.text)))

    # when the reply streams
    await reply_run(conversation_id=conversation.id, final_at=time.time(), state=state)

    # then its first part is the first clause, queued while the sentence still streamed
    first, streamed_by_then = queued[0]
    assert first.text == '(echo) You said: "Well then,'  # 5 words, 27 characters
    assert "thinking" not in streamed_by_then
    assert [p.index for p, _ in queued] == list(range(len(queued))) == list(range(state.sentences))
    assert " ".join(p.text for p, _ in queued).split() == state.text.split()
    assert {(p.tts_kind, p.reply_id) for p, _ in queued} == {("piper", state.reply_id)}


async def test_each_piece_is_announced_as_soon_as_piper_has_made_it(
    published, sentences_made, monkeypatch
):
    # given: record how many sentences were made when each piece was announced
    made_when_announced: list[int] = []
    real_put = audio_store().put

    def put(key, data, ttl):
        made_when_announced.append(len(sentences_made))
        real_put(key, data, ttl)

    monkeypatch.setattr(audio_store(), "put", put)
    reply_id = str(uuid.uuid4())

    # when one part that Piper speaks as two sentences is synthesised
    synthesize_sentence(sentence=part(reply_id, 3, TWO_SENTENCES))

    # then the first piece was stored before the second sentence was made
    assert made_when_announced == [1, 2]
    pieces = audio_events(published)
    assert [(p["index"], p["chunk"], p["last"]) for p in pieces] == [(3, 0, False), (3, 1, True)]
    assert len({p["audio_key"] for p in pieces}) == 2
    for piece in pieces:
        assert piece["bytes"] > 0 and piece["sample_rate"] == 22_050 and piece["error"] == ""
        assert len(await audio_store().aget(piece["audio_key"]) or b"") == piece["bytes"]


def test_a_part_piper_says_in_one_go_is_one_last_piece(published):
    synthesize_sentence(sentence=part(str(uuid.uuid4()), 0, "Sure, here is what I think,"))

    [piece] = audio_events(published)
    assert (piece["chunk"], piece["last"]) == (0, True) and piece["bytes"] > 0


def test_other_engines_give_one_piece_per_part(published):
    synthesize_sentence(
        sentence=part(str(uuid.uuid4()), 0, "One sentence. And another.", tts_kind="espeak")
    )

    [piece] = audio_events(published)
    assert (piece["chunk"], piece["last"], piece["engine"]) == (0, True, "espeak")
    assert piece["bytes"] > 0


async def test_a_stop_between_two_pieces_skips_the_rest_of_the_part(
    published, sentences_made, monkeypatch
):
    # given a reply stopped right after its first piece was announced
    reply_id = str(uuid.uuid4())

    def publish_then_stop(conversation_id, message):
        published.append(message)
        audio_store().flag_set(f"tts-cancel:{reply_id}", 60)

    monkeypatch.setattr(services, "publish", publish_then_stop)

    # when
    synthesize_sentence(sentence=part(reply_id, 0, TWO_SENTENCES))

    # then the second sentence is never made; the part ends with an empty last piece
    assert len(sentences_made) == 1
    pieces = audio_events(published)
    assert [(p["chunk"], p["last"], p["bytes"] > 0) for p in pieces] == [
        (0, False, True),
        (1, True, False),
    ]


async def test_a_stopped_reply_is_not_synthesised_at_all(published, sentences_made, speech_counted):
    reply_id = str(uuid.uuid4())
    await reply_audio_skip(reply_id=reply_id)

    synthesize_sentence(sentence=part(reply_id, 0, TWO_SENTENCES))

    assert sentences_made == []
    [piece] = audio_events(published)
    assert (piece["chunk"], piece["last"], piece["bytes"]) == (0, True, 0)
    assert speech_counted == []  # no speech, no statement


class FailsAfterOnePiece:
    kind = "broken"

    def synthesize_stream(self, text, *, voice=""):
        yield SpeechChunk(pcm=b"\x01\x00" * 100, sample_rate=22_050, last=False)
        raise ProviderError("tts_unavailable", "the engine fell over")


def test_a_failure_after_the_first_piece_ends_the_part_with_an_empty_last_piece(
    published, monkeypatch, speech_counted
):
    monkeypatch.setattr(services, "tts_get", lambda kind: FailsAfterOnePiece())
    reply_id = str(uuid.uuid4())

    synthesize_sentence(sentence=part(reply_id, 1, "Whatever. It fails."))

    pieces = audio_events(published)
    assert [(p["chunk"], p["last"], p["bytes"], p["error"]) for p in pieces] == [
        (0, False, 200, ""),
        (1, True, 0, "tts_unavailable"),
    ]
    assert pieces[1]["sample_rate"] == 22_050
    assert [e["code"] for e in published if e["type"] == "error"] == ["tts_unavailable"]
    # the piece made before the failure is counted (and paid): 100 samples at 22.05 kHz
    assert speech_counted == [(reply_id, "piper", 100 / 22_050)]


async def test_a_socket_plays_every_piece_once_in_order_whatever_order_they_are_made(published):
    # given a reply of two parts whose second part is synthesised first, and once again
    reply_id = str(uuid.uuid4())
    synthesize_sentence(sentence=part(reply_id, 1, "That is all for now."))
    synthesize_sentence(sentence=part(reply_id, 0, TWO_SENTENCES))
    synthesize_sentence(sentence=part(reply_id, 1, "That is all for now."))  # redelivered
    sent: list = []

    async def send_event(message):
        sent.append(message)

    async def send_bytes(data):
        sent.append(data)

    out = AudioSequencer(
        send_event=send_event,
        send_bytes=send_bytes,
        fetch=audio_store().aget,
        timing=lambda reply_id: {"first_token_to_first_audio_ms": 1},
    )

    # when a socket gets the announcements in that order
    for message in audio_events(published):
        await out.push(message, greeted=True)

    # then it sends part 0's two pieces, then part 1, each with its announced bytes
    starts = [m for m in sent if isinstance(m, dict)]
    assert [(s["index"], s["chunk"], s["last"]) for s in starts] == [
        (0, 0, False),
        (0, 1, True),
        (1, 0, True),
    ]
    assert "first_token_to_first_audio_ms" in starts[0]
    assert sum(len(b) for b in sent if isinstance(b, bytes)) == sum(s["bytes"] for s in starts)
    assert all(s["bytes"] > 0 for s in starts) and not out.pending(reply_id, 2)


async def test_a_dead_lettered_part_ends_empty_so_the_next_parts_still_play(published):
    # given a reply whose part 0 will never be spoken (its task was dead-lettered)
    reply_id = str(uuid.uuid4())
    synthesize_sentence(sentence=part(reply_id, 1, "That is all for now."))
    services.synthesize_sentence_abandon(sentence=part(reply_id, 0, TWO_SENTENCES))
    sent: list = []

    async def send_event(message):
        sent.append(message)

    async def send_bytes(data):
        sent.append(data)

    out = AudioSequencer(
        send_event=send_event,
        send_bytes=send_bytes,
        fetch=audio_store().aget,
        timing=lambda reply_id: {},
    )

    # when a socket gets the announcements
    for message in audio_events(published):
        await out.push(message, greeted=True)

    # then the client hears why, part 0 ends empty, and part 1 plays after it
    assert [e["code"] for e in published if e["type"] == "error"] == ["tts_unavailable"]
    starts = [m for m in sent if isinstance(m, dict)]
    assert [(s["index"], s["chunk"], s["last"], s["bytes"] > 0) for s in starts] == [
        (0, 0, True, False),
        (1, 0, True, True),
    ]
    assert not out.pending(reply_id, 2)
