"""An OpenAI-compatible endpoint for the offline reply model (`manage.py serve_llm`).

The web process's `local` LLM kind talks to it with the `openai` SDK exactly as the
`openai` kind talks to vLLM or OpenAI, so no model runs inside the web process:

- `GET /v1/models`: the one model;
- `POST /v1/chat/completions`: `messages`, `max_tokens` (or `max_completion_tokens`),
  `temperature`, `seed`, `stream`, `stream_options.include_usage`; a streamed
  reply comes as server-sent events, ending with `data: [DONE]`;
- `GET /healthz` (the model is loaded) and `GET /metrics` (Prometheus).

A request that is not one of these gets the status and the JSON error body OpenAI
sends (`{"error": {"message", "type", "code"}}`). A client that stops reading a
stream (a barge-in closes it) ends the generation at the next token.

A process holds one model and generates one reply at a time; requests wait their
turn on its lock. `serve(processes=N)` forks N processes that share one listening
socket, so N replies are made at once (each ~200 MB)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from .llamacpp import Generation, LocalModel

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
MAX_TOKENS_LIMIT = 512  # per reply, whatever a request asks
DEFAULT_MAX_TOKENS = 128
ROLES = ("system", "user", "assistant")


class BadRequest(Exception):
    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.kind = status, message, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "code": self.code}}


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float
    seed: int
    stream: bool
    include_usage: bool


def chat_request_parse(body: bytes, *, model: str) -> ChatRequest:
    """A /v1/chat/completions body, checked as OpenAI checks it; BadRequest if not."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest(400, "the body is not JSON", "invalid_json") from None
    if not isinstance(data, dict):
        raise BadRequest(400, "the body must be a JSON object", "invalid_request")
    if data.get("model") not in (None, model):
        raise BadRequest(
            404, f"the model {data.get('model')!r} does not exist; this server has {model!r}",
            "model_not_found",
        )  # fmt: skip
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest(400, "messages must be a non-empty list", "invalid_messages")
    checked = []
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in ROLES or not isinstance(content, str):
            raise BadRequest(
                400, f"messages[{index}] needs a role ({', '.join(ROLES)}) and text content",
                "invalid_messages",
            )  # fmt: skip
        checked.append({"role": role, "content": content})
    max_tokens = data.get("max_completion_tokens", data.get("max_tokens", DEFAULT_MAX_TOKENS))
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise BadRequest(400, "max_tokens must be a positive integer", "invalid_max_tokens")
    temperature = data.get("temperature", 0.0)
    if temperature is None:
        temperature = 0.0
    if not isinstance(temperature, int | float) or not 0 <= temperature <= 2:
        raise BadRequest(400, "temperature must be a number from 0 to 2", "invalid_temperature")
    seed = data.get("seed") or 0
    if not isinstance(seed, int):
        raise BadRequest(400, "seed must be an integer", "invalid_seed")
    options = data.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest(400, "stream_options must be an object", "invalid_stream_options")
    return ChatRequest(
        messages=checked,
        max_tokens=min(max_tokens, MAX_TOKENS_LIMIT),
        temperature=float(temperature),
        seed=seed & 0xFFFFFFFF,
        stream=bool(data.get("stream")),
        include_usage=bool(options.get("include_usage")),
    )


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "parley_local_llm_requests", "Chat requests by outcome (ok, cancelled, error)",
            ["outcome"], registry=self.registry,
        )  # fmt: skip
        self.tokens = Counter(
            "parley_local_llm_tokens", "Tokens read (prompt) and made (completion)",
            ["kind"], registry=self.registry,
        )  # fmt: skip
        self.generating = Counter(
            "parley_local_llm_generating_seconds",
            "Time the model spent making replies, its queue left out (tokens per second: "
            "parley_local_llm_tokens_total{kind=\"completion\"} over this)",
            registry=self.registry,
        )  # fmt: skip
        self.first_token = Histogram(
            "parley_local_llm_first_token_seconds", "Request to first token, queueing included",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10), registry=self.registry,
        )  # fmt: skip


class Endpoint:
    """The model and what the handler needs of it: one per server process."""

    def __init__(self, model: LocalModel) -> None:
        self.model = model
        self.metrics = Metrics()
        self.created = int(time.time())

    def models(self) -> dict:
        entry = {"id": self.model.name, "object": "model", "created": self.created}
        return {"object": "list", "data": [entry | {"owned_by": "parley"}]}

    def chunks(
        self, request: ChatRequest, *, stopped: Callable[[], bool]
    ) -> Generator[dict, None, None]:
        """The streamed reply as OpenAI's chat.completion.chunk objects."""
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": self.model.name,
        }  # fmt: skip

        def chunk(delta: dict, finish: str | None = None) -> dict:
            return base | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        result = Generation()
        yield chunk({"role": "assistant", "content": ""})
        for piece in self._generate(request, result, stopped):
            yield chunk({"content": piece})
        yield chunk({}, "length" if result.finish_reason == "length" else "stop")
        if request.include_usage:
            yield base | {"choices": [], "usage": usage(result)}

    def completion(self, request: ChatRequest) -> dict:
        result = Generation()
        text = "".join(self._generate(request, result, lambda: False))
        message = {"role": "assistant", "content": text}
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
            "created": int(time.time()), "model": self.model.name,
            "choices": [{"index": 0, "message": message, "finish_reason": result.finish_reason}],
            "usage": usage(result),
        }  # fmt: skip

    def _generate(
        self, request: ChatRequest, result: Generation, stopped: Callable[[], bool]
    ) -> Iterator[str]:
        started = time.monotonic()
        first = True
        try:
            for piece in self.model.generate(
                request.messages, max_tokens=request.max_tokens,
                temperature=request.temperature, seed=request.seed,
                stopped=stopped, result=result,
            ):  # fmt: skip
                if first:
                    self.metrics.first_token.observe(time.monotonic() - started)
                    first = False
                yield piece
        except ValueError as exc:  # the prompt does not fit the context
            raise BadRequest(400, str(exc), "context_length_exceeded") from exc
        finally:
            if result.started_at:  # the model's own time, its queue left out
                self.metrics.generating.inc(time.monotonic() - result.started_at)
            self.metrics.tokens.labels("prompt").inc(result.prompt_tokens)
            self.metrics.tokens.labels("completion").inc(result.completion_tokens)


def usage(result: Generation) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def peer_gone(connection: socket.socket) -> bool:
    """The client closed its end (nothing it may still send is read here)."""
    try:
        readable, _, _ = select.select([connection], [], [], 0)
        return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def handler_class(endpoint: Endpoint) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "parley-serve-llm"

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

        def do_GET(self) -> None:
            if self.path == "/v1/models":
                return self.json(200, endpoint.models())
            if self.path == "/healthz":
                return self.json(200, {"status": "ok", "model": endpoint.model.name,
                                       "pid": os.getpid()})  # fmt: skip
            if self.path == "/metrics":
                return self.send(200, generate_latest(endpoint.metrics.registry), "text/plain")
            self.json(404, BadRequest(404, f"no route {self.path}", "not_found").body())

        def do_POST(self) -> None:
            if self.path != "/v1/chat/completions":
                self.drain_body()
                return self.json(404, BadRequest(404, f"no route {self.path}", "not_found").body())
            outcome = "error"
            try:
                request = chat_request_parse(self.body(), model=endpoint.model.name)
                if request.stream:
                    outcome = self.stream(request)
                else:
                    self.json(200, endpoint.completion(request))
                    outcome = "ok"
            except BadRequest as exc:
                self.json(exc.status, exc.body())
            except Exception:
                log.exception("chat completion failed")
                error = BadRequest(500, "the model failed", "server_error", "server_error")
                self.json(500, error.body())
            finally:
                endpoint.metrics.requests.labels(outcome).inc()

        def stream(self, request: ChatRequest) -> str:
            """Sends the reply as it is made; "cancelled" when the client left."""
            gone = False

            def stopped() -> bool:
                nonlocal gone
                gone = gone or peer_gone(self.connection)
                return gone

            chunks = endpoint.chunks(request, stopped=stopped)
            first = next(chunks)  # the model has not run yet: errors still get a status
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            try:
                self.event(first)
                for chunk in chunks:
                    if gone:
                        break
                    self.event(chunk)
                self.write_chunk(b"data: [DONE]\n\n")
                self.write_chunk(b"")
            except (BrokenPipeError, ConnectionResetError):
                gone = True
            finally:
                chunks.close()
            return "cancelled" if gone else "ok"

        def event(self, payload: dict) -> None:
            self.write_chunk(b"data: " + json.dumps(payload).encode() + b"\n\n")

        def write_chunk(self, data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def body(self) -> bytes:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                raise BadRequest(400, "Content-Length is not a number", "invalid_request") from None
            if length > MAX_BODY_BYTES:
                self.close_connection = True
                raise BadRequest(413, f"the body passes {MAX_BODY_BYTES} bytes", "body_too_large")
            return self.rfile.read(length)

        def drain_body(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if 0 < length <= MAX_BODY_BYTES:
                self.rfile.read(length)
            else:
                self.close_connection = True

        def json(self, status: int, payload: dict) -> None:
            self.send(status, json.dumps(payload).encode(), "application/json")

        def send(self, status: int, data: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def listening_socket(host: str, port: int) -> socket.socket:
    listener = socket.create_server((host, port), backlog=128)
    listener.set_inheritable(True)
    return listener


def server_on(listener: socket.socket, *, threads: int) -> Server:
    """A server with the model loaded, answering on `listener` once served."""
    endpoint = Endpoint(LocalModel(threads=threads))
    host, port = listener.getsockname()[:2]
    server = Server((host, port), handler_class(endpoint), bind_and_activate=False)
    server.socket.close()
    server.socket = listener
    return server


def serve_forever(listener: socket.socket, *, threads: int, ready: Callable[[], None]) -> None:
    """One server process: loads the model, then answers on `listener`."""
    server = server_on(listener, threads=threads)
    ready()
    server.serve_forever(poll_interval=0.2)


@contextlib.contextmanager
def served_in_thread(*, threads: int = 1) -> Iterator[str]:
    """This process's own endpoint on a free loopback port, for a command that needs
    the model once (eval_personas): its base URL; stopped on exit."""
    server = server_on(listening_socket("127.0.0.1", 0), threads=threads)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def serve(*, host: str, port: int, processes: int, threads: int, ready: Callable[[int], None]):
    """N processes on one socket (a SIGTERM ends each at once: a reply cut off is
    retried by the client); SIGTERM or SIGINT to the first stops them all."""
    listener = listening_socket(host, port)
    bound = listener.getsockname()[1]
    if processes <= 1:
        return serve_forever(listener, threads=threads, ready=lambda: ready(bound))
    children = []
    for _ in range(processes):
        pid = os.fork()
        if pid == 0:
            serve_forever(listener, threads=threads, ready=lambda: None)
            os._exit(0)
        children.append(pid)

    def stop(*_: Any) -> None:
        for child in children:
            try:
                os.kill(child, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    ready(bound)
    for child in children:
        os.waitpid(child, 0)


def main(argv: list[str] | None = None) -> None:
    """`python -m apps.pipeline.llm_server`: the image's `llm` role, without Django (a
    model server needs none of the app's settings or secrets); `manage.py serve_llm`
    is the same server for development."""
    import argparse

    parser = argparse.ArgumentParser(description="The offline model's OpenAI-compatible endpoint.")
    parser.add_argument("--host", default=os.environ.get("LLM_LOCAL_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("LLM_LOCAL_PORT", 8088)))
    parser.add_argument("--processes", type=int,
                        default=int(os.environ.get("LLM_LOCAL_PROCESSES", 1)))  # fmt: skip
    parser.add_argument("--threads", type=int, default=int(os.environ.get("LLM_LOCAL_THREADS", 1)))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    def ready(port: int) -> None:
        log.info("serving %s at http://%s:%d/v1", "SmolLM2-135M-Instruct", args.host, port)

    serve(host=args.host, port=args.port, processes=args.processes, threads=args.threads,
          ready=ready)  # fmt: skip


if __name__ == "__main__":
    main()
