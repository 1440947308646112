"""The replies one socket runs, and the one way to stop a reply.

A reply belongs to the conversation, not to a socket: whichever socket of the
conversation sees a final first claims its reply (`reply_claim`, SET NX), and
the process's ReplyRunner runs it as a task on this process's loop; it goes on
if that socket closes. Stopping takes one mechanism: `reply_stop` sends
`reply.stop` to the conversation's group; the runner that runs a reply begun
before the stop cancels it, and every socket drops that reply's audio."""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from uuid import UUID

from channels import DEFAULT_CHANNEL_LAYER
from channels.layers import InMemoryChannelLayer, channel_layers, get_channel_layer

from apps.pipeline.services import (
    ReplyState,
    reply_audio_skip,
    reply_claim,
    reply_run,
    reply_stop,
)

from .audio_out import AudioSequencer
from .events import event, group_name
from .live import LiveWriter, live_writer

ORPHAN_CLAIM_DELAY_S = 1.5


@dataclass(eq=False)
class RunningReply:
    conversation_id: str
    state: ReplyState
    started_at: float
    task: asyncio.Task | None = field(default=None, repr=False)
    stopped: bool = False  # cancelled once: a second cancel would cut its own clean-up


class ReplyRunner:
    """The replies this process runs, for whichever socket claimed them. While a
    conversation has a reply running here, the runner's own channel is in the
    conversation's group, so a stop reaches the reply even after the socket
    that started it has closed."""

    def __init__(self) -> None:
        self.running: dict[str, list[RunningReply]] = {}
        self.channel = ""
        self.listener: asyncio.Task | None = None
        # A layer object of its own: channels_redis shares one receive lock among
        # a layer's receivers, and a second long-lived receiver on the sockets'
        # layer stalled their inbox (seen in services mode). The in-memory layer
        # keeps its groups in the object, so it is shared.
        layer = get_channel_layer()
        if not isinstance(layer, InMemoryChannelLayer):
            layer = channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)
        self.layer = layer

    async def start(
        self, *, conversation_id: str, live: LiveWriter, on_begin, tokens_per_day: int = 0
    ) -> RunningReply:
        layer = self.layer
        if not self.channel:
            self.channel = await layer.new_channel("replies.")
            self.listener = asyncio.get_running_loop().create_task(self.listen())
        if conversation_id not in self.running:
            self.running[conversation_id] = []
            await layer.group_add(group_name(conversation_id), self.channel)
        reply = RunningReply(conversation_id, ReplyState(), time.time())

        def begun(reply_id: str) -> None:
            live.reply_open(reply_id=reply_id, conversation_id=conversation_id)
            on_begin(reply_id)

        run = self.run(reply, begun, tokens_per_day)
        reply.task = asyncio.get_running_loop().create_task(run)
        self.running[conversation_id].append(reply)
        return reply

    async def run(self, reply: RunningReply, begun, tokens_per_day: int) -> None:
        try:
            await reply_run(
                conversation_id=UUID(reply.conversation_id),
                final_at=reply.started_at,
                state=reply.state,
                on_begin=begun,
                tokens_per_day=tokens_per_day,
            )
        except asyncio.CancelledError:
            pass  # stopped: reply_run stored what was said
        finally:
            replies = self.running[reply.conversation_id]
            replies.remove(reply)
            if reply.state.reply_id:
                live_writer().reply_close(reply.state.reply_id)
            if not replies:
                del self.running[reply.conversation_id]
                group = group_name(reply.conversation_id)
                await self.layer.group_discard(group, self.channel)

    def stop(self, conversation_id: str, issued_at: float) -> None:
        """Cancel this process's replies of the conversation started before `issued_at`."""
        for reply in self.running.get(conversation_id, []):
            if reply.started_at <= issued_at and reply.task is not None and not reply.stopped:
                # Once: the same stop also comes back through the group, and a second
                # cancel during the first one's clean-up left the turn "streaming".
                reply.stopped = reply.state.stopped = True
                reply.task.cancel()

    async def listen(self) -> None:
        layer = self.layer
        while True:
            message = await layer.receive(self.channel)
            if message.get("type") == "reply.stop":
                self.stop(message.get("conversation_id", ""), message["issued_at"])


_runners: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def reply_runner() -> ReplyRunner:
    loop = asyncio.get_running_loop()
    runner = _runners.get(loop)
    if runner is None:
        runner = _runners[loop] = ReplyRunner()
    return runner


class ReplyController:
    """One socket's side of replies: it claims the turns it should answer,
    asks the process's ReplyRunner to run them, stops replies everywhere, and
    on a stop drops their audio on this socket."""

    def __init__(
        self,
        *,
        conversation_id,
        live: LiveWriter,
        audio: AudioSequencer,
        send: Callable[[dict], Awaitable[None]],
        spawn: Callable[[Coroutine], asyncio.Task],
        tokens_per_day: int = 0,
    ) -> None:
        self.conversation_id = str(conversation_id)
        self.tokens_per_day = tokens_per_day  # the user's daily quota (0: unlimited)
        self.live = live
        self.audio = audio
        self.send = send
        self.spawn = spawn
        self.last: RunningReply | None = None  # the latest reply this socket started

    async def answer(self, message_id: str) -> None:
        """Reply to the user's turn, unless another socket already does."""
        if await reply_claim(user_message_id=message_id):
            self.last = await reply_runner().start(
                conversation_id=self.conversation_id, live=self.live, on_begin=self.audio.known,
                tokens_per_day=self.tokens_per_day,
            )  # fmt: skip

    def answer_later(self, message_id: str) -> None:
        """A final this socket did not hear: answer it if its speaker's socket
        is gone (nobody claimed it after a moment)."""

        async def later() -> None:
            await asyncio.sleep(ORPHAN_CLAIM_DELAY_S)
            await self.answer(message_id)

        self.spawn(later())

    async def stop_everywhere(self) -> None:
        """Stop the conversation's reply: at once when this process runs it (a stop
        through the channel layer took longer than a short reply under load), and in
        every other process through the group."""
        issued_at = time.time()
        reply_runner().stop(self.conversation_id, issued_at)
        await self.stopped(issued_at)  # this socket's audio too, without the round trip
        await reply_stop(conversation_id=self.conversation_id, issued_at=issued_at)

    async def stopped(self, issued_at: float) -> None:
        """`reply.stop` reached this socket (the runner cancels the reply itself)."""
        last = self.last
        if last is not None and last.state.done and last.started_at <= issued_at:
            state = last.state
            if state.reply_id and self.audio.pending(state.reply_id, state.sentences):
                # Fully written but still being said: the client stops playing it.
                self.last = None
                await self.send(
                    event(
                        "reply.interrupted",
                        reply_id=state.reply_id,
                        seq=None,
                        text=state.text,
                        audio_only=True,
                    )
                )
                await reply_audio_skip(reply_id=state.reply_id)
        self.audio.drop_all()

    def first_audio_ms(self, reply_id: str) -> int | None:
        """First token → first audio of a reply this socket started."""
        last = self.last
        if last is None or last.state.reply_id != reply_id or last.state.first_token_at is None:
            return None
        return max(0, round((time.time() - last.state.first_token_at) * 1000))
