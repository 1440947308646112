"""reply_run, the reply workflow, on its own (echo LLM, no audio)."""

import asyncio
import time
from unittest import mock

import pytest
from asgiref.sync import sync_to_async

from apps.accounts.tests.factories import UserFactory, usage_of, usage_set
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
    used = await sync_to_async(usage_of)(reply.conversation.user)
    assert used[1] == reply.prompt_tokens + reply.completion_tokens


@pytest.mark.django_db(transaction=False)
def test_a_reply_that_streamed_nothing_is_not_estimated():
    request = ReplyRequest(
        system_prompt="be brief", history=[], model="m", temperature=0.0, max_tokens=60
    )
    assert usage_or_estimate(ReplyUsage(), request=request, text="") == ReplyUsage()
    reported = ReplyUsage(prompt_tokens=7, completion_tokens=3)
    assert usage_or_estimate(reported, request=request, text="some words here") == reported


# --- The reply's tokens, reserved from the user's daily quota first ---------------------------


@pytest.fixture
def ledger(monkeypatch):
    from apps.accounts import ledger as ledger_module

    store = ledger_module.MemoryLedger()
    monkeypatch.setattr(ledger_module, "_ledger", store)
    return store


def requests_seen(monkeypatch) -> list[ReplyRequest]:
    from apps.pipeline.providers.echo import EchoLLM

    seen: list[ReplyRequest] = []
    real = EchoLLM.stream_reply

    def spy(self, request):
        seen.append(request)
        return real(self, request)

    monkeypatch.setattr(EchoLLM, "stream_reply", spy)
    return seen


async def listen(conversation):
    """What the conversation's group is sent from now on (the in-memory layer)."""
    from channels.layers import get_channel_layer

    from apps.realtime.events import group_name

    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(group_name(conversation.id), channel)

    async def drain() -> list[dict]:
        got = []
        while True:
            try:
                got.append(await asyncio.wait_for(layer.receive(channel), 0.2))
            except TimeoutError:
                return got

    return drain


def tokens_counter(ledger, conversation) -> int | None:
    from apps.accounts.ledger import counter_key, today

    return ledger.counters.get(counter_key(conversation.user_id, today(), "tokens"))


async def test_a_reply_reserves_its_most_and_settles_to_what_it_used(conversation, ledger):
    state = ReplyState()

    await reply_run(
        conversation_id=conversation.id, final_at=time.time(), state=state, speak=False,
        tokens_per_day=10_000,
    )  # fmt: skip

    reply = await sync_to_async(Message.objects.get)(pk=state.reply_id)
    used = reply.prompt_tokens + reply.completion_tokens
    assert reply.status == "complete" and used > 0
    assert tokens_counter(ledger, conversation) == used  # reserved prompt + 300, settled
    assert (await sync_to_async(usage_of)(conversation.user))[1] == used


async def test_a_user_with_too_few_tokens_left_gets_a_clear_error_and_no_llm_call(
    conversation, ledger, monkeypatch
):
    # given a user who used all but 10 of today's tokens
    seen = requests_seen(monkeypatch)
    await sync_to_async(usage_set)(conversation.user, tokens=990)
    listener = await listen(conversation)
    state = ReplyState()

    # when a reply is due
    await reply_run(
        conversation_id=conversation.id, final_at=time.time(), state=state, speak=False,
        tokens_per_day=1000,
    )  # fmt: skip

    # then the LLM is not called, the turn's reply is stored failed, and the socket is told
    assert seen == []
    reply = await sync_to_async(Message.objects.get)(pk=state.reply_id)
    assert (reply.status, reply.error_code, reply.text) == ("failed", "quota_exceeded", "")
    errors = [e for e in await listener() if e["type"] == "error"]
    assert [e["code"] for e in errors] == ["quota_exceeded"]
    assert "reply tokens" in errors[0]["message"]
    assert tokens_counter(ledger, conversation) == 990  # what was taken is given back


async def test_a_user_near_the_limit_gets_a_shorter_reply_that_fits(
    conversation, ledger, monkeypatch
):
    seen = requests_seen(monkeypatch)
    await sync_to_async(usage_set)(conversation.user, tokens=900)
    state = ReplyState()

    await reply_run(
        conversation_id=conversation.id, final_at=time.time(), state=state, speak=False,
        tokens_per_day=1000,
    )  # fmt: skip

    [request] = seen
    prompt = approx_tokens(" ".join([request.system_prompt, *(m.content for m in request.history)]))
    assert request.max_tokens == 100 - prompt < 300  # what is left, less the prompt
    assert tokens_counter(ledger, conversation) <= 1000


async def test_two_replies_of_one_user_cannot_both_spend_the_last_tokens(settings, ledger):
    # given two conversations of a user with room for one reply's reservation (its prompt,
    # about 20 tokens, + max_tokens 300) and too little for a second, even a shorter one
    settings.LLM_KIND = "echo"
    user = await sync_to_async(UserFactory)()
    persona = await sync_to_async(PersonaFactory)(llm_kind="echo")
    conversations = []
    for _ in range(2):
        conversation = await sync_to_async(conversation_start)(user=user, persona=persona)
        await sync_to_async(text_message_add)(conversation_id=conversation.id, text="hi")
        conversations.append(conversation)
    states = [ReplyState(), ReplyState()]

    # when both replies start at once
    await asyncio.gather(
        *(
            reply_run(
                conversation_id=c.id, final_at=time.time(), state=s, speak=False, tokens_per_day=340
            )  # fmt: skip
            for c, s in zip(conversations, states, strict=True)
        )
    )

    # then one is answered and one is refused: the reservation is atomic
    replies = [await sync_to_async(Message.objects.get)(pk=s.reply_id) for s in states]
    assert sorted(r.status for r in replies) == ["complete", "failed"]
