"""The voice pipeline end to end, through a real socket on a real Daphne, with
the real models: in services mode also a real Celery worker, Redis, and
Postgres through PgBouncer; on embedded defaults, in-process workers."""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.test import Client
from django.urls import reverse

from apps.accounts.models import User
from apps.conversations.models import Message, TranscriptSegment
from apps.personas.models import Persona
from apps.pipeline.providers.registry import stt_get
from apps.pipeline.talk_client import TalkClient
from tests.audio import english_clips, manifest, normalize, pcm_of, word_error_rate

SILENCE_2S = bytes(64_000)


def speak(client: TalkClient, pcm: bytes, *, timeout: float = 90) -> list[dict]:
    """Stream `pcm` at real-time pace, then 2 s of silence; wait until every
    utterance has its final (or empty) transcript and the last reply is done.
    Returns the events that arrived."""
    after = len(client.received)
    client.stream(pcm + SILENCE_2S)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = [r.event for r in client.received[after:]]
        ends = sum(e["type"] == "speech.end" for e in events)
        settled = sum(e["type"] in ("transcript.final", "transcript.empty") for e in events)
        finals = sum(e["type"] == "transcript.final" for e in events)
        replies = sum(e["type"] in ("reply.done", "reply.interrupted") for e in events)
        if ends == settled and replies >= finals and _audio_complete(events):
            client.wait_quiet(quiet=2.0, timeout=deadline - time.monotonic())
            return [r.event for r in client.received[after:]]
        time.sleep(0.1)
    raise TimeoutError([e["type"] for e in events][-20:])


def _audio_complete(events: list[dict]) -> bool:
    """The last finished reply's audio has started for every sentence it spoke."""
    done = [e for e in events if e["type"] == "reply.done"]
    if not done:
        return True
    parts = {
        e["index"]
        for e in events
        if e["type"] == "reply.audio.start" and e["reply_id"] == done[-1]["reply_id"]
    }
    return len(parts) >= done[-1]["audio_parts"]


def test_streamed_transcripts_match_offline_and_replies_are_spoken(talker):
    # given every English clip, and the same model run offline on each whole file
    names = english_clips()
    stt = stt_get("faster_whisper")
    offline = [stt.transcribe(pcm_of(name)).text for name in names]
    clients = {name: talker("ada") for name in names}

    # when each clip is streamed at real-time pace, four speakers at a time
    with ThreadPoolExecutor(4) as pool:
        results = dict(
            zip(names, pool.map(lambda n: speak(clients[n], pcm_of(n)), names), strict=True)
        )

    # then the streamed finals are as good as offline transcription (within 2 points)
    streamed = [
        " ".join(e["text"] for e in results[n] if e["type"] == "transcript.final") for n in names
    ]
    references = [manifest()[n]["reference_transcript"] for n in names]
    streamed_wer = word_error_rate(references, streamed)
    offline_wer = word_error_rate(references, offline)
    print(f"WER streamed {streamed_wer:.3f} offline {offline_wer:.3f} over {len(names)} clips")
    for name, got, alone in zip(names, streamed, offline, strict=True):
        if normalize(got) != normalize(alone):
            print(f"  {name}: streamed {got!r} / offline {alone!r}")
    assert streamed_wer <= offline_wer + 0.02
    for name in names:
        events = results[name]
        types = [e["type"] for e in events]
        assert "transcript.final" in types, (name, types)
        # the reply streams token by token, then its audio arrives in full
        assert types.count("reply.delta") >= 3, name
        done = [e for e in events if e["type"] == "reply.done"][-1]
        starts = [
            e
            for e in events
            if e["type"] == "reply.audio.start" and e["reply_id"] == done["reply_id"]
        ]
        assert [s["index"] for s in starts] == list(range(len(starts))) and starts, name
        announced = sum(s["bytes"] for s in starts)
        received = sum(e["bytes"] for e in events if e["type"] == "binary")
        assert received >= announced > 0
        seconds = announced / 2 / starts[0]["sample_rate"]
        words = len(done["text"].split())
        assert 0.1 * words <= seconds <= 1.0 * words, (name, seconds, words)
    # and every final was stored before it was pushed, with its stage timing
    stored = TranscriptSegment.objects.filter(
        conversation__in=[c.conversation for c in clients.values()]
    )
    assert stored.count() == sum(
        1 for n in names for e in results[n] if e["type"] == "transcript.final"
    )
    assert not Message.objects.filter(
        role="user", source="voice", speech_end_to_final_ms__isnull=True
    ).exists()


def test_partials_come_before_each_final(talker):
    # one speaker, a long clip: every utterance of 1.5 s or more shows a draft first
    events = speak(talker("ada"), pcm_of("faster-whisper_jfk.wav"))
    lengths = {e["utterance_id"]: e["duration_ms"] for e in events if e["type"] == "speech.end"}
    finals = [e for e in events if e["type"] == "transcript.final"]
    assert finals
    for final in finals:
        before = events[: events.index(final)]
        partials = [
            e
            for e in before
            if e["type"] == "transcript.partial" and e["utterance_id"] == final["utterance_id"]
        ]
        if lengths[final["utterance_id"]] >= 1500:
            assert partials, final
        # a draft is a draft of this utterance: its words lead into the final's
        for partial in partials:
            assert partial["text"].split()[0].lower().strip(",.") in final["text"].lower()


@pytest.mark.parametrize("clip", ["leopard_empty.wav", "speechbrain_noise2.wav"])
def test_non_speech_makes_no_transcript_and_no_reply(talker, clip):
    client = talker("ada")
    events = speak(client, pcm_of(clip))
    types = [e["type"] for e in events]
    assert "transcript.final" not in types
    assert "reply.delta" not in types
    assert not Message.objects.filter(conversation=client.conversation, role="user").exists()


def test_typed_text_gets_a_spoken_reply(talker):
    client = talker("ada")
    after = len(client.received)
    client.send_json({"type": "text", "text": "What is the capital of France?"})
    final = client.wait_for(lambda e: e["type"] == "transcript.final", after=after).event
    done = client.wait_for(lambda e: e["type"] == "reply.done", after=after).event
    client.wait_for(lambda e: e["type"] == "reply.audio.start", after=after)
    assert final["source"] == "text" and final["text"] == "What is the capital of France?"
    assert "capital of France" in done["text"]
    stored = Message.objects.get(pk=done["reply_id"])
    assert (stored.status, stored.text, stored.seq) == ("complete", done["text"], done["seq"])
    assert stored.completion_tokens > 0 and stored.final_to_first_token_ms is not None


LONG_TEXT = " ".join(["tell me a long story about the sea and the stars"] * 12)


def test_interrupt_cancels_the_reply_and_stores_it_as_interrupted(talker):
    client = talker("ada")
    after = len(client.received)
    client.send_json({"type": "text", "text": LONG_TEXT})
    client.wait_for(lambda e: e["type"] == "reply.delta", after=after)
    sent_at = client.now()
    client.send_json({"type": "interrupt"})
    stopped = client.wait_for(lambda e: e["type"] == "reply.interrupted", after=after)
    assert stopped.t - sent_at < 0.2
    client.wait_quiet(quiet=1.0)
    later = [r.event["type"] for r in client.received if r.t > stopped.t]
    assert "reply.delta" not in later and "reply.audio.start" not in later
    stored = Message.objects.get(pk=stopped.event["reply_id"])
    assert stored.status == "interrupted"
    assert stored.text == stopped.event["text"] and 0 < len(stored.text) < len(LONG_TEXT)


def test_a_stop_before_the_first_token_leaves_no_turn_half_done(talker):
    client = talker("ada")
    after = len(client.received)
    client.send_json({"type": "text", "text": "never mind"})
    client.send_json({"type": "interrupt"})  # while the reply is being prepared
    client.wait_quiet(quiet=1.5)
    assert not Message.objects.filter(conversation=client.conversation, status="streaming")
    assert "reply.delta" not in [r.event["type"] for r in client.received[after:]]
    # and the conversation goes on
    client.send_json({"type": "text", "text": "second try"})
    done = client.wait_for(lambda e: e["type"] == "reply.done", after=after).event
    assert "second try" in done["text"]


def test_speaking_over_the_reply_interrupts_it(talker):
    client = talker("ada")
    after = len(client.received)
    client.send_json({"type": "text", "text": LONG_TEXT})
    client.wait_for(lambda e: e["type"] == "reply.delta", after=after)
    events = speak(client, pcm_of("speechbrain_spk1_snt1.wav"))
    types = [e["type"] for e in events]
    assert types.index("speech.start") < types.index("reply.interrupted")
    interrupted = Message.objects.filter(conversation=client.conversation, status="interrupted")
    assert interrupted.count() == 1


def test_resume_replays_what_was_missed_exactly_once(talker):
    # given a conversation with one finished turn, whose socket drops mid-reply
    first = talker("ada")
    after = len(first.received)
    first.send_json({"type": "text", "text": "first question"})
    seen = first.wait_for(lambda e: e["type"] == "reply.done", after=after).event["seq"]
    first.send_json({"type": "text", "text": LONG_TEXT})
    first.wait_for(lambda e: e["type"] == "reply.delta" and e["reply_id"] != "", after=after + 5)
    first.close()

    # when a new socket says hello with the last seq it saw
    again = talker(user=first.user, conversation=first.conversation, resume_from=seen)
    again.wait_for(lambda e: e["type"] == "reply.done" and LONG_TEXT[:40] in e["text"], timeout=60)
    again.wait_quiet(quiet=1.0)

    # then every stored turn after that seq arrives once, in order, and nothing before it
    seqs = [e["seq"] for e in again.events() if e["type"] in ("transcript.final", "reply.done")]
    stored = list(
        Message.objects.filter(conversation=first.conversation, seq__gt=seen)
        .order_by("seq")
        .values_list("seq", flat=True)
    )
    assert seqs == stored and len(stored) == 2


def test_a_turn_whose_socket_dropped_before_its_final_is_still_answered(talker):
    # given a socket that drops right after the user stops speaking
    first = talker("ada")
    after = len(first.received)
    first.stream(pcm_of("speechbrain_spk1_snt3.wav") + SILENCE_2S[:24_000])
    first.wait_for(lambda e: e["type"] == "speech.end", after=after)
    first.close()

    # when the page reconnects
    again = talker(user=first.user, conversation=first.conversation, resume_from=1)

    # then it gets the final transcript and the reply, once each
    final = again.wait_for(lambda e: e["type"] == "transcript.final", timeout=60).event
    done = again.wait_for(
        lambda e: e["type"] == "reply.done" and e["seq"] > final["seq"], timeout=60
    ).event
    again.wait_quiet(quiet=2.0)
    assert "high level" in final["text"].lower() and "high level" in done["text"].lower()
    assert (
        Message.objects.filter(
            conversation=first.conversation, role="assistant", source="llm"
        ).count()
        == 1
    )


def test_stop_from_a_reconnected_socket_interrupts_the_reply(talker):
    first = talker("ada")
    first.send_json({"type": "text", "text": LONG_TEXT})
    first.wait_for(lambda e: e["type"] == "reply.delta")
    first.close()  # the reply keeps streaming on the server
    again = talker(user=first.user, conversation=first.conversation, resume_from=2)
    again.wait_for(lambda e: e["type"] == "reply.delta")
    again.send_json({"type": "interrupt"})
    stopped = again.wait_for(lambda e: e["type"] == "reply.interrupted").event
    assert Message.objects.get(pk=stopped["reply_id"]).status == "interrupted"


def test_two_sessions_each_get_only_their_own_events(talker):
    alice, bob = talker("ada"), talker("sage")
    alice.send_json({"type": "text", "text": "apples are red"})
    bob.send_json({"type": "text", "text": "bananas are yellow"})
    a = alice.wait_for(lambda e: e["type"] == "reply.done" and e["seq"] > 1).event
    b = bob.wait_for(lambda e: e["type"] == "reply.done" and e["seq"] > 1).event
    alice.wait_quiet(quiet=1.0)
    assert "apples" in a["text"] and "bananas" in b["text"]
    assert "bananas" not in " ".join(e.get("text", "") for e in alice.events())
    assert "apples" not in " ".join(e.get("text", "") for e in bob.events())
    assert b["reply_id"] not in {e.get("reply_id") for e in alice.events()}


def test_persona_voice_switch_takes_effect_on_the_next_turn(talker):
    client = talker("ada")
    persona = Persona.objects.get(slug="ada")

    def reply_engine() -> str:
        after = len(client.received)
        client.send_json({"type": "text", "text": "say something please"})
        start = client.wait_for(lambda e: e["type"] == "reply.audio.start", after=after)
        client.wait_quiet(quiet=1.0)
        return start.event["engine"]

    assert reply_engine() == "piper"

    # staff switch the voice in the admin, while the socket stays open
    staff = User.objects.create_superuser("staff", password="pw-123456!")
    browser = Client()
    browser.force_login(staff)
    form = {
        field: getattr(persona, field)
        for field in (
            "name",
            "slug",
            "avatar",
            "description",
            "system_prompt",
            "greeting",
            "voice",
            "llm_kind",
            "llm_model",
            "temperature",
            "max_tokens",
            "stt_kind",
        )
    }
    changed = browser.post(
        reverse("admin:personas_persona_change", args=[persona.pk]),
        {**form, "tts_kind": "espeak", "is_published": "on", "_save": "Save"},
    )
    assert changed.status_code == 302, changed.content[:500]

    assert reply_engine() == "espeak"
