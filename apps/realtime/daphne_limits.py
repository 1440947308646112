"""The socket limits Daphne enforces before the application (docs/protocol.md,
section 12), installed once at start-up from config/asgi.py, which every way
of starting a web process runs (scripts/run.sh, deploy/docker-entrypoint.sh,
tests/live.start_daphne): one place, read from settings, whatever the command
line says.

- Message size: Daphne hands autobahn's WebSocketServerFactory its
  `--websocket-max-message-size` and `--websocket-max-frame-size` (1 MiB by
  default) through `setProtocolOptions`; here both are capped at
  WS_MESSAGE_MAX_BYTES, so autobahn fails a bigger message with **1009** (Message
  Too Big) while reading it, before it is buffered whole or reaches the
  consumer. A command line may set a lower cap, never a higher one. Failures
  close with a handshake (`failByDrop=False`), so the client sees the code.
- Close code 1009 from the consumer (a message over the cap that reached it
  anyway): autobahn's `sendClose`, which Daphne closes with, takes only 1000 and
  3000-4999, so 1009 goes out through autobahn's lower-level `sendCloseFrame`
  (as apps/realtime/drain.py does for 1012)."""

from __future__ import annotations

from typing import Any

from .limits import CLOSE_TOO_BIG

PAYLOAD_OPTIONS = ("maxMessagePayloadSize", "maxFramePayloadSize")


def daphne_limits_install(*, max_message_bytes: int) -> None:
    from daphne.ws_protocol import WebSocketFactory, WebSocketProtocol

    set_options = WebSocketFactory.setProtocolOptions
    if not getattr(set_options, "parley_capped", False):

        def capped(self, *args: Any, **options: Any) -> None:
            for name in PAYLOAD_OPTIONS:
                given = options.get(name)
                if given is not None and (given <= 0 or given > max_message_bytes):
                    options[name] = max_message_bytes
            # fail with a closing handshake, not a dropped TCP connection (autobahn's
            # default): the client sees 1009 (too big) or 1007 (a text frame that is not
            # UTF-8), not 1006
            options.setdefault("failByDrop", False)
            set_options(self, *args, **options)

        capped.parley_capped = True  # type: ignore[attr-defined]
        WebSocketFactory.setProtocolOptions = capped

    server_close = WebSocketProtocol.serverClose
    if not getattr(server_close, "parley_allows_too_big", False):

        def close(self, code=None):
            if code != CLOSE_TOO_BIG:
                return server_close(self, code)
            self.sendCloseFrame(code=code, reasonUtf8=b"message too big", isReply=False)

        close.parley_allows_too_big = True  # type: ignore[attr-defined]
        WebSocketProtocol.serverClose = close
