"""Writes and workflows of the system of record. Every event a client sees
about stored data is published here, after the transaction commits."""

import time
from uuid import UUID

from django.db import transaction
from django.utils import timezone

from apps.accounts.services import usage_add
from apps.personas.models import Persona
from apps.realtime.broadcast import publish_on_commit
from apps.realtime.events import event

from .models import Conversation, Message, TranscriptSegment


def _ms_since(epoch_seconds: float | None) -> int | None:
    if epoch_seconds is None:
        return None
    return max(0, round((time.time() - epoch_seconds) * 1000))


def _next_seq(*, conversation_id: UUID) -> int:
    """Hand out the conversation's next seq; call inside a transaction."""
    conversation = (
        Conversation.objects.select_for_update().only("id", "last_seq").get(pk=conversation_id)
    )
    conversation.last_seq += 1
    conversation.save(update_fields=["last_seq", "updated_at"])
    return conversation.last_seq


@transaction.atomic
def conversation_start(*, user, persona: Persona) -> Conversation:
    conversation = Conversation.objects.create(user=user, persona=persona)
    if persona.greeting:
        Message.objects.create(
            conversation=conversation,
            seq=_next_seq(conversation_id=conversation.id),
            role=Message.Role.ASSISTANT,
            source=Message.Source.GREETING,
            text=persona.greeting,
        )
    return conversation


def conversation_end(*, conversation: Conversation) -> Conversation:
    conversation.status = Conversation.Status.ENDED
    conversation.ended_at = timezone.now()
    conversation.save(update_fields=["status", "ended_at", "updated_at"])
    return conversation


def _final_event(message: Message, *, utterance_id: str | None, **extra) -> dict:
    return event(
        "transcript.final",
        utterance_id=utterance_id,
        seq=message.seq,
        text=message.text,
        source=message.source,
        message_id=str(message.id),
        **extra,
    )


@transaction.atomic
def transcript_finalize(
    *,
    conversation_id: UUID,
    utterance_id: str,
    text: str,
    confidence: float | None,
    start_ms: int,
    end_ms: int,
    speech_end_at: float | None,
    provider: str,
) -> Message | None:
    """Store an utterance's final transcript as a user message and a segment,
    then tell the sockets. Safe to run twice: the second run changes nothing
    and publishes nothing. Empty text (no speech) stores nothing."""
    text = text.strip()
    # Lock the conversation first, so two runs of the same task queue up here.
    Conversation.objects.select_for_update().only("id").get(pk=conversation_id)
    existing = TranscriptSegment.objects.filter(
        conversation_id=conversation_id, utterance_id=utterance_id
    ).select_related("message")
    if existing:
        return existing[0].message
    if not text:
        publish_on_commit(conversation_id, event("transcript.empty", utterance_id=utterance_id))
        return None
    seq = _next_seq(conversation_id=conversation_id)
    stt_ms = _ms_since(speech_end_at)
    message = Message.objects.create(
        conversation_id=conversation_id,
        seq=seq,
        role=Message.Role.USER,
        source=Message.Source.VOICE,
        text=text,
        provider=provider,
        speech_end_to_final_ms=stt_ms,
    )
    TranscriptSegment.objects.create(
        conversation_id=conversation_id,
        message=message,
        utterance_id=utterance_id,
        seq=seq,
        start_ms=start_ms,
        end_ms=end_ms,
        text=text,
        confidence=confidence,
        provider=provider,
    )
    user_id = Conversation.objects.values_list("user_id", flat=True).get(pk=conversation_id)
    usage_add(user_id=user_id, audio_seconds=(end_ms - start_ms) / 1000)
    publish_on_commit(
        conversation_id,
        _final_event(message, utterance_id=utterance_id, speech_end_to_final_ms=stt_ms),
    )
    return message


@transaction.atomic
def text_message_add(*, conversation_id: UUID, text: str) -> Message:
    """A typed message: stored, then shown on every socket like a final transcript."""
    message = Message.objects.create(
        conversation_id=conversation_id,
        seq=_next_seq(conversation_id=conversation_id),
        role=Message.Role.USER,
        source=Message.Source.TEXT,
        text=text,
    )
    publish_on_commit(conversation_id, _final_event(message, utterance_id=None))
    return message


@transaction.atomic
def reply_begin(*, conversation_id: UUID, provider: str) -> Message:
    """Reserve the reply's seq before the first token, so the order of the
    conversation is fixed even when a reply is interrupted."""
    return Message.objects.create(
        conversation_id=conversation_id,
        seq=_next_seq(conversation_id=conversation_id),
        role=Message.Role.ASSISTANT,
        source=Message.Source.LLM,
        status=Message.Status.STREAMING,
        provider=provider,
    )


@transaction.atomic
def reply_finish(
    *,
    message_id: UUID,
    text: str,
    status: str,
    prompt_tokens: int,
    completion_tokens: int,
    final_to_first_token_ms: int | None,
    reply_total_ms: int | None,
    error_code: str = "",
    audio_parts: int = 0,
) -> Message:
    """Store the finished (or interrupted, or failed) reply and tell the sockets;
    `audio_parts` is how many sentences were sent to be spoken."""
    message = Message.objects.select_related("conversation").get(pk=message_id)
    message.text = text
    message.status = status
    message.prompt_tokens = prompt_tokens
    message.completion_tokens = completion_tokens
    message.final_to_first_token_ms = final_to_first_token_ms
    message.reply_total_ms = reply_total_ms
    message.save(
        update_fields=[
            "text",
            "status",
            "prompt_tokens",
            "completion_tokens",
            "final_to_first_token_ms",
            "reply_total_ms",
            "updated_at",
        ]
    )
    usage_add(user_id=message.conversation.user_id, tokens=prompt_tokens + completion_tokens)
    type_ = "reply.interrupted" if status == Message.Status.INTERRUPTED else "reply.done"
    publish_on_commit(
        message.conversation_id,
        event(
            type_,
            reply_id=str(message.id),
            seq=message.seq,
            text=text,
            status=status,
            error_code=error_code,
            audio_parts=audio_parts,
            final_to_first_token_ms=final_to_first_token_ms,
            reply_total_ms=reply_total_ms,
        ),
    )
    return message


def message_record_first_audio(*, message_id: UUID, first_token_to_first_audio_ms: int) -> None:
    Message.objects.filter(pk=message_id, first_token_to_first_audio_ms__isnull=True).update(
        first_token_to_first_audio_ms=first_token_to_first_audio_ms, updated_at=timezone.now()
    )


def replay_events(*, messages: list[Message]) -> list[dict]:
    """The events that bring a reconnecting socket up to date, in seq order."""
    events = []
    for message in messages:
        if message.role == Message.Role.USER:
            utterance_id = message.segment.utterance_id if message.source == "voice" else None
            events.append(_final_event(message, utterance_id=utterance_id, replayed=True))
        else:
            type_ = (
                "reply.interrupted"
                if message.status == Message.Status.INTERRUPTED
                else "reply.done"
            )
            events.append(
                event(
                    type_,
                    reply_id=str(message.id),
                    seq=message.seq,
                    text=message.text,
                    status=message.status,
                    source=message.source,
                    replayed=True,
                )
            )
    return events
