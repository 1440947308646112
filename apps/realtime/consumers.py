"""The conversation socket (docs/protocol.md): transport only. It checks
what the client sends and hands it to the socket's owners: SpeechIngest (its
utterances), ReplyController (its replies and the one way to stop them),
AudioSequencer (reply audio out, in order) and ResumeGate (what a
reconnecting socket is sent, each turn once). It never touches the ORM: the
few services it needs run through database_sync_to_async, never on a frame."""

import asyncio
import json
import logging
from collections.abc import Coroutine

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.db import DatabaseError
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import RedisError

from apps.conversations.services import message_record_first_audio, text_message_add
from apps.pipeline.audio_store import audio_store
from apps.pipeline.vad import BYTES_PER_MS

from .audio_out import AudioSequencer
from .broadcast import bind_home_loop
from .events import PROTOCOL_VERSION, event, group_name
from .live import live_writer
from .protocol import AudioRateLimiter as RateLimiter
from .protocol import ProtocolError, check_audio_frame, parse_control, parse_hello, parse_text
from .quota import QuotaGate
from .replies import ReplyController
from .resume import ResumeGate
from .services import SocketContext, socket_open, socket_resume
from .speech import SpeechIngest

log = logging.getLogger(__name__)

CLOSE_UNSUPPORTED_PROTOCOL, CLOSE_UNAUTHENTICATED, CLOSE_FORBIDDEN, CLOSE_NOT_FOUND = (
    4400, 4401, 4403, 4404,
)  # fmt: skip
# Failures of a service the socket depends on (Redis, the broker, the database):
# the client gets `error` `service_unavailable` and the socket stays open.
SERVICE_ERRORS = (OSError, TimeoutError, RedisError, DatabaseError, KombuOperationalError)


class ConversationConsumer(AsyncWebsocketConsumer):
    context: SocketContext | None = None

    async def dispatch(self, message):
        # Channels runs a sync_to_async hop (close_old_connections) before every
        # handler; this consumer never uses the ORM on the loop, so frames and
        # group events skip it. Any failure of a handler is the client's error
        # event, never a closed socket.
        if message["type"] in ("websocket.connect", "websocket.disconnect"):
            return await super().dispatch(message)
        try:
            await getattr(self, message["type"].replace(".", "_"))(message)
        except ProtocolError as exc:
            await self.send_error(exc.code, exc.message)
        except SERVICE_ERRORS as exc:
            log.warning("%s failed: %r", message["type"], exc)
            await self.send_error("service_unavailable", "A service is briefly unavailable.")

    async def connect(self):
        self.background: set[asyncio.Task] = set()
        self.error_sent_at: dict[str, float] = {}
        await self.accept()
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            return await self.refuse(CLOSE_UNAUTHENTICATED, "unauthenticated", "Sign in first.")
        conversation_id = self.scope["url_route"]["kwargs"]["conversation_id"]
        context, problem = await database_sync_to_async(socket_open)(
            conversation_id=conversation_id, user=user
        )
        if context is None:
            code, text = {
                "not_found": (CLOSE_NOT_FOUND, "No such conversation."),
                "forbidden": (CLOSE_FORBIDDEN, "This conversation belongs to someone else."),
            }[problem]
            return await self.refuse(code, problem, text)
        bind_home_loop(asyncio.get_running_loop())
        live = live_writer()
        self.resume = ResumeGate(send=self.send_event)
        self.audio = AudioSequencer(
            send_event=self.send_event,
            send_bytes=self.send_bytes,
            fetch=audio_store().aget,
            timing=self.first_audio,
        )
        self.replies = ReplyController(
            conversation_id=context.conversation_id,
            live=live,
            audio=self.audio,
            send=self.send_event,
            spawn=self.spawn,
        )
        self.quota = QuotaGate(
            user_id=context.user_id, problem=context.quota_problem, spawn=self.spawn
        )
        self.speech = SpeechIngest(
            conversation_id=context.conversation_id,
            stt_kind=context.engines.stt,
            live=live,
            send=self.send_event,
            report=lambda code, text: self.spawn(self.send_error(code, text)),
            may_start=self.quota.check,
            started=self.replies.stop_everywhere,  # barge-in
            finalized=self.replies.answer,
        )
        self.rate = RateLimiter(
            factor=settings.AUDIO_RATE_FACTOR, burst_ms=settings.AUDIO_RATE_BURST_S * 1000
        )
        self.context = context
        await self.channel_layer.group_add(group_name(context.conversation_id), self.channel_name)

    async def refuse(self, code: int, error_code: str, message: str) -> None:
        await self.send_event(event("error", code=error_code, message=message, fatal=True))
        await self.close(code=code)

    async def disconnect(self, code):
        for task in self.background:
            task.cancel()
        if self.context is None:
            return
        await self.speech.close()  # keep what was said
        await self.channel_layer.group_discard(
            group_name(self.context.conversation_id), self.channel_name
        )

    # --- from the client ---------------------------------------------------------

    async def websocket_receive(self, message):
        if self.context is None:
            return
        if message.get("bytes") is not None:
            return await self.audio_frame(message["bytes"])
        control = parse_control(message.get("text") or "")
        kind = control["type"]
        if kind == "hello":
            return await self.hello(control)
        if not self.resume.greeted:
            raise ProtocolError("hello_required", 'Send {"type": "hello"} first.')
        if kind == "ping":
            await self.send_event(event("pong", t=control.get("t")))
        elif kind == "audio.end":
            await self.speech.end(reason="client")
        elif kind == "interrupt":
            await self.replies.stop_everywhere()
        elif kind == "text":
            await self.text(parse_text(control))

    async def audio_frame(self, data: bytes) -> None:
        if not self.resume.greeted:
            raise ProtocolError("hello_required", 'Send {"type": "hello"} before audio.')
        check_audio_frame(data)
        if not self.rate.allow(len(data) / BYTES_PER_MS):
            raise ProtocolError(
                "rate_limited", "Audio is arriving faster than real time; frames were dropped."
            )
        await self.speech.frame(data)

    async def hello(self, control: dict) -> None:
        try:
            resume_from = parse_hello(control)
        except ProtocolError as exc:
            if exc.code != "unsupported_protocol":
                raise
            return await self.refuse(CLOSE_UNSUPPORTED_PROTOCOL, exc.code, exc.message)
        context = self.context
        assert context is not None
        resume = await database_sync_to_async(socket_resume)(
            conversation_id=context.conversation_id, resume_from=resume_from
        )
        audio = {"sample_rate": 16000, "format": "pcm_s16le", "channels": 1}
        await self.send_event(
            event(
                "ready",
                protocol=PROTOCOL_VERSION,
                conversation_id=str(context.conversation_id),
                persona=context.persona,
                last_seq=resume.last_seq,
                audio={**audio, "max_frame_bytes": settings.AUDIO_FRAME_MAX_BYTES},
                engines={"stt": context.engines.stt, "llm": context.engines.llm,
                         "tts": context.engines.tts},
                llm_is_offline_echo=context.engines.llm == "echo",
            )
        )  # fmt: skip
        await self.resume.open(resume.events)
        if resume.unanswered_id is not None:  # its socket dropped before its final came
            await self.replies.answer(resume.unanswered_id)

    async def text(self, text: str) -> None:
        assert self.context is not None
        await self.quota.refresh()
        self.quota.check()
        await self.replies.stop_everywhere()
        message = await database_sync_to_async(text_message_add)(
            conversation_id=self.context.conversation_id, text=text
        )
        await self.replies.answer(str(message.id))

    # --- group events -> client ------------------------------------------------------

    async def transcript_partial(self, message: dict) -> None:
        await self.speech.partial(message)

    async def transcript_candidate(self, message: dict) -> None:
        await self.speech.candidate(message)

    async def transcript_final(self, message: dict) -> None:
        await self.resume.forward(message)
        if message["source"] == "voice":
            heard = self.speech.heard(message["utterance_id"])
            if heard == "mine":
                await self.replies.answer(message["message_id"])
            elif heard == "other":
                self.replies.answer_later(message["message_id"])

    async def transcript_empty(self, message: dict) -> None:
        self.speech.heard(message["utterance_id"])
        await self.resume.forward(message)

    async def reply_delta(self, message: dict) -> None:
        if self.resume.greeted:
            self.audio.known(message["reply_id"])
        if message["reply_id"] not in self.audio.dropped:
            await self.resume.forward(message)

    async def reply_audio(self, message: dict) -> None:
        await self.audio.push(message, greeted=self.resume.greeted)

    async def reply_stop(self, message: dict) -> None:
        await self.replies.stopped(message["issued_at"])

    async def reply_done(self, message: dict) -> None:
        await self.resume.forward(message)

    async def reply_interrupted(self, message: dict) -> None:
        await self.resume.forward(message)

    async def error(self, message: dict) -> None:
        await self.resume.forward(message)

    # --- sending -------------------------------------------------------------------

    def first_audio(self, reply_id: str) -> dict:
        ms = self.replies.first_audio_ms(reply_id)
        if ms is None:
            return {}
        self.spawn(
            database_sync_to_async(message_record_first_audio)(
                message_id=reply_id, first_token_to_first_audio_ms=ms
            )
        )
        return {"first_token_to_first_audio_ms": ms}

    def spawn(self, coroutine: Coroutine) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    async def send_event(self, message: dict) -> None:
        await self.send(text_data=json.dumps(message))

    async def send_bytes(self, data: bytes) -> None:
        await self.send(bytes_data=data)

    async def send_error(self, code: str, message: str) -> None:
        """Errors from a flood of bad frames are sent at most once a second per code."""
        now = asyncio.get_running_loop().time()
        if now - self.error_sent_at.get(code, -10.0) < 1.0:
            return
        self.error_sent_at[code] = now
        await self.send_event(event("error", code=code, message=message))
