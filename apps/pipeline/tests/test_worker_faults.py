"""Worker faults, injected for real (docs/reliability.md, "Workers" and "Redis restarts
(workers)"): a Daphne and Celery workers of this module's own, on two Redis servers of
its own (one the broker, with an append-only file as a production broker keeps; one
the channel layer and audio store), and the mode's database. Workers run the STT
model on threads (`-P threads`), as in production: a killed worker is the whole
process. Each test starts the workers it kills; a test restarts a dead worker where a
supervisor would (scripts/run.sh, Kubernetes), and the last test kills one under
`make run`'s supervisor.

Redelivery is sped up (visibility 6 s, looked for every second); everything else is
the production path. These tests start every process they need, so the two modes
would differ only in the database: they run in `make test`'s services run, on
Postgres through PgBouncer as production does (about 100 s)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from django.core.management import call_command

from apps.conversations.models import Message, TranscriptSegment
from apps.personas.models import Persona
from apps.personas.tests.factories import PersonaFactory
from apps.pipeline.broker import task_message
from apps.pipeline.talk_client import text_turn
from apps.pipeline.values import UtteranceWindow
from apps.realtime.tests.conftest import socket_opener
from tests import live
from tests.audio import pcm_of

CLIP = "deepspeech_LDC93S1.wav"  # "she had your dark suit in greasy wash water all year"
SILENCE = bytes(32_000)  # 1 s: the end of the utterance, by silence
STT_TASK = "task started: apps.pipeline.tasks.transcribe_window_task"
TTS_TASK = "task started: apps.pipeline.tasks.synthesize_sentence_task"
# One long sentence: the echo persona says it back, and Piper takes a while over it.
LONG_TEXT = "Tell me " + " and then ".join(["about the boats on the grey sea at dawn"] * 5)
FAULT_APP = "apps.pipeline.tests.fault_tasks"
VISIBILITY_S = 6
# Only finals: no drafts, no candidate at a pause (a final's task is what gets killed).
SETTINGS = {
    "STT_PARTIAL_EVERY_MS": "600000",
    "STT_FIRST_PARTIAL_MS": "600000",
    "VAD_PAUSE_MS": "60000",
    "CELERY_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S),
    "CELERY_TASK_TIME_LIMIT": "5",
    "CELERY_TASK_SOFT_TIME_LIMIT": "4",
    "CELERY_RESTORE_INTERVAL_S": "1",
}


@dataclass
class Stack:
    env: dict
    daphne: live.LiveDaphne
    broker_port: int
    broker_dir: Path
    broker: subprocess.Popen

    @property
    def broker_url(self) -> str:
        return f"redis://127.0.0.1:{self.broker_port}/0"

    def broker_restart(self, down_s: float) -> float:
        """Stop the broker (SIGTERM: it writes its append-only file), wait, start it
        again on the same port and files; the monotonic time it is back."""
        live.stop_by_pid(self.broker)
        time.sleep(down_s)
        self.broker = live.start_redis(self.broker_port, persist_dir=self.broker_dir)
        return time.monotonic()


@pytest.fixture(autouse=True, scope="module")
def services_run_only():
    if not live.services_mode():
        pytest.skip("process-killing fault tests run in make test's services run")


@pytest.fixture(scope="module")
def stack(live_env):
    store_port, broker_port = live.free_port(), live.free_port()
    broker_dir = Path(tempfile.mkdtemp(prefix="parley-test-broker-"))
    store = live.start_redis(store_port)
    broker = live.start_redis(broker_port, persist_dir=broker_dir)
    env = {
        **live_env,
        **SETTINGS,
        "CELERY_BROKER_URL": f"redis://127.0.0.1:{broker_port}/0",
        "CHANNEL_LAYER_URL": f"redis://127.0.0.1:{store_port}/2",
        "AUDIO_STORE_URL": f"redis://127.0.0.1:{store_port}/4",
    }
    built: Stack | None = None
    try:
        built = Stack(env=env, daphne=live.start_daphne(env), broker_port=broker_port,
                      broker_dir=broker_dir, broker=broker)  # fmt: skip
        yield built
    finally:
        if built is not None:
            built.daphne.stop()
            broker = built.broker
        for process in (store, broker):
            if process.poll() is None:
                live.stop_by_pid(process)
        shutil.rmtree(broker_dir, ignore_errors=True)


@pytest.fixture
def started():
    with contextlib.ExitStack() as stack:
        yield stack


@pytest.fixture
def talk(transactional_db, stack, started):
    """Open a socket to the stack's Daphne on a new conversation with an echo persona
    that speaks with `tts_kind`. The broker starts empty (no task of an earlier test)."""
    redis.Redis.from_url(stack.broker_url).flushall()
    clients: list = []
    started.callback(lambda: [client.close() for client in clients])
    opener = socket_opener(stack.daphne, clients)

    def open_socket(tts_kind: str = "espeak"):
        slug = f"faults-{tts_kind}"
        if not Persona.objects.filter(slug=slug).exists():
            PersonaFactory(slug=slug, llm_kind="echo", tts_kind=tts_kind)
        return opener(slug)

    return open_socket


def worker_start(stack: Stack, started, **env: str) -> live.LiveWorker:
    worker = live.start_worker({**stack.env, **env}, app_module=FAULT_APP)
    started.callback(lambda: worker.stop(grace_s=2))  # disposable: no long warm shutdown
    return worker


def worker_spawn(stack: Stack, started, **env: str) -> live.LiveWorker:
    """A worker of the fault app, not waited for (a poison task may kill it as it starts)."""
    from config.celery import worker_arguments

    name = f"faults-{uuid.uuid4().hex[:8]}"
    command = live._command("celery", "-A", FAULT_APP, "worker", *worker_arguments("all"),
                            "-n", f"{name}@localhost", "--without-gossip", "--without-mingle",
                            "--loglevel", "INFO")  # fmt: skip
    metrics_port = live.free_port()
    env = {**stack.env, "WORKER_METRICS_PORT": str(metrics_port),
           "WORKER_METRICS_HOST": "127.0.0.1", "PARLEY_ROLE": "worker-all", **env}  # fmt: skip
    proc = live._spawn(command, env, f"celery-{name}.log")
    worker = live.LiveWorker(process=proc.process, log_path=proc.log_path, log_file=proc.log_file)
    worker.metrics_port = metrics_port
    started.callback(lambda: worker.stop(grace_s=2))  # disposable: no long warm shutdown
    return worker


def log_wait(worker: live.LiveWorker, text: str, *, offset: int = 0, count: int = 1,
             timeout: float = 60) -> float:  # fmt: skip
    """Wait until `text` is in the worker's log `count` times after `offset`; when."""
    deadline = time.monotonic() + timeout
    while worker.log_since(offset).count(text) < count:
        assert time.monotonic() < deadline, f"no {text!r} x{count} in:\n{worker.log_tail(80)}"
        exited = worker.process.poll()
        assert exited is None, f"the worker exited ({exited}):\n{worker.log_tail(80)}"
        time.sleep(0.01)
    return time.monotonic()


def speak(client) -> threading.Thread:
    """Say the clip, then 1 s of silence, on a thread (at 4x real time: within the
    audio rate limit's 5 s burst)."""
    speaking = threading.Thread(
        target=client.stream, args=(pcm_of(CLIP) + SILENCE,), kwargs={"pace": 4.0}
    )
    speaking.start()
    return speaking


def finals_of(client, utterance_id: str | None = None) -> list[dict]:
    return [
        e
        for e in client.events("transcript.final")
        if utterance_id is None or e["utterance_id"] == utterance_id
    ]


def stored_turns(client) -> tuple[int, int]:
    conversation = client.conversation
    return (
        Message.objects.filter(conversation=conversation, role=Message.Role.USER).count(),
        TranscriptSegment.objects.filter(conversation=conversation).count(),
    )


def test_a_worker_killed_mid_final_gets_it_redelivered_and_the_final_arrives_once(
    stack, talk, started
):
    first = worker_start(stack, started)
    client = talk()

    # when the STT worker is SIGKILLed while it transcribes the final
    offset = first.log_size()
    speaking = speak(client)
    log_wait(first, STT_TASK, offset=offset)
    os.kill(first.process.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    first.process.wait(10)
    assert stored_turns(client) == (0, 0), "the final was stored before the kill"
    speaking.join()

    # and a new worker starts (as its supervisor would start it again)
    second = worker_start(stack, started)
    final = client.wait_for(lambda e: e["type"] == "transcript.final", timeout=60).event
    redelivered_s = time.monotonic() - killed_at
    print(f"\nworker SIGKILL mid-final: final after {redelivered_s:.1f} s")

    # then the window was redelivered to it within the visibility timeout's bound
    assert second.log_since(0).count(STT_TASK) == 1
    assert redelivered_s < VISIBILITY_S + 30  # kombu's default: 1 hour (+ up to 100 s)
    assert "greasy" in final["text"].lower()
    # and the final arrived exactly once, stored once
    client.wait_quiet(quiet=2)
    assert len(finals_of(client)) == 1
    assert stored_turns(client) == (1, 1)


def test_a_tts_worker_killed_mid_part_gets_it_redelivered_and_each_part_plays_once(
    stack, talk, started
):
    first = worker_start(stack, started)
    client = talk(tts_kind="piper")

    # when the TTS worker is SIGKILLed while it speaks a part of the reply
    turn: dict = {}
    typing = threading.Thread(
        target=lambda: turn.update(done=text_turn(client, LONG_TEXT, timeout=120))
    )
    typing.start()
    log_wait(first, TTS_TASK)
    os.kill(first.process.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    first.process.wait(10)
    assert "task done: apps.pipeline.tasks.synthesize_sentence_task" not in first.log_since(0)
    second = worker_start(stack, started)
    typing.join()
    complete_s = time.monotonic() - killed_at
    print(f"\nTTS worker SIGKILL mid-part: the reply's audio complete {complete_s:.1f} s later")

    # then the part was redelivered, and the reply's audio came whole, each piece once
    reply = turn["done"].reply
    assert reply.status == "complete" and reply.complete_t is not None
    assert TTS_TASK in second.log_since(0)
    starts = [e for e in client.events("reply.audio.start") if e["reply_id"] == reply.reply_id]
    places = [(e["index"], e.get("chunk", 0)) for e in starts]
    assert len(places) == len(set(places)), places
    done = client.events("reply.done")[-1]
    lasts = sorted(e["index"] for e in starts if e.get("last", True))
    assert lasts == list(range(done["audio_parts"])), places
    assert not [e for e in client.events("error") if e["code"] == "tts_unavailable"]
    # and its speech was counted once (a second count would double it)
    heard_s = sum(e["bytes"] / 2 / e["sample_rate"] for e in starts)
    stored_s = Message.objects.get(pk=reply.reply_id).tts_audio_seconds
    assert 0 < stored_s <= heard_s * 1.25, (stored_s, heard_s)


def test_a_task_that_kills_its_worker_every_time_is_dead_lettered_after_3_starts(
    stack, talk, started, tmp_path, settings
):
    starts = tmp_path / "starts"
    env = {"FAULT_STARTS_FILE": str(starts), "WORKER_PRELOAD": "0"}
    worker = worker_start(stack, started, **env)
    client = talk()
    broker = redis.Redis.from_url(stack.broker_url)
    broker.delete("dead_letter")
    utterance_id = uuid.uuid4().hex
    window = UtteranceWindow(conversation_id=str(client.conversation.id),
                             utterance_id=utterance_id, end_byte=3200, purpose="final")  # fmt: skip

    # when a poison final transcription is queued: it SIGKILLs its worker at every start
    broker.lpush("stt", task_message(task_name="faults.transcribe_window_kill_task",
                                     kwargs=window.as_kwargs(), queue="stt"))  # fmt: skip
    queued_at = time.monotonic()
    deaths, deadline = 0, queued_at + 120
    while "dead-lettered" not in worker.log_since(0):
        assert time.monotonic() < deadline, worker.log_tail(80)
        if worker.process.poll() is not None:  # start another, as a supervisor would
            deaths += 1
            worker = worker_spawn(stack, started, **env)
        time.sleep(0.05)

    print(f"\npoison task: dead-lettered {time.monotonic() - queued_at:.1f} s after it was queued")
    # then it ran 3 times (3 workers died), and the 4th worker dead-lettered it instead
    assert len(starts.read_text().splitlines()) == 3
    assert deaths == 3
    assert worker.process.poll() is None
    letters = [json.loads(item) for item in broker.lrange("dead_letter", 0, -1)]
    assert [(r["task"], r["queue"], r["starts"], r["kwargs"]["utterance_id"]) for r in letters] == [
        ("faults.transcribe_window_kill_task", "stt", 3, utterance_id)
    ]
    # and staff can list it
    settings.CELERY_BROKER_URL = stack.broker_url
    out = io.StringIO()
    call_command("dead_letters", stdout=out)
    assert utterance_id in out.getvalue()
    # and it is counted
    scraped = live.metrics_get(f"{worker.metrics_url}/metrics")
    assert (
        'parley_tasks_dead_lettered_total{queue="stt",task="faults.transcribe_window_kill_task"}'
        " 1.0" in scraped
    )
    # and the client hears that this turn failed
    client.wait_for(lambda e: e["type"] == "error" and e["code"] == "stt_unavailable", timeout=10)
    client.wait_for(
        lambda e: e["type"] == "transcript.empty" and e["utterance_id"] == utterance_id,
        timeout=10,
    )
    # and the worker goes on: the next utterance is transcribed
    after = len(client.received)
    speak(client).join()
    final = client.wait_for(lambda e: e["type"] == "transcript.final", timeout=60, after=after)
    assert "greasy" in final.event["text"].lower()


def test_a_broker_restart_or_freeze_keeps_the_worker_and_its_task_in_flight(stack, talk, started):
    worker = worker_start(stack, started)
    client = talk()

    # when the broker (our own Redis) restarts while the worker transcribes a final
    speaking = speak(client)
    log_wait(worker, STT_TASK)
    offset = worker.log_size()
    up_at = stack.broker_restart(down_s=2.0)
    speaking.join()

    # then the worker reconnects instead of exiting (kombu's restore_unacked crash)
    reconnected_at = log_wait(worker, "Connected to redis", offset=offset, timeout=30)
    assert worker.process.poll() is None
    assert "AttributeError" not in worker.log_since(0)
    # and the final in flight arrives, once
    client.wait_for(lambda e: e["type"] == "transcript.final", timeout=60)
    # and the task in flight (its ack was lost with the connection) is redelivered,
    # and does nothing twice
    redelivered_at = log_wait(worker, STT_TASK, offset=offset, timeout=VISIBILITY_S + 30)
    print(
        f"\nbroker restart: worker reconnected {reconnected_at - up_at:.1f} s after Redis "
        f"was back; task in flight redelivered after {redelivered_at - up_at:.1f} s"
    )
    # when the broker then freezes for 4 s (SIGSTOP) and thaws
    os.kill(stack.broker.pid, signal.SIGSTOP)
    time.sleep(4)
    os.kill(stack.broker.pid, signal.SIGCONT)

    # then the worker is still there and keeps processing: the next utterance is transcribed
    assert worker.process.poll() is None
    after = len(client.received)
    speak(client).join()
    client.wait_for(lambda e: e["type"] == "transcript.final", timeout=60, after=after)
    client.wait_quiet(quiet=2)
    assert len(finals_of(client)) == 2
    assert stored_turns(client) == (2, 2)


@pytest.fixture
def database_outage(live_env, services_mode, tmp_path):
    """The worker's own way to its database, which the test cuts and restores: a
    PgBouncer of its own in front of this machine's Postgres (services mode), or a
    symbolic link to the SQLite file (embedded)."""
    if services_mode:
        port, run_dir = live.free_port(), Path(tempfile.mkdtemp(prefix="parley-test-pgb-"))
        name = live_env["DATABASE_URL"].rsplit("/", 1)[1]
        holder = {"process": live.start_pgbouncer(port, run_dir)}

        def cut() -> None:
            live.stop_by_pid(holder["process"])

        def restore() -> None:
            holder["process"] = live.start_pgbouncer(port, run_dir)

        yield {"DATABASE_URL": f"postgres://postgres@127.0.0.1:{port}/{name}"}, cut, restore
        if holder["process"].poll() is None:
            live.stop_by_pid(holder["process"])
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    link = tmp_path / "db.sqlite3"
    link.symlink_to(live_env["SQLITE_PATH"])

    def cut_sqlite() -> None:
        link.unlink()
        link.symlink_to(tmp_path)  # a directory: "unable to open database file"

    def restore_sqlite() -> None:
        link.unlink()
        link.symlink_to(live_env["SQLITE_PATH"])

    yield {"SQLITE_PATH": str(link)}, cut_sqlite, restore_sqlite


def test_a_database_error_during_a_final_is_retried_and_the_final_arrives_once(
    stack, talk, started, database_outage
):
    worker_env, cut, restore = database_outage
    worker = worker_start(stack, started, **worker_env)
    client = talk()

    # when the worker's database is down while a final's task runs
    cut()
    speak(client).join()
    cut_seen = log_wait(worker, "retry: Retry in", timeout=60)
    assert "OperationalError" in worker.log_since(0)
    restore()

    # then the task is retried (after 1, 2, 4 s) and the final arrives, once
    final = client.wait_for(lambda e: e["type"] == "transcript.final", timeout=60).event
    print(f"\ndatabase outage: final {time.monotonic() - cut_seen:.1f} s after the first retry")
    assert "greasy" in final["text"].lower()
    client.wait_quiet(quiet=2)
    assert len(finals_of(client)) == 1
    assert stored_turns(client) == (1, 1)
    assert not client.events("transcript.empty")


def test_make_run_restarts_a_dead_worker_and_ctrl_c_stops_everything(transactional_db, live_env):
    redis_port, web_port, metrics_port = live.free_port(), live.free_port(), live.free_port()
    llm_port = live.free_port()
    redis_process = live.start_redis(redis_port)
    base = f"redis://127.0.0.1:{redis_port}"
    env = {
        **live_env,
        "REDIS_URL": f"{base}/0",
        "CELERY_BROKER_URL": f"{base}/3",
        "CACHE_URL": f"{base}/1",
        "CHANNEL_LAYER_URL": f"{base}/2",
        "AUDIO_STORE_URL": f"{base}/4",
        "PORT": str(web_port),
        "STOP_GRACE_S": "5",
        "WORKER_METRICS_PORT": str(metrics_port),
        "WORKER_PRELOAD": "0",
        "LLM_LOCAL_PORT": str(llm_port),  # no LLM endpoint set: the offline model runs too
    }
    log_path = live.LOG_DIR / f"run-sh-{web_port}.log"
    with open(log_path, "wb") as log_file:
        run = subprocess.Popen(["bash", "scripts/run.sh"], cwd=live.ROOT, env=env,
                               stdout=log_file, stderr=subprocess.STDOUT,
                               start_new_session=True)  # fmt: skip
    try:

        def pids(role: str) -> list[int]:
            lines = log_path.read_text().splitlines()
            name = "offline reply model (SmolLM2-135M-Instruct)" if role == "llm" else (
                f"Celery {role} worker")  # fmt: skip
            prefix = f"run: {name} started (pid "
            return [int(line[len(prefix) : -1]) for line in lines if line.startswith(prefix)]

        deadline = time.monotonic() + 60
        while not (pids("stt") and pids("tts") and pids("llm")):
            assert run.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        live.wait_until(lambda: " ready." in log_path.read_text(), _Proc(run, log_path),
                        "the workers", 60)  # fmt: skip

        llm_health = f"http://127.0.0.1:{llm_port}/healthz"
        live.wait_until(lambda: live.answers(llm_health), _Proc(run, log_path), "serve_llm", 60)

        # when the STT worker is SIGKILLed
        (first,) = pids("stt")
        os.kill(first, signal.SIGKILL)
        killed_at = time.monotonic()

        # then its supervisor logs it and starts it again, after a backoff
        while len(pids("stt")) < 2:
            assert time.monotonic() - killed_at < 30, log_path.read_text()
            time.sleep(0.05)
        restarted_s = time.monotonic() - killed_at
        text = log_path.read_text()
        assert f"(pid {first}) exited with status 137; restarting it in 1s" in text
        second = pids("stt")[1]
        os.kill(second, 0)  # running
        print(f"\nmake run: a killed worker was started again after {restarted_s:.1f} s")

        # when Ctrl-C (SIGINT to the foreground process group)
        os.killpg(run.pid, signal.SIGINT)

        # then everything stops, nothing is restarted
        run.wait(60)
        for pid in (second, pids("tts")[0], pids("llm")[0]):
            with pytest.raises(ProcessLookupError):
                _wait_gone(pid, 5)
        assert len(pids("stt")) == 2
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
        run.wait(10)
        live.stop_by_pid(redis_process)


@dataclass
class _Proc:
    """live.wait_until's view of run.sh."""

    process: subprocess.Popen
    log_path: Path

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def log_tail(self) -> str:
        return live.log_tail(self.log_path)


def _wait_gone(pid: int, timeout_s: float) -> None:
    """Raises ProcessLookupError once `pid` is gone; returns if it lives on."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        os.kill(pid, 0)
        time.sleep(0.1)
