"""The conversation socket (docs/protocol.md): transport only. It parses what
the client sends and what the conversation's group delivers, hands each to
the socket's Session (session.py), and sends. It never touches the ORM, and
nothing on a frame waits for I/O: the few services it needs run through
database_sync_to_async."""

import asyncio
import json
import logging
from collections.abc import Coroutine

from autobahn.exception import Disconnected
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.db import DatabaseError
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import RedisError

from apps.observability import metrics
from apps.observability.logging import ids_bind, request_id_of_scope

from .admission import admission_refusal, admission_release
from .broadcast import bind_home_loop
from .drain import CLOSE_SERVICE_RESTART, drain
from .events import event, group_name, user_group_name
from .protocol import ProtocolError, parse_control, parse_hello, parse_text
from .services import SocketContext, socket_open
from .session import Session

log = logging.getLogger(__name__)

CLOSE_UNSUPPORTED_PROTOCOL, CLOSE_UNAUTHENTICATED, CLOSE_FORBIDDEN, CLOSE_NOT_FOUND = (
    4400, 4401, 4403, 4404,
)  # fmt: skip
REFUSALS = {
    "not_found": (CLOSE_NOT_FOUND, "No such conversation."),
    "forbidden": (CLOSE_FORBIDDEN, "This conversation belongs to someone else."),
}
# A service the socket depends on failed (Redis, the broker, the database): the
# client gets `error` `service_unavailable` and the socket stays open.
SERVICE_ERRORS = (OSError, TimeoutError, RedisError, DatabaseError, KombuOperationalError)


class ConversationConsumer(AsyncWebsocketConsumer):
    session: Session | None = None
    admitted_user: int | None = None  # holds one of the user's socket leases
    closed = False  # by us or by the client: from then on, sending is a no-op
    in_group = False  # joined at the first hello: no group events are held before it
    watchdog: asyncio.TimerHandle | None = None

    async def dispatch(self, message):
        # Channels runs a sync_to_async hop (close_old_connections) before every
        # handler; this consumer never uses the ORM on the loop, so frames and
        # group events skip it. A handler's failure is an error event for the
        # client, never a closed socket; only a refusal with a close code (a
        # limit of limits.py: flood, size, timers) closes it.
        if message["type"] in ("websocket.connect", "websocket.disconnect"):
            return await super().dispatch(message)
        try:
            await getattr(self, message["type"].replace(".", "_"))(message)
        except ProtocolError as exc:
            if exc.close_code is not None:
                return await self.refuse(exc.close_code, exc.code, exc.message)
            await self.send_error(exc.code, exc.message)
        except SERVICE_ERRORS as exc:
            log.warning("%s failed: %r", message["type"], exc)
            await self.send_error("service_unavailable", "A service is briefly unavailable.")

    async def connect(self):
        self.background: set[asyncio.Task] = set()
        self.error_sent_at: dict[str, float] = {}
        # The socket's ids live in this consumer's task: every handler, and every
        # task it spawns or enqueues, logs with them (apps/observability/logging.py).
        ids_bind(request_id=request_id_of_scope(self.scope))
        await self.accept()
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            return await self.refuse(CLOSE_UNAUTHENTICATED, "unauthenticated", "Sign in first.")
        conversation_id = self.scope["url_route"]["kwargs"]["conversation_id"]
        ids_bind(user_id=user.pk, conversation_id=conversation_id)
        context, problem = await database_sync_to_async(socket_open)(
            conversation_id=conversation_id, user=user
        )
        if context is None:
            return await self.refuse(*REFUSALS[problem][:1], problem, REFUSALS[problem][1])
        # overload (the stt backlog) and the user's concurrent sockets (admission.py)
        refusal = await admission_refusal(user_id=user.pk, channel=self.channel_name)
        if refusal is not None:
            return await self.refuse(*refusal)
        self.admitted_user = user.pk
        if not drain.join(self):  # this process drains: the client reconnects elsewhere
            metrics.SOCKETS_OPENED.labels(str(CLOSE_SERVICE_RESTART)).inc()
            return await self.close(code=CLOSE_SERVICE_RESTART, reason="server restarting")
        bind_home_loop(asyncio.get_running_loop())
        self.session = Session(
            context,
            send_event=self.send_event,
            send_bytes=self.send_bytes,
            send_error=self.send_error,
            spawn=self.spawn,
        )
        metrics.SOCKETS_ACCEPTED.inc()
        metrics.SOCKETS_OPEN.inc()
        # A logout, password change or deactivation reaches the socket on its user's group.
        await self.channel_layer.group_add(user_group_name(user.pk), self.channel_name)
        if hasattr(self.channel_layer, "on_rejoin"):  # Redis: resync after it restarts
            self.channel_layer.on_rejoin(self.channel_name, self.resync)
        self.watch()
        log.info("socket opened")

    async def refuse(self, code: int, error_code: str, message: str) -> None:
        log.info("socket refused: %s, close code %d", error_code, code)
        metrics.SOCKETS_OPENED.labels(str(code)).inc()
        await self.send_event(event("error", code=error_code, message=message, fatal=True))
        await self.close(code=code)

    async def disconnect(self, code):
        log.info("socket closed: code %s", code)
        self.closed = True
        metrics.SOCKET_CLOSES.labels(str(code)).inc()
        if self.watchdog is not None:
            self.watchdog.cancel()
        for task in self.background:
            task.cancel()
        session, self.session = self.session, None
        try:
            if session is not None:
                metrics.SOCKETS_OPEN.dec()
                context = session.context  # session.close() lets go of everything
                await session.close()  # keeps what was said, first
                await self.groups_leave(context)
        finally:
            if hasattr(self.channel_layer, "forget"):
                self.channel_layer.forget(self.channel_name)
            if self.admitted_user is not None:
                await admission_release(user_id=self.admitted_user, channel=self.channel_name)
            drain.leave(self)  # a shutdown waits for this (drain.py)

    async def resync(self) -> None:
        if self.session is not None and not self.closed:
            await self.session.resync()

    async def groups_leave(self, context: SocketContext) -> None:
        """Best effort: a membership the layer cannot drop now expires by itself."""
        groups = [user_group_name(context.user_id)]
        if self.in_group:
            groups.append(group_name(context.conversation_id))
        for group in groups:
            try:
                await self.channel_layer.group_discard(group, self.channel_name)
            except SERVICE_ERRORS as exc:
                log.warning("leaving %s failed: %r", group, exc)

    # --- from the client ---------------------------------------------------------

    async def websocket_receive(self, message):
        session = self.session
        if session is None or self.closed:
            return  # refused or closing: ignore what follows
        now = asyncio.get_running_loop().time()
        data = message.get("bytes")
        if data is not None:
            metrics.AUDIO_FRAMES.inc()
            metrics.AUDIO_BYTES.inc(len(data))
            session.limits.binary(len(data), now)  # limits.py: rates, size; raises to refuse
            return await session.frame(data, now)
        text = message.get("text") or ""
        size = len(text.encode())
        metrics.CONTROL_FRAMES.inc()
        metrics.CONTROL_BYTES.inc(size)
        session.limits.text(size, now)
        control = parse_control(text)
        kind = control["type"]
        if kind == "hello":
            session.limits.hello(now)
            return await self.hello(control)
        if not session.resume.greeted:
            raise ProtocolError("hello_required", 'Send {"type": "hello"} first.')
        if kind == "ping":
            await self.send_event(event("pong", t=control.get("t")))
        elif kind == "audio.end":
            await session.speech.end(reason="client")
        elif kind == "interrupt":
            await session.replies.stop_everywhere()
        elif kind == "text":
            await session.text(parse_text(control))

    async def hello(self, control: dict) -> None:
        assert self.session is not None
        try:
            resume_from = parse_hello(control)
        except ProtocolError as exc:
            if exc.code != "unsupported_protocol":
                raise
            return await self.refuse(CLOSE_UNSUPPORTED_PROTOCOL, exc.code, exc.message)
        if not self.in_group:  # before the replay is read: nothing stored after it is missed
            conversation_id = self.session.context.conversation_id
            await self.channel_layer.group_add(group_name(conversation_id), self.channel_name)
            self.in_group = True
        await self.session.hello(resume_from)

    # --- group events ------------------------------------------------------------------

    @property
    def joined(self) -> Session:
        assert self.session is not None  # the socket joins its group after its session exists
        return self.session

    async def transcript_partial(self, message: dict) -> None:
        await self.joined.speech.partial(message)

    async def transcript_candidate(self, message: dict) -> None:
        await self.joined.speech.candidate(message)

    async def transcript_final(self, message: dict) -> None:
        await self.joined.final(message)

    async def transcript_empty(self, message: dict) -> None:
        await self.joined.empty(message)

    async def reply_delta(self, message: dict) -> None:
        await self.joined.delta(message)

    async def reply_audio(self, message: dict) -> None:
        await self.joined.audio.push(message, greeted=self.joined.resume.greeted)

    async def reply_stop(self, message: dict) -> None:
        await self.joined.replies.stopped(message["issued_at"])

    async def reply_done(self, message: dict) -> None:
        await self.joined.resume.forward(message)

    async def reply_interrupted(self, message: dict) -> None:
        await self.joined.resume.forward(message)

    async def session_ended(self, message: dict) -> None:
        """The user logged out (this session or another), changed password or was
        deactivated (apps.accounts.services.user_sockets_end)."""
        key = message["session_key"]
        if key and key != self.scope["session"].session_key:
            return  # another device's session ended
        log.info("socket closed: the user's session ended (%s)", message["reason"])
        await self.send_event(
            event("error", code="signed_out", message="You are signed out.", fatal=True)
        )
        await self.close(code=CLOSE_UNAUTHENTICATED)

    async def error(self, message: dict) -> None:
        await self.joined.resume.forward(message)

    # --- sending -----------------------------------------------------------------------

    def watch(self) -> None:
        """The hello, idle and session timers (limits.py), on one timer handle."""
        session = self.session
        if self.closed or session is None:
            return
        loop = asyncio.get_running_loop()
        greeted = session.resume.greeted
        expired = session.limits.expired(greeted=greeted, now=loop.time())
        if expired is not None:
            assert expired.close_code is not None
            self.spawn(self.refuse(expired.close_code, expired.code, expired.message))
            return
        delay = session.limits.next_check(greeted=greeted, now=loop.time())
        self.watchdog = loop.call_later(delay, self.watch)

    def spawn(self, coroutine: Coroutine) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    async def send(self, text_data=None, bytes_data=None, close=False):
        """The one way out to the client. Once the socket is closed (by a refusal
        here or by the client), sending is a no-op: Daphne would raise."""
        if self.closed:
            return
        try:
            await super().send(text_data, bytes_data, close)
        except Disconnected:  # the client's close came in while this was being sent
            self.closed = True

    async def close(self, code=None, reason=None):
        if self.closed:
            return
        self.closed = True
        await super().close(code, reason)

    async def send_event(self, message: dict) -> None:
        await self.send(text_data=json.dumps(message))

    async def send_bytes(self, data: bytes) -> None:
        await self.send(bytes_data=data)

    async def send_error(self, code: str, message: str) -> None:
        """Errors from a flood of bad frames are sent at most once a second per code."""
        metrics.PROTOCOL_ERRORS.labels(code).inc()
        now = asyncio.get_running_loop().time()
        if now - self.error_sent_at.get(code, -10.0) < 1.0:
            return
        self.error_sent_at[code] = now
        await self.send_event(event("error", code=code, message=message))
