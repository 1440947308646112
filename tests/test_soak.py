"""`make soak` (locustfiles/soak.py) is a documented run, not part of `make test`
(docs/reliability.md, "Soak"). What is tested here is what decides its verdict: the
account of what clients were sent against what Postgres holds, the memory slope,
the events the Locust users record, and the clear errors for bad options. (Locust
itself is not imported here: it would monkey-patch this process with gevent.)"""

import json

import pytest

from locustfiles import soak
from locustfiles.soak import SENT_KINDS, sent_record


def records(*rows: tuple) -> list[dict]:
    out = []
    for kind, id_, *extra in rows:
        record = {"conversation": "c1", "type": kind, "id": id_}
        if kind == "transcript.final":
            record["utterance_id"] = extra[0] if extra else None
        out.append(record)
    return out


def test_nothing_lost_when_everything_sent_is_stored_even_when_sent_twice():
    sent = records(
        ("speech.end", "u1"), ("transcript.final", "m1", "u1"), ("reply.done", "r1"),
        ("speech.end", "u2"), ("transcript.empty", "u2"),
        ("transcript.final", "m2", None),  # a typed turn
        ("reply.interrupted", "r2"),
        ("transcript.final", "m1", "u1"), ("reply.done", "r1"),  # replayed on a resume
    )  # fmt: skip
    stored = soak.Stored(
        messages={"m1": "user", "r1": "assistant", "m2": "user", "r2": "assistant"},
        utterances={"u1"}, unanswered=0, streaming=0,
    )  # fmt: skip

    tally = soak.account(sent, stored)

    assert (tally.finals_sent, tally.replies_sent, tally.utterances_ended) == (2, 2, 2)
    assert tally.empty == 1 and tally.lost == 0


def test_each_kind_of_loss_is_counted():
    sent = records(
        ("transcript.final", "m1", "u1"), ("reply.done", "r1"),  # neither stored
        ("speech.end", "u2"),  # never answered, not stored
        ("speech.end", "u3"),  # its final never reached the client, but it is stored
    )  # fmt: skip
    stored = soak.Stored(messages={"r1": "user"}, utterances={"u3"}, unanswered=2, streaming=1)

    tally = soak.account(sent, stored)

    assert tally.finals_lost == ["m1"]
    assert tally.replies_lost == ["r1"]  # stored, but not as a reply
    assert tally.utterances_lost == ["u2"]
    assert (tally.unanswered, tally.streaming, tally.lost) == (2, 1, 6)


def test_memory_growth_is_the_least_squares_slope_in_mb_per_hour():
    samples = [(t, 100_000_000 + 1000 * t) for t in range(0, 600, 10)]  # 1 kB a second
    assert soak.slope_per_hour(samples) == pytest.approx(3.6)
    assert soak.slope_per_hour([(0, 1), (10, 2)]) is None  # too few samples
    assert soak.slope_per_hour([(5, 1), (5, 2), (5, 3)]) is None  # no time passed


def test_the_locust_users_record_what_the_count_needs():
    final = {"type": "transcript.final", "message_id": "m1", "utterance_id": "u1", "seq": 3}
    assert sent_record("c1", final) == {
        "conversation": "c1", "type": "transcript.final", "id": "m1", "utterance_id": "u1",
    }  # fmt: skip
    done = {"type": "reply.done", "reply_id": "r1", "status": "complete"}
    assert sent_record("c1", done)["status"] == "complete"
    assert sent_record("c1", {"type": "speech.end", "utterance_id": "u9"})["id"] == "u9"
    assert set(SENT_KINDS) == {"speech.end", "transcript.final", "transcript.empty",
                               "reply.done", "reply.interrupted"}  # fmt: skip


def test_sent_logs_of_every_locust_process_are_read(tmp_path):
    (tmp_path / "sent-1.jsonl").write_text(json.dumps({"type": "speech.end"}) + "\n")
    (tmp_path / "sent-2.jsonl").write_text(json.dumps({"type": "reply.done"}) + "\n\n")
    (tmp_path / "other.txt").write_text("not read")
    assert [r["type"] for r in soak.sent_read(tmp_path)] == ["speech.end", "reply.done"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--users", "2"], "must be at least 3"),
        (["--duration", "30s"], "at least 60s"),
        (["--duration", "soon"], "at least 60s"),
        (["--settle", "-1"], "--settle must be 0 or more"),
    ],
)
def test_bad_options_are_refused_with_the_reason(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        soak.parse_args(args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_a_turn_left_without_a_reply_is_lost_unless_its_client_stopped_at_the_end(db):
    from datetime import timedelta

    from django.utils import timezone

    from apps.conversations.models import Message
    from apps.conversations.tests.factories import ConversationFactory, MessageFactory

    cutoff = timezone.now() - timedelta(seconds=60)
    answered, lost, in_flight = (ConversationFactory() for _ in range(3))
    MessageFactory(conversation=answered, role=Message.Role.USER)
    MessageFactory(conversation=answered, role=Message.Role.ASSISTANT,
                   status=Message.Status.STREAMING)  # fmt: skip
    MessageFactory(conversation=lost, role=Message.Role.USER)
    MessageFactory(conversation=in_flight, role=Message.Role.USER)
    old = timezone.now() - timedelta(minutes=5)
    Message.objects.exclude(conversation=in_flight).update(created_at=old)

    stored = soak.stored_read({str(c.pk) for c in (answered, lost, in_flight)}, cutoff)

    assert (stored.unanswered, stored.in_flight_at_end, stored.streaming) == (1, 1, 1)
    assert len(stored.messages) == 4
