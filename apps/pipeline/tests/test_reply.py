"""reply_run, the reply workflow, on its own (echo LLM, no audio)."""

import asyncio
import time
from unittest import mock

import pytest
from asgiref.sync import sync_to_async

from apps.accounts.models import User
from apps.accounts.tests.factories import UserFactory
from apps.conversations.models import Message
from apps.conversations.services import conversation_start, text_message_add
from apps.personas.tests.factories import PersonaFactory
from apps.pipeline import services
from apps.pipeline.providers.base import ReplyRequest, ReplyUsage, approx_tokens, usage_or_estimate
from apps.pipeline.services import ReplyState, reply_run

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def conversation(settings):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    settings.LLM_KIND = "echo"
    conversation = conversation_start(user=UserFactory(), persona=PersonaFactory(llm_kind="echo"))
    text_message_add(conversation_id=conversation.id, text="tell me a story")
    return conversation


async def test_a_reply_is_stored_complete_with_its_text(conversation):
    state = ReplyState()
    await reply_run(conversation_id=conversation.id, final_at=time.time(), state=state, speak=False)
    reply = await sync_to_async(Message.objects.get)(pk=state.reply_id)
    assert (reply.status, reply.text) == ("complete", state.text)
    assert "tell me a story" in reply.text and reply.completion_tokens > 0


async def test_a_stop_while_the_reply_is_prepared_leaves_no_turn_streaming(conversation):
    # given a reply whose preparation (reserving its seq) is slow
    real_prepare = services.reply_prepare

    def slow_prepare(**kwargs):
        time.sleep(0.3)
        return real_prepare(**kwargs)

    with mock.patch.object(services, "reply_prepare", slow_prepare):
        task = asyncio.create_task(
            reply_run(
                conversation_id=conversation.id,
                final_at=time.time(),
                state=ReplyState(),
                speak=False,
            )
        )
        await asyncio.sleep(0.1)

        # when it is stopped before its first token
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    # then the reserved turn is recorded as an empty interrupted reply, not left streaming
    statuses = await sync_to_async(list)(
        Message.objects.filter(
            conversation=conversation, role="assistant", source="llm"
        ).values_list("status", "text")
    )
    assert statuses == [("interrupted", "")]


async def test_a_reply_stopped_mid_stream_is_charged_for_what_it_streamed(conversation):
    # given a reply from an engine that reports usage only in its stream's last chunk
    state = ReplyState()
    task = asyncio.create_task(
        reply_run(conversation_id=conversation.id, final_at=time.time(), state=state, speak=False)
    )
    while len(state.text.split()) < 3:
        await asyncio.sleep(0.01)

    # when it is stopped after a few tokens
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    # then it is stored as interrupted with its prompt and streamed tokens estimated, not 0,
    # and they count against the user's quota
    reply = await sync_to_async(Message.objects.select_related("conversation__user").get)(
        pk=state.reply_id
    )
    assert reply.status == "interrupted" and reply.text == state.text
    assert reply.completion_tokens == approx_tokens(state.text) > 0
    assert reply.prompt_tokens > 0
    user = await sync_to_async(User.objects.get)(pk=reply.conversation.user_id)
    assert user.tokens_used == reply.prompt_tokens + reply.completion_tokens


@pytest.mark.django_db(transaction=False)
def test_a_reply_that_streamed_nothing_is_not_estimated():
    request = ReplyRequest(
        system_prompt="be brief", history=[], model="m", temperature=0.0, max_tokens=60
    )
    assert usage_or_estimate(ReplyUsage(), request=request, text="") == ReplyUsage()
    reported = ReplyUsage(prompt_tokens=7, completion_tokens=3)
    assert usage_or_estimate(reported, request=request, text="some words here") == reported
