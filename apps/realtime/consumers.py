"""The conversation socket (docs/protocol.md). Thin: it validates what the
client sends, hands audio to the socket's SpeechIngest (speech.py), runs the
reply task, and forwards group events. It never touches the ORM itself:
services run through database_sync_to_async."""

import asyncio
import json
import logging
import time

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from apps.accounts.services import user_quota_problem
from apps.conversations.selectors import (
    conversation_for_socket,
    messages_after,
    turn_unanswered,
)
from apps.conversations.services import (
    message_record_first_audio,
    replay_events,
    text_message_add,
)
from apps.pipeline.services import ReplyState, reply_cancel, reply_claim, reply_run
from apps.pipeline.vad import BYTES_PER_MS

from .events import PROTOCOL_VERSION, event, group_name
from .protocol import (
    AudioRateLimiter,
    ProtocolError,
    check_audio_frame,
    parse_control,
    parse_hello,
    parse_text,
)
from .speech import SpeechIngest

log = logging.getLogger(__name__)

CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404
CLOSE_UNSUPPORTED_PROTOCOL = 4400
AUDIO_CHUNK_BYTES = 32_768


class ConversationConsumer(AsyncWebsocketConsumer):
    async def dispatch(self, message):
        # Channels runs a sync_to_async hop (close_old_connections) before every
        # handler. This consumer never uses the ORM on the loop, so the hot
        # paths (socket frames and group events) skip it; see ARCHITECTURE.md.
        if message["type"] in ("websocket.connect", "websocket.disconnect"):
            return await super().dispatch(message)
        handler = getattr(self, message["type"].replace(".", "_"), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    # --- connection ------------------------------------------------------

    async def connect(self):
        self.conversation = None
        self.greeted = False
        self.reply_task: asyncio.Task | None = None
        self.reply_state = ReplyState()
        self.audio_sent: dict[str, int] = {}
        self.audio_waiting: dict[str, dict[int, dict]] = {}
        self.cancelled_replies: set[str] = set()
        self.error_sent_at: dict[str, float] = {}
        self.held: list[dict] = []  # group events that came before hello's replay
        self.sent_seqs: set[int] = set()  # stored turns this socket has been sent
        self.last_reply_id = ""
        self.background: set[asyncio.Task] = set()
        user = self.scope.get("user")
        await self.accept()
        if user is None or not user.is_authenticated:
            return await self.refuse(CLOSE_UNAUTHENTICATED, "unauthenticated", "Sign in first.")
        conversation_id = self.scope["url_route"]["kwargs"]["conversation_id"]
        conversation, problem = await database_sync_to_async(conversation_for_socket)(
            conversation_id=conversation_id, user=user
        )
        if problem == "not_found":
            return await self.refuse(CLOSE_NOT_FOUND, "not_found", "No such conversation.")
        if problem:
            return await self.refuse(
                CLOSE_FORBIDDEN, "forbidden", "This conversation belongs to someone else."
            )
        self.conversation = conversation
        self.user_id = user.pk
        persona = conversation.persona
        self.stt_kind = persona.stt_kind or settings.STT_KIND
        self.engines = {
            "stt": self.stt_kind,
            "llm": persona.llm_kind or settings.LLM_KIND,
            "tts": persona.tts_kind or settings.TTS_KIND,
        }
        self.speech = SpeechIngest(
            conversation_id=conversation.id,
            stt_kind=self.stt_kind,
            send=self.send_event,
            may_start=self.check_quota,
            started=self.speech_started,
        )
        self.rate = AudioRateLimiter(
            factor=settings.AUDIO_RATE_FACTOR, burst_ms=settings.AUDIO_RATE_BURST_S * 1000
        )
        await self.channel_layer.group_add(group_name(conversation.id), self.channel_name)

    async def refuse(self, code: int, error_code: str, message: str) -> None:
        await self.send_event(event("error", code=error_code, message=message, fatal=True))
        await self.close(code=code)

    async def disconnect(self, code):
        for task in self.background:
            task.cancel()
        if self.conversation is None:
            return
        await self.speech.close()  # keep what was said
        await self.channel_layer.group_discard(group_name(self.conversation.id), self.channel_name)

    # --- from the client -----------------------------------------------------

    async def receive(self, text_data=None, bytes_data=None):
        if self.conversation is None:
            return
        try:
            if bytes_data is not None:
                await self.audio_frame(bytes_data)
            else:
                await self.control(parse_control(text_data))
        except ProtocolError as exc:
            await self.send_error(exc.code, exc.message)

    async def control(self, message: dict) -> None:
        kind = message["type"]
        if kind == "hello":
            try:
                resume_from = parse_hello(message)
            except ProtocolError as exc:
                if exc.code != "unsupported_protocol":
                    raise
                return await self.refuse(CLOSE_UNSUPPORTED_PROTOCOL, exc.code, exc.message)
            return await self.hello(resume_from)
        if not self.greeted:
            raise ProtocolError("hello_required", 'Send {"type": "hello"} first.')
        if kind == "ping":
            await self.send_event(event("pong", t=message.get("t")))
        elif kind == "audio.end":
            await self.speech.end(reason="client")
        elif kind == "interrupt":
            await self.interrupt_reply(everywhere=True)
        elif kind == "text":
            await self.text(parse_text(message))

    async def hello(self, resume_from: int) -> None:
        conversation = self.conversation
        messages = await database_sync_to_async(messages_after)(
            conversation_id=conversation.id, seq=resume_from
        )
        await self.send_event(
            event(
                "ready",
                protocol=PROTOCOL_VERSION,
                conversation_id=str(conversation.id),
                persona={
                    "name": conversation.persona.name,
                    "slug": conversation.persona.slug,
                    "avatar": conversation.persona.avatar,
                },
                last_seq=max([resume_from, *(m.seq for m in messages)]),
                audio={
                    "sample_rate": 16000,
                    "format": "pcm_s16le",
                    "channels": 1,
                    "max_frame_bytes": settings.AUDIO_FRAME_MAX_BYTES,
                },
                engines=self.engines,
                llm_is_offline_echo=self.engines["llm"] == "echo",
            )
        )
        for replayed in await database_sync_to_async(replay_events)(messages=messages):
            await self.forward(replayed, replay=True)
        # Live events that came while replaying: send them, minus what the replay held.
        self.greeted = True
        held, self.held = self.held, []
        for message in held:
            await self.forward(message)
        # A turn that no socket answered (it dropped before its final came): answer it now.
        pending = await database_sync_to_async(turn_unanswered)(conversation_id=conversation.id)
        if pending is not None and await reply_claim(user_message_id=pending.id):
            await self.start_reply(final_at=time.time())

    async def text(self, text: str) -> None:
        await self.check_quota()
        await self.interrupt_reply(everywhere=True)
        message = await database_sync_to_async(text_message_add)(
            conversation_id=self.conversation.id, text=text
        )
        await reply_claim(user_message_id=message.id)
        await self.start_reply(final_at=time.time())

    async def check_quota(self) -> None:
        problem = await database_sync_to_async(user_quota_problem)(user_id=self.user_id)
        if problem:
            raise ProtocolError("quota_exceeded", problem)

    # --- audio in ----------------------------------------------------------------

    async def audio_frame(self, data: bytes) -> None:
        if not self.greeted:
            raise ProtocolError("hello_required", 'Send {"type": "hello"} before audio.')
        check_audio_frame(data)
        frame_ms = len(data) / BYTES_PER_MS
        if not self.rate.allow(frame_ms):
            raise ProtocolError(
                "rate_limited", "Audio is arriving faster than real time; frames were dropped."
            )
        await self.speech.frame(data)

    async def speech_started(self) -> None:
        await self.interrupt_reply(everywhere=True)  # barge-in

    # --- replies ---------------------------------------------------------------

    async def start_reply(self, *, final_at: float) -> None:
        await self.interrupt_reply()  # one reply at a time
        self.reply_state = ReplyState()
        self.reply_task = asyncio.create_task(
            reply_run(
                conversation_id=self.conversation.id, final_at=final_at, state=self.reply_state
            )
        )

    async def interrupt_reply(self, *, everywhere: bool = False) -> None:
        """Barge-in: stop the reply's tokens and drop its pending audio. A reply
        may run on another socket of the conversation (one that reconnected):
        `everywhere` asks the other sockets to stop theirs too."""
        state, task = self.reply_state, self.reply_task
        running_here = task is not None and not task.done()
        if running_here and not state.reply_id:
            task.cancel()  # still preparing: nothing said yet
            return
        if everywhere and not running_here:
            await self.interrupt_elsewhere()
        if not state.reply_id or state.reply_id in self.cancelled_replies:
            return
        if state.done and self.audio_sent.get(state.reply_id, 0) >= state.sentences:
            return  # fully said; nothing to interrupt
        self.cancelled_replies.add(state.reply_id)
        self.audio_waiting.pop(state.reply_id, None)
        if task is not None and not task.done():
            task.cancel()  # reply_run stores the partial reply and publishes reply.interrupted
        else:
            await self.send_event(
                event(
                    "reply.interrupted",
                    reply_id=state.reply_id,
                    seq=None,
                    text=state.text,
                    audio_only=True,
                )
            )
        await reply_cancel(reply_id=state.reply_id)

    async def interrupt_elsewhere(self) -> None:
        reply_id = self.last_reply_id
        own = reply_id == self.reply_state.reply_id  # handled by interrupt_reply
        if reply_id and not own and reply_id not in self.cancelled_replies:
            self.cancelled_replies.add(reply_id)
            self.audio_waiting.pop(reply_id, None)
            await reply_cancel(reply_id=reply_id)
        await self.channel_layer.group_send(
            group_name(self.conversation.id), {"type": "reply.cancel", "sender": self.channel_name}
        )

    async def reply_cancel(self, message: dict) -> None:
        if message["sender"] != self.channel_name:
            await self.interrupt_reply()

    async def claim_reply_later(self, message: dict) -> None:
        """Answer a final whose speaker's socket is gone: the socket that heard
        it claims it at once; any other waits a moment, then claims what is left."""
        await asyncio.sleep(1.5)
        if self.conversation is not None and await reply_claim(
            user_message_id=message["message_id"]
        ):
            await self.start_reply(final_at=time.time())

    # --- group events -> client ---------------------------------------------------

    async def transcript_partial(self, message: dict) -> None:
        await self.speech.partial(message)

    async def transcript_candidate(self, message: dict) -> None:
        await self.speech.candidate(message)

    async def transcript_final(self, message: dict) -> None:
        await self.forward(message)
        if message["source"] != "voice":
            return
        if self.speech.settled(message["utterance_id"]):  # this socket heard it: reply
            if await reply_claim(user_message_id=message["message_id"]):
                await self.start_reply(final_at=time.time())
        else:
            task = asyncio.create_task(self.claim_reply_later(message))
            self.background.add(task)
            task.add_done_callback(self.background.discard)

    async def transcript_empty(self, message: dict) -> None:
        self.speech.settled(message["utterance_id"])
        await self.forward(message)

    async def reply_delta(self, message: dict) -> None:
        self.last_reply_id = message["reply_id"]
        if message["reply_id"] not in self.cancelled_replies:
            await self.forward(message)

    async def reply_done(self, message: dict) -> None:
        await self.forward(message)

    async def reply_interrupted(self, message: dict) -> None:
        await self.forward(message)

    async def error(self, message: dict) -> None:
        await self.forward(message)

    async def forward(self, message: dict, *, replay: bool = False) -> None:
        """Send a group event (or a replayed turn) once: events that arrive
        before hello's replay is sent wait for it, and a stored turn (by seq)
        is never sent twice."""
        if not self.greeted and not replay:
            self.held.append(message)
            return
        seq = message.get("seq")
        if seq is not None:
            if seq in self.sent_seqs:
                return
            self.sent_seqs.add(seq)
        await self.send_event(message)

    async def reply_audio(self, message: dict) -> None:
        """Sentences may be synthesised out of order; send them in order."""
        reply_id = message["reply_id"]
        if not self.greeted:
            self.cancelled_replies.add(reply_id)  # began before this socket: text only
        if reply_id in self.cancelled_replies:
            return
        waiting = self.audio_waiting.setdefault(reply_id, {})
        waiting[message["index"]] = message
        next_index = self.audio_sent.setdefault(reply_id, 0)
        while next_index in waiting:
            await self.send_audio(waiting.pop(next_index))
            next_index += 1
            self.audio_sent[reply_id] = next_index

    async def send_audio(self, message: dict) -> None:
        pcm = message["pcm"]
        extra = {}
        state = self.reply_state
        if message["index"] == 0 and state.reply_id == message["reply_id"] and state.first_token_at:
            first_audio_ms = max(0, round((time.time() - state.first_token_at) * 1000))
            extra["first_token_to_first_audio_ms"] = first_audio_ms
            await database_sync_to_async(message_record_first_audio)(
                message_id=state.reply_id, first_token_to_first_audio_ms=first_audio_ms
            )
        await self.send_event(
            event(
                "reply.audio.start",
                reply_id=message["reply_id"],
                index=message["index"],
                sample_rate=message["sample_rate"],
                format="pcm_s16le",
                bytes=len(pcm),
                engine=message.get("engine", ""),
                **extra,
            )
        )
        for offset in range(0, len(pcm), AUDIO_CHUNK_BYTES):
            await self.send(bytes_data=pcm[offset : offset + AUDIO_CHUNK_BYTES])

    # --- sending ---------------------------------------------------------------------

    async def send_event(self, message: dict) -> None:
        await self.send(text_data=json.dumps(message))

    async def send_error(self, code: str, message: str) -> None:
        """Errors from a flood of bad frames are sent at most once a second per code."""
        now = time.monotonic()
        if now - self.error_sent_at.get(code, -10.0) < 1.0:
            return
        self.error_sent_at[code] = now
        await self.send_event(event("error", code=code, message=message))
