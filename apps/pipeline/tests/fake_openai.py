"""A tiny OpenAI-compatible HTTP server for tests: stdlib http.server in a thread on
127.0.0.1, a free port, no network.

Serves POST /v1/chat/completions (SSE stream with a final usage chunk and [DONE]),
/v1/audio/speech (raw 24 kHz PCM16) and /v1/audio/transcriptions (JSON {"text"}).
`fault` injects failures: "rate_limit" (429), "server_error" (500), "slow" (no answer
for `delay_s`), "slow_stream" (first chunk, then `delay_s` between chunks)."""

import contextlib
import json
import math
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
        self.delay_s = 2.0
        self.speech_seconds = 0.5
        self.requests: list[dict] = []  # {"path", "headers", "body"}
        self._stop = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

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

    def _handler_class(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
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
                # The client may have given up already (timeout tests).
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self._answer(body)

            def _answer(self, body: bytes) -> None:
                if fake.fault == "rate_limit":
                    return self._json(429, {"error": {"message": "slow down", "type": "rate"}})
                if fake.fault == "server_error":
                    return self._json(500, {"error": {"message": "boom", "type": "server"}})
                if fake.fault == "slow":
                    fake.pause(fake.delay_s)
                if self.path == "/v1/chat/completions":
                    return self._chat(json.loads(body))
                if self.path == "/v1/audio/speech":
                    return self._bytes(200, sine_pcm(fake.speech_seconds), "audio/pcm")
                if self.path == "/v1/audio/transcriptions":
                    return self._json(200, {"text": TRANSCRIPT})
                return self._json(404, {"error": {"message": f"no route {self.path}"}})

            def _chat(self, request: dict) -> None:
                if not request.get("stream"):
                    return self._json(400, {"error": {"message": "tests only stream"}})
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                base = {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": request["model"],
                }
                for i, token in enumerate(REPLY_TOKENS):
                    if i and fake.fault == "slow_stream":
                        fake.pause(fake.delay_s)
                    delta = {"content": token} if i else {"role": "assistant", "content": token}
                    choice = {"index": 0, "delta": delta, "finish_reason": None}
                    self._event({**base, "choices": [choice]})
                stop = {"index": 0, "delta": {}, "finish_reason": "stop"}
                self._event({**base, "choices": [stop]})
                usage = {
                    "prompt_tokens": PROMPT_TOKENS,
                    "completion_tokens": len(REPLY_TOKENS),
                    "total_tokens": PROMPT_TOKENS + len(REPLY_TOKENS),
                }
                self._event({**base, "choices": [], "usage": usage})
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()

            def _event(self, payload: dict) -> None:
                self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
                self.wfile.flush()

            def _json(self, status: int, payload: dict) -> None:
                self._bytes(status, json.dumps(payload).encode(), "application/json")

            def _bytes(self, status: int, data: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler
