"""`manage.py serve_llm` speaks the OpenAI protocol as the `openai` SDK expects: a real
server process with the real model, asked through the SDK (and, for what the SDK
never sends, raw HTTP)."""

import http.client
import json
import re
import socket
import time

import openai
import pytest

from apps.pipeline.llamacpp import MODEL_NAME
from tests import live

CHAT = [
    {"role": "system", "content": "You are Captain Rex, a jolly pirate."},
    {"role": "user", "content": "Ahoy! Tell me about your ship."},
]


@pytest.fixture(scope="module")
def server(live_env):
    llm = live.start_llm(live_env)
    yield llm
    llm.stop()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="local", max_retries=0, timeout=30)


def metric(server, name: str, **labels) -> float:
    text = live.http_get(f"http://127.0.0.1:{server.port}/metrics")[2].decode()
    where = ",".join(f'{k}="{v}"' for k, v in labels.items())
    found = re.search(rf"^{name}{{{where}}} (\S+)$" if where else rf"^{name} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_models_lists_the_one_model(client):
    assert [m.id for m in client.models.list()] == [MODEL_NAME]


def test_a_streamed_reply_comes_token_by_token_and_ends_with_usage(client):
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, stream=True, max_tokens=24,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)

    deltas = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    usage = chunks[-1].usage
    assert len(deltas) > 3 and "".join(deltas).strip()
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].choices == [] and usage is not None
    assert 0 < usage.completion_tokens <= 24 and usage.prompt_tokens > 10
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_a_whole_reply_has_its_message_and_usage(client):
    reply = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=5)

    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.completion_tokens <= 5


def test_max_tokens_is_a_cap(client):
    reply = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=2)

    assert (reply.usage.completion_tokens, reply.choices[0].finish_reason) == (2, "length")


NOT_FOUND, BAD = openai.NotFoundError, openai.BadRequestError
WIZARD = [{"role": "wizard", "content": "hi"}]
NOT_TEXT = [{"role": "user", "content": ["not", "text"]}]
TOO_LONG = [{"role": "user", "content": "word " * 3000}]


@pytest.mark.parametrize(
    ("fields", "error", "code"),
    [
        ({"model": "gpt-4o"}, NOT_FOUND, "model_not_found"),
        ({"messages": []}, BAD, "invalid_messages"),
        ({"messages": WIZARD}, BAD, "invalid_messages"),
        ({"messages": NOT_TEXT}, BAD, "invalid_messages"),
        ({"max_tokens": 0}, BAD, "invalid_max_tokens"),
        ({"temperature": 5}, BAD, "invalid_temperature"),
        ({"messages": TOO_LONG}, BAD, "context_length_exceeded"),
    ],
)
def test_a_bad_request_is_the_error_openai_sends(client, fields, error, code):
    request = {"model": MODEL_NAME, "messages": CHAT, "max_tokens": 5} | fields

    with pytest.raises(error) as raised:
        client.chat.completions.create(**request)

    assert raised.value.body["code"] == code and raised.value.body["message"]
    assert raised.value.body["type"] == "invalid_request_error"


def raw(server, method: str, path: str, body: bytes = b"", headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def test_what_the_sdk_never_sends_is_refused_clearly(server):
    assert raw(server, "POST", "/v1/chat/completions", b"{not json")[0] == 400
    assert (
        raw(server, "POST", "/v1/chat/completions", b"[1, 2]")[1]["error"]["code"]
        == "invalid_request"
    )
    status, body = raw(
        server, "POST", "/v1/chat/completions", b"x", {"Content-Length": str(2 << 20)}
    )
    assert (status, body["error"]["code"]) == (413, "body_too_large")
    assert raw(server, "GET", "/v1/nothing")[0] == 404
    assert raw(server, "POST", "/v1/embeddings", b"{}")[0] == 404
    # and the server still answers
    status, health = raw(server, "GET", "/healthz")
    assert (status, health["status"], health["model"]) == (200, "ok", MODEL_NAME)


def test_a_client_that_stops_reading_cancels_the_generation(server, client):
    # given counts before
    cancelled = metric(server, "parley_local_llm_requests_total", outcome="cancelled")
    made = metric(server, "parley_local_llm_tokens_total", kind="completion")
    # when a client reads two tokens of a long reply and closes the stream (a barge-in)
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, stream=True, max_tokens=400,
    )  # fmt: skip
    read = 0
    for chunk in stream:
        read += bool(chunk.choices and chunk.choices[0].delta.content)
        if read == 2:
            break
    stream.close()

    # then the server stops within a few tokens, counted as cancelled
    deadline = time.monotonic() + 20
    while metric(server, "parley_local_llm_requests_total", outcome="cancelled") == cancelled:
        assert time.monotonic() < deadline, "the generation was never cancelled"
        time.sleep(0.05)
    assert metric(server, "parley_local_llm_tokens_total", kind="completion") - made < 40
    # and the next request is served at once
    assert client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=2).choices


def test_requests_wait_their_turn_and_all_get_answers(server):
    import threading

    answers: list[int] = []

    def ask() -> None:
        status, body = raw(server, "POST", "/v1/chat/completions",
                           json.dumps({"messages": CHAT, "max_tokens": 8}).encode(),
                           {"Content-Type": "application/json"})  # fmt: skip
        answers.append(status if body["usage"]["completion_tokens"] else 0)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert answers == [200] * 4


def test_a_half_sent_request_does_not_hold_the_model(server, client):
    # given a client that sends headers and half a body, then goes quiet
    with socket.create_connection(("127.0.0.1", server.port)) as stalled:
        stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
        # then others are still answered
        assert client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=2).choices


def test_processes_share_one_port_and_stop_together(live_env):
    import os
    import signal
    import subprocess

    # given serve_llm with two processes
    llm = live.start_llm(live_env, "--processes", "2")
    try:
        parent = llm.process.pid
        found = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True)
        children = [int(pid) for pid in found.stdout.split()]
        # then both answer on the one port (each its own model), and only they do
        seen = set()
        deadline = time.monotonic() + 30
        while len(seen) < 2 and time.monotonic() < deadline:
            seen.add(raw(llm, "GET", "/healthz")[1]["pid"])
        assert len(children) == 2 and seen <= set(children)
        client = openai.OpenAI(base_url=llm.base_url, api_key="local", max_retries=0)
        assert client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=2).choices
        # when the first process gets SIGTERM
        os.kill(parent, signal.SIGTERM)
        llm.process.wait(15)
        # then every process has stopped
        for child in children:
            deadline = time.monotonic() + 10
            while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not os.path.exists(f"/proc/{child}")
    finally:
        llm.stop()
