"""A web process that dies (SIGKILL: no close frames, no clean-up) while a user
speaks or while a reply streams. Another web process's sweeper (sweeper.py)
finds its live records once its heartbeat is gone, finishes the open utterance
from its audio in Redis and stores the orphaned reply as interrupted; the client
reconnects to that other process and resumes with nothing lost or doubled.

Both processes share the live state and channel layer in Redis: in services mode
the tests' Redis (with the live Celery worker), on embedded defaults a Redis of
this test's own (the STT then runs on the surviving process's in-process workers)."""

import contextlib
import signal
import time

import pytest

from apps.conversations.models import Message
from apps.personas.demo import demo_seed
from apps.pipeline.talk_client import text_turn
from tests import live
from tests.audio import pcm_of

from .conftest import socket_opener

CLIP = "deepspeech_LDC93S1.wav"  # "she had your dark suit in greasy wash water all year"
BOUND_S = 30  # heartbeat TTL 7 s + two sweeps 3 s apart, plus a slow STT on 2 busy cores


@pytest.fixture
def two_web_processes(transactional_db, live_env, live_worker, services_mode):
    with contextlib.ExitStack() as stack:
        env = {**live_env, "LIVE_HEARTBEAT_S": "1", "LIVE_SWEEP_S": "1"}
        if not services_mode:
            port = live.free_port()
            redis = live.start_redis(port)
            stack.callback(live.stop_by_pid, redis)
            env |= {"AUDIO_STORE_URL": f"redis://127.0.0.1:{port}/4",
                    "CHANNEL_LAYER_URL": f"redis://127.0.0.1:{port}/2"}  # fmt: skip
        demo_seed()
        doomed = live.start_daphne(env)
        stack.callback(doomed.stop)
        survivor = live.start_daphne(env)
        stack.callback(survivor.stop)
        clients: list = []
        stack.callback(lambda: [client.close() for client in clients])
        yield doomed, survivor, clients


def kill(server) -> None:
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(10)


def wait_for(what: str, check, timeout_s: float = BOUND_S) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout_s, f"{what}: not within {timeout_s} s"
        time.sleep(0.2)
    return time.monotonic() - started


def test_an_utterance_open_when_its_web_process_dies_is_finished_and_answered(
    two_web_processes,
):
    doomed, survivor, clients = two_web_processes
    speaker = socket_opener(doomed, clients)("ada")
    pcm = pcm_of(CLIP)
    speaker.stream(pcm[: len(pcm) * 2 // 3 // 3200 * 3200])  # mid-sentence
    time.sleep(1.0)  # the live writer has flushed the audio (every AUDIO_FLUSH_MS)

    # when the process dies
    kill(doomed)
    assert speaker.closed.wait(10) and speaker.close_code != 1000

    # then the other process finishes the utterance from its audio, within the bound
    def stored():
        return Message.objects.filter(
            conversation=speaker.conversation, role=Message.Role.USER
        ).exists()

    took = wait_for("the open utterance's final", stored)
    print(f"final stored {took:.1f} s after the SIGKILL")

    # and the client, reconnecting there, gets it once, and its reply, then goes on
    moved = socket_opener(survivor, clients)(
        user=speaker.user, conversation=speaker.conversation, resume_from=speaker.ready["last_seq"]
    )
    moved.wait_for(lambda e: e["type"] in ("reply.done", "reply.interrupted"), timeout=60)
    finals = moved.events("transcript.final")
    assert len(finals) == 1 and "suit" in finals[0]["text"].lower(), finals
    moved.wait_quiet(quiet=1.0)
    assert text_turn(moved, "And then?").reply.status == "complete"
    seqs = [e["seq"] for e in moved.events() if e.get("seq") is not None]
    assert len(seqs) == len(set(seqs)), seqs


def test_a_reply_streaming_when_its_web_process_dies_is_stored_interrupted(two_web_processes):
    doomed, survivor, clients = two_web_processes
    talker = socket_opener(doomed, clients)("ada")
    # a long echo reply: 20 ms a word
    talker.send_json({"type": "text", "text": " ".join(["words"] * 55)})
    talker.wait_for(lambda e: e["type"] == "reply.delta", timeout=30)
    time.sleep(0.4)  # its live record is written with the next batch (AUDIO_FLUSH_MS)

    # when the process dies mid-reply
    kill(doomed)

    # then the reply is not left streaming: it is stored as interrupted, within the bound
    def replies():
        return list(
            Message.objects.filter(
                conversation=talker.conversation, role=Message.Role.ASSISTANT, seq__gt=1
            ).values_list("status", "error_code")
        )

    took = wait_for("the orphaned reply", lambda: replies() and replies()[0][0] != "streaming")
    print(f"reply stored {took:.1f} s after the SIGKILL")
    assert replies() == [("interrupted", "server_lost")]

    # and the client, resuming on the other process, sees it ended once, and goes on
    moved = socket_opener(survivor, clients)(
        user=talker.user, conversation=talker.conversation, resume_from=talker.ready["last_seq"]
    )
    moved.wait_quiet(quiet=1.0)
    assert len(moved.events("reply.interrupted")) == 1, moved.events()
    assert text_turn(moved, "Still there?").reply.status == "complete"
