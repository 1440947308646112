"""Logs that follow a turn (apps/observability/logging.py): one JSON object a
line with the ids, a request id that goes from the socket into every task of
the turn and into the worker's log, and no transcript at INFO."""

import asyncio
import contextvars
import io
import json
import logging
import re
import threading
import time
import uuid

import pytest
import redis

from apps.observability.logging import (
    HEADER_ENQUEUED_AT,
    ContextFilter,
    JsonFormatter,
    TextFormatter,
    ids_bind,
    request_id_of,
    request_id_of_scope,
    request_id_var,
    task_context,
    task_headers,
)
from apps.personas.tests.factories import PersonaFactory
from apps.pipeline import dispatch
from apps.realtime.tests.conftest import socket_opener
from apps.realtime.tests.helpers import speak
from tests import live
from tests.audio import pcm_of

FIELDS = {
    "ts", "level", "logger", "message", "request_id", "conversation_id", "user_id", "pod", "role",
}  # fmt: skip
CLIP = "deepspeech_LDC93S1.wav"  # "She had your dark suit in greasy wash water all year."


def lines_of(logger_name: str, formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(ContextFilter(pod="pod-1", role="worker-stt"))
    logger = logging.getLogger(logger_name)
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.INFO)
    return logger, stream


def test_a_json_line_is_one_object_with_the_ids_of_the_work_at_hand():
    logger, stream = lines_of("parley.test.json", JsonFormatter())

    def work() -> None:
        ids_bind(request_id="req-1", conversation_id=uuid.UUID(int=7), user_id=42)
        logger.info("turn %s", "begun")
        try:
            raise ValueError("two\nlines")
        except ValueError:
            logger.exception("it failed")

    contextvars.copy_context().run(work)
    logger.info("outside")

    lines = stream.getvalue().splitlines()
    assert len(lines) == 3  # a traceback stays inside its line
    first, failed, outside = (json.loads(line) for line in lines)
    assert set(first) == FIELDS
    assert first["message"] == "turn begun"
    assert (first["level"], first["logger"]) == ("INFO", "parley.test.json")
    assert (first["request_id"], first["user_id"]) == ("req-1", "42")
    assert first["conversation_id"] == str(uuid.UUID(int=7))
    assert (first["pod"], first["role"]) == ("pod-1", "worker-stt")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", first["ts"])
    assert "ValueError: two\nlines" in failed["exc"]
    assert (outside["request_id"], outside["user_id"]) == ("", "")  # the context ended


def test_text_lines_show_the_request_id_in_development():
    logger, stream = lines_of("parley.test.text", TextFormatter())
    token = request_id_var.set("0123456789abcdef")
    try:
        logger.info("hello")
    finally:
        request_id_var.reset(token)
    logger.info("bye")
    first, second = stream.getvalue().splitlines()
    assert first.endswith("INFO parley.test.text [0123456789ab] hello")
    assert second.endswith("INFO parley.test.text bye")


def test_a_request_id_from_outside_is_kept_clean_or_replaced():
    assert request_id_of("abc-123") == "abc-123"
    assert request_id_of("a b\tc\x00") == "abc"
    assert len(request_id_of("x" * 500)) == 64
    assert re.fullmatch(r"[0-9a-f]{32}", request_id_of(""))
    assert request_id_of_scope({"headers": [(b"x-request-id", b"from-proxy")]}) == "from-proxy"
    assert request_id_of_scope({"headers": []}) != request_id_of_scope({"headers": []})


def test_task_headers_carry_the_ids_and_a_task_runs_under_them():
    def caller() -> dict:
        ids_bind(request_id="req-2", conversation_id="c-2", user_id="u-2")
        return task_headers()

    headers = contextvars.copy_context().run(caller)
    assert {k: v for k, v in headers.items() if k != HEADER_ENQUEUED_AT} == {
        "parley_request_id": "req-2",
        "parley_conversation_id": "c-2",
        "parley_user_id": "u-2",
    }
    assert isinstance(headers[HEADER_ENQUEUED_AT], float)
    with task_context(headers):
        assert request_id_var.get() == "req-2"
    assert request_id_var.get() == ""


async def test_an_in_process_task_runs_under_its_callers_request_id(settings):
    """Embedded mode: the in-process executor restores the ids, as a worker does."""
    from celery import Celery

    settings.CELERY_BROKER_URL = ""
    seen: list[str] = []
    ran = threading.Event()

    def record(**_kwargs) -> None:
        seen.append(request_id_var.get())
        ran.set()

    app = Celery(f"logs-{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    task = app.task(name=f"t.logs-{uuid.uuid4().hex[:6]}")(record)
    ids_bind(request_id="req-3")
    dispatch.enqueue(task)
    assert await asyncio.to_thread(ran.wait, 10)
    assert seen == ["req-3"]


# --- One voice turn across processes ---------------------------------------------------------


def json_lines(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON log line: {line!r}")
    for record in parsed:
        assert set(record) >= FIELDS, record
    return parsed


def test_one_request_id_follows_a_voice_turn_from_the_socket_to_the_worker(
    transactional_db, live_env, services_mode
):
    env = {**live_env, "LOG_FORMAT": "json", "LOG_LEVEL": "INFO"}
    processes: list[live.LiveProcess] = []
    clients: list = []
    worker = None
    try:
        if services_mode:  # a worker of this test's own, on a broker database of its own
            env["CELERY_BROKER_URL"] = live_env["REDIS_URL"].rsplit("/", 1)[0] + "/13"
            redis.Redis.from_url(env["CELERY_BROKER_URL"]).flushdb()
            worker = live.start_worker(env)
            processes.append(worker)
        server = live.start_daphne(env)
        processes.append(server)
        PersonaFactory(slug="logs", llm_kind="echo", tts_kind="espeak")
        client = socket_opener(server, clients)("logs", connect=False)
        client.request_id = f"turn-{uuid.uuid4().hex[:12]}"
        assert client.connect()["type"] == "ready"

        # when the user says one thing, and it is answered (with speech)
        events = speak(client, pcm_of(CLIP))
        finals = [e for e in events if e["type"] == "transcript.final"]
        assert finals and "greasy" in finals[0]["text"].lower()
        client.close()
        deadline = time.monotonic() + 15  # the server handles the close
        while "socket closed" not in server.log_tail(20) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        for client in clients:
            client.close()
        for process in reversed(processes):
            process.stop()

    # then every line of both processes is one JSON object with the fields
    web = json_lines(server.log_path.read_text())
    mine = [r for r in web if r["request_id"] == client.request_id]
    messages = [r["message"] for r in mine]
    assert any(m == "socket opened" for m in messages), messages
    assert any(m.startswith("utterance ended") for m in messages), messages
    assert any(m.startswith("reply finished: complete") for m in messages), messages
    assert any(m.startswith("socket closed: code") for m in messages), messages
    ours = [r for r in mine if r["logger"].startswith("apps.")]  # after the handshake
    assert {r["conversation_id"] for r in ours} == {str(client.conversation.id)}
    assert {r["user_id"] for r in ours} == {str(client.user.pk)}
    assert {(r["role"], r["pod"]) for r in web} == {("web", web[0]["pod"])}

    # and the turn's tasks ran under the socket's request id, in the worker's log
    # (services mode) or on the web process's in-process workers (embedded defaults)
    tasks = json_lines(worker.log_path.read_text()) if worker else web
    turn = [r for r in tasks if r["request_id"] == client.request_id]
    started = [r["message"] for r in turn if r["message"].startswith("task started")]
    assert any("transcribe_window_task" in m for m in started), started
    assert any("synthesize_sentence_task" in m for m in started), started
    assert any(r["message"].startswith("task done") for r in turn)
    if worker:
        assert {r["role"] for r in tasks} == {"worker-all"}

    # and no word the user said is in any line of the turn (the echo persona said them too)
    said = {w for w in re.findall(r"[a-z']+", finals[0]["text"].lower()) if len(w) >= 4}
    assert "greasy" in said and len(said) >= 4, said
    for record in web + (tasks if worker else []):
        words = set(re.findall(r"[a-z']+", json.dumps(record).lower()))
        assert not words & said, record
