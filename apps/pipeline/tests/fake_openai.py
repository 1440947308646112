"""A tiny OpenAI-compatible HTTP server for tests: stdlib http.server in a thread on
127.0.0.1, a free port, no network.

Serves POST /v1/chat/completions (SSE stream, chunked as OpenAI sends it, with a final
usage chunk and [DONE]), /v1/audio/speech (raw 24 kHz PCM16) and
/v1/audio/transcriptions (JSON {"text"}). `fault` injects failures:
- "rate_limit": 429, with `Retry-After: <retry_after>` unless that is None;
- "server_error": 500;
- "slow": no answer for `delay_s` (then the normal one);
- "slow_stream": the first chunk, then `delay_s` between chunks;
- "malformed" (chat): a 200 stream whose next data line, after `fault_after_tokens`
  tokens (default 0), is not JSON;
- "cut" (chat): `fault_after_tokens` tokens (default 3), then the connection is closed
  in the middle of the chunked body: no finish_reason, no usage, no [DONE].
`fault_paths` (empty: all) limits the fault to those paths, and `fault_requests`
(None: every request) is how many requests get it before the server is healthy again
(`heal()` ends the fault). `requests` logs every request; `chat_requests()` counts chats."""

import contextlib
import json
import math
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REPLY_TOKENS = ["Hello", " there", ",", " nice", " to", " meet", " you", "."]
TRANSCRIPT = "hello from the fake transcriber"
PROMPT_TOKENS = 21


def sine_pcm(seconds: float, rate: int = 24_000, hz: float = 440.0) -> bytes:
    n = int(seconds * rate)
    return struct.pack(
        f"<{n}h", *(int(8000 * math.sin(2 * math.pi * hz * i / rate)) for i in range(n))
    )


class FakeOpenAI:
    def __init__(self) -> None:
        self.fault: str | None = None
        self.fault_requests: int | None = None
        self.fault_paths: tuple[str, ...] = ()
        self.fault_after_tokens: int | None = None
        self.retry_after: str | None = "1"
        self.delay_s = 2.0
        self.speech_seconds = 0.5
        self.reply_tokens: list[str] = list(REPLY_TOKENS)  # what a chat streams
        self.requests: list[dict] = []  # {"path", "headers", "body"}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._faulted = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}/v1"

    def start(self) -> "FakeOpenAI":
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FakeOpenAI":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def pause(self, seconds: float) -> None:
        self._stop.wait(seconds)

    def chat_requests(self) -> int:
        return sum(r["path"] == "/v1/chat/completions" for r in self.requests)

    def _fault_now(self, path: str) -> str | None:
        """The fault for the request just logged: only the first `fault_requests`."""
        with self._lock:
            if self.fault is None or (self.fault_paths and path not in self.fault_paths):
                return None
            if self.fault_requests is not None:
                if self._faulted >= self.fault_requests:
                    return None
                self._faulted += 1
            return self.fault

    def heal(self) -> None:
        with self._lock:
            self.fault, self.fault_requests, self.fault_paths = None, None, ()
            self._faulted = 0

    def _handler_class(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # chunked streams, as OpenAI sends them

            def log_message(self, format, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                fake.requests.append(
                    {
                        "path": self.path,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "body": body,
                    }
                )
                self.close_connection = True  # one request a connection
                # The client may have given up already (timeout tests).
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self._answer(body, fake._fault_now(self.path))

            def _answer(self, body: bytes, fault: str | None) -> None:
                if fault == "rate_limit":
                    headers = {"Retry-After": fake.retry_after} if fake.retry_after else {}
                    error = {"error": {"message": "slow down", "type": "rate"}}
                    return self._json(429, error, headers)
                if fault == "server_error":
                    return self._json(500, {"error": {"message": "boom", "type": "server"}})
                if fault == "slow":
                    fake.pause(fake.delay_s)
                if self.path == "/v1/chat/completions":
                    return self._chat(json.loads(body), fault)
                if self.path == "/v1/audio/speech":
                    return self._bytes(200, sine_pcm(fake.speech_seconds), "audio/pcm")
                if self.path == "/v1/audio/transcriptions":
                    return self._json(200, {"text": TRANSCRIPT})
                return self._json(404, {"error": {"message": f"no route {self.path}"}})

            def _chat(self, request: dict, fault: str | None) -> None:
                if not request.get("stream"):
                    return self._json(400, {"error": {"message": "tests only stream"}})
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.send_header("Connection", "close")
                self.end_headers()
                after = fake.fault_after_tokens
                if after is None:
                    after = 3 if fault == "cut" else 0
                base = {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": request["model"],
                }
                tokens = fake.reply_tokens
                for i, token in enumerate(tokens):
                    if i == after and fault == "malformed":
                        self._chunk(b"data: {this is not json\n\n")
                        return self._chunk(b"")
                    if i == after and fault == "cut":
                        # mid-body: the chunked encoding's last chunk never comes
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    if i and fault == "slow_stream":
                        fake.pause(fake.delay_s)
                    delta = {"content": token} if i else {"role": "assistant", "content": token}
                    choice = {"index": 0, "delta": delta, "finish_reason": None}
                    self._event({**base, "choices": [choice]})
                stop = {"index": 0, "delta": {}, "finish_reason": "stop"}
                self._event({**base, "choices": [stop]})
                usage = {
                    "prompt_tokens": PROMPT_TOKENS,
                    "completion_tokens": len(tokens),
                    "total_tokens": PROMPT_TOKENS + len(tokens),
                }
                self._event({**base, "choices": [], "usage": usage})
                self._chunk(b"data: [DONE]\n\n")
                self._chunk(b"")  # the end of the chunked body

            def _event(self, payload: dict) -> None:
                self._chunk(f"data: {json.dumps(payload)}\n\n".encode())

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            def _json(self, status: int, payload: dict, headers: dict | None = None) -> None:
                self._bytes(status, json.dumps(payload).encode(), "application/json", headers)

            def _bytes(
                self, status: int, data: bytes, content_type: str, headers: dict | None = None
            ) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                # One request a connection, said so: a client that pooled the
                # connection would send its next request into the closed socket
                # and spend a retry the fake never sees
                self.send_header("Connection", "close")
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        return Handler
