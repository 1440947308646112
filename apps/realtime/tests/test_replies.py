"""The ReplyRunner runs a conversation's replies on this process and stops them
on `reply.stop` (the one stop mechanism), even with no socket of its own left;
a stop issued before a reply began leaves that reply alone."""

import asyncio
import time

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer

from apps.accounts.tests.factories import UserFactory
from apps.conversations.models import Message
from apps.conversations.services import conversation_start, text_message_add
from apps.personas.tests.factories import PersonaFactory
from apps.pipeline.services import reply_stop
from apps.realtime.live import live_writer
from apps.realtime.replies import ReplyRunner

pytestmark = pytest.mark.usefixtures("transactional_db")

LONG = "word " * 120  # the echo stand-in streams it for a few seconds


@pytest.fixture(autouse=True)
def memory_layer(settings):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    settings.LLM_KIND = "echo"
    yield
    async_to_sync(get_channel_layer().flush)()


@pytest.fixture
def conversation():
    persona = PersonaFactory(llm_kind="echo", tts_kind="espeak")
    conversation = conversation_start(user=UserFactory(), persona=persona)
    text_message_add(conversation_id=conversation.id, text=LONG)
    return conversation


async def begun(runner: ReplyRunner, conversation) -> object:
    started: list[str] = []
    reply = await runner.start(
        conversation_id=str(conversation.id), live=live_writer(), on_begin=started.append
    )
    while not started:
        await asyncio.sleep(0.02)
    return reply


async def test_a_stop_cancels_the_running_reply_and_stores_it_interrupted(conversation):
    runner = ReplyRunner()
    reply = await begun(runner, conversation)

    await reply_stop(conversation_id=conversation.id)
    await asyncio.wait_for(reply.task, 10)

    stored = await database_sync_to_async(Message.objects.get)(pk=reply.state.reply_id)
    assert stored.status == Message.Status.INTERRUPTED
    assert 0 < len(stored.text) < len(LONG)
    assert runner.running == {}  # and the runner left the conversation's group


async def test_a_stop_issued_before_the_reply_began_leaves_it_alone(conversation):
    runner = ReplyRunner()
    issued_at = time.time()
    await asyncio.sleep(0.01)
    reply = await begun(runner, conversation)

    layer = get_channel_layer()
    stop = {"type": "reply.stop", "conversation_id": str(conversation.id), "issued_at": issued_at}
    await layer.group_send(f"conversation.{conversation.id}", stop)
    await asyncio.sleep(0.3)

    assert not reply.task.done()
    await reply_stop(conversation_id=conversation.id)
    await asyncio.wait_for(reply.task, 10)
