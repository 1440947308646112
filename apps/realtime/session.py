"""One socket's conversation session: it wires the lifecycle owners together
and runs what the client asks for. SpeechIngest owns the utterances,
ReplyController the replies (and the one way to stop them), AudioSequencer
the reply audio going out, ResumeGate what a (re)connecting socket is sent,
QuotaGate this socket's share of the user's daily quotas. The consumer
(consumers.py) is the transport: it parses, routes and sends; this module
decides."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine

from channels.db import database_sync_to_async
from django.conf import settings

from apps.conversations.services import message_record_first_audio, text_message_add
from apps.observability import metrics
from apps.pipeline.audio_store import audio_store
from apps.pipeline.vad import BYTES_PER_MS

from .audio_out import AudioSequencer
from .events import PROTOCOL_VERSION, event
from .limits import Limits, SocketLimits
from .live import live_writer
from .protocol import ProtocolError, check_audio_frame
from .quota import QuotaGate
from .replies import ReplyController
from .resume import ResumeGate
from .services import SocketContext, socket_resume
from .speech import SpeechIngest


class Session:
    last_audio_at = -1e9  # time.monotonic() of the last audio frame (sockets streaming)

    def __init__(
        self,
        context: SocketContext,
        *,
        send_event: Callable[[dict], Awaitable[None]],
        send_bytes: Callable[[bytes], Awaitable[None]],
        send_error: Callable[[str, str], Coroutine[object, object, None]],
        spawn: Callable[[Coroutine], asyncio.Task],
    ) -> None:
        live = live_writer()
        self.context = context
        self.send_event = send_event
        self.spawn = spawn
        self.resume = ResumeGate(send=send_event)
        self.audio = AudioSequencer(
            send_event=send_event, send_bytes=send_bytes, fetch=audio_store().aget,
            timing=self.first_audio,
        )  # fmt: skip
        self.replies = ReplyController(
            conversation_id=context.conversation_id, live=live, audio=self.audio,
            send=send_event, spawn=spawn, tokens_per_day=context.tokens_per_day,
        )  # fmt: skip
        self.quota = QuotaGate(
            user_id=context.user_id, audio_seconds_per_day=context.audio_seconds_per_day,
            tokens_per_day=context.tokens_per_day, spawn=spawn,
        )  # fmt: skip
        self.quota.top_up()  # the first chunk of speaking time, before the user speaks
        self.speech = SpeechIngest(
            conversation_id=context.conversation_id,
            stt_kind=context.engines.stt,
            live=live,
            send=send_event,
            report=lambda code, text: spawn(send_error(code, text)),
            may_start=self.quota.may_start,
            spend=self.quota.spend,
            started=self.replies.stop_everywhere,  # barge-in
            finalized=self.replies.answer,  # a final made here: its reply starts at once
        )
        self.limits = SocketLimits(Limits.from_settings(), now=asyncio.get_running_loop().time())
        metrics.streaming_track(self)

    async def close(self) -> None:
        """The socket is gone: keep what was said, then let go of everything, so
        that reference counting frees the session at once (its owners point back
        at each other: left to the cycle collector, hundreds of closing sockets
        make one long pause for every other socket)."""
        await self.speech.close()
        await self.quota.give_back()
        self.__dict__.clear()

    # --- from the client -------------------------------------------------------

    async def frame(self, data: bytes, now: float | None = None) -> None:
        """One binary frame, counted already (limits.binary, in the consumer)."""
        if not self.resume.greeted:
            raise ProtocolError("hello_required", 'Send {"type": "hello"} before audio.')
        check_audio_frame(data)
        now = asyncio.get_running_loop().time() if now is None else now
        self.limits.audio(len(data) / BYTES_PER_MS, now)  # raises rate_limited
        self.last_audio_at = time.monotonic()
        await self.speech.frame(data)

    async def hello(self, resume_from: int) -> None:
        context = self.context
        resume = await database_sync_to_async(socket_resume)(
            conversation_id=context.conversation_id, resume_from=resume_from
        )
        engines = context.engines
        await self.send_event(
            event(
                "ready",
                protocol=PROTOCOL_VERSION,
                conversation_id=str(context.conversation_id),
                persona=context.persona,
                last_seq=resume.last_seq,
                audio={"sample_rate": 16000, "format": "pcm_s16le", "channels": 1,
                       "max_frame_bytes": settings.AUDIO_FRAME_MAX_BYTES},
                engines={"stt": engines.stt, "llm": engines.llm, "tts": engines.tts},
                llm_is_offline_echo=engines.llm == "echo",
                llm_is_offline_small=engines.llm == "local",
            )
        )  # fmt: skip
        self.resume.last_seq = max(self.resume.last_seq, resume.last_seq)
        await self.resume.open(resume.events)
        if resume.unanswered_id is not None:  # its socket dropped before its final came
            await self.replies.answer(resume.unanswered_id)

    async def resync(self) -> None:
        """The channel layer may have lost events (its Redis restarted, layer.py):
        send what was stored after the newest turn this socket knows of, once each,
        and answer a turn left without a reply."""
        if not self.resume.greeted:
            return  # its hello will read everything
        resume = await database_sync_to_async(socket_resume)(
            conversation_id=self.context.conversation_id, resume_from=self.resume.last_seq
        )
        for message in resume.events:
            await self.resume.forward(message)
        if resume.unanswered_id is not None:
            await self.replies.answer(resume.unanswered_id)

    async def text(self, text: str) -> None:
        await self.quota.check_tokens()
        await self.replies.stop_everywhere()
        message = await database_sync_to_async(text_message_add)(
            conversation_id=self.context.conversation_id, text=text
        )
        await self.replies.answer(str(message.id))

    # --- from the conversation's group ---------------------------------------------

    async def final(self, message: dict) -> None:
        await self.resume.forward(message)
        if message["source"] != "voice":
            return
        heard = self.speech.heard(message["utterance_id"])
        if heard == "mine":
            await self.replies.answer(message["message_id"])
        elif heard == "other":
            self.replies.answer_later(message["message_id"])

    async def empty(self, message: dict) -> None:
        self.speech.heard(message["utterance_id"])
        await self.resume.forward(message)

    async def delta(self, message: dict) -> None:
        if self.resume.greeted:
            self.audio.known(message["reply_id"])
        if message["reply_id"] not in self.audio.dropped:
            await self.resume.forward(message)

    def first_audio(self, reply_id: str) -> dict:
        """The latency of a reply's first audio, when this socket started it."""
        ms = self.replies.first_audio_ms(reply_id)
        if ms is None:
            return {}
        running = self.replies.last
        if running is not None and running.state.reply_id == reply_id and not running.state.done:
            running.state.first_audio_ms = ms  # stored with the reply when it ends: no query
            return {"first_token_to_first_audio_ms": ms}
        self.spawn(
            database_sync_to_async(message_record_first_audio)(
                message_id=reply_id,
                first_token_to_first_audio_ms=ms,
                tts_kind=self.context.engines.tts,
            )
        )  # stored in the background: the audio does not wait for the database
        return {"first_token_to_first_audio_ms": ms}
