"""Writes and workflows of the system of record. Every event a client sees
about stored data is published here, after the transaction commits, and every
stored turn reaches the context cache (context.py) before the sockets hear of it.

A turn's seq is the conversation's highest seq + 1, computed by its INSERT
(one statement, read back with RETURNING; no counter row to lock). Two writers
that pick the same seq at once (Postgres: they do not see each other's rows)
are told apart by the unique (conversation, seq) constraint, and the one
refused stores again with the next seq."""

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from typing import TypeVar
from uuid import UUID

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import IntegrityError, connection, transaction
from django.db.models import F, PositiveIntegerField, Subquery, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from apps.accounts.services import usage_add
from apps.observability import metrics
from apps.personas.models import Persona
from apps.realtime.broadcast import publish_on_commit
from apps.realtime.events import event

from . import context, costs
from .models import Conversation, Message, TranscriptSegment

log = logging.getLogger(__name__)
SEQ_ATTEMPTS = 10  # writers of one conversation at once: a voice final, a reply, a typed turn
T = TypeVar("T")


def _ms_since(epoch_seconds: float | None) -> int | None:
    if epoch_seconds is None:
        return None
    return max(0, round((time.time() - epoch_seconds) * 1000))


def _turn_insert(message: Message) -> Message:
    """INSERT `message` with its conversation's next seq, in one statement: the
    seq is a subquery (the conversation's highest seq, from the top of its unique
    index, + 1) and comes back with RETURNING."""
    highest = Message.objects.filter(conversation_id=message.conversation_id).order_by("-seq")
    next_seq = Coalesce(
        Subquery(highest.values("seq")[:1]), Value(0), output_field=PositiveIntegerField()
    ) + Value(1)
    message.seq = next_seq  # an expression: the INSERT computes it
    seq_field = Message._meta.get_field("seq")
    # QuerySet._insert is what Model.save() and bulk_create() call; it is the ORM's
    # way to ask for RETURNING of a column that is not the primary key.
    rows = Message.objects._insert(  # type: ignore[attr-defined]
        [message],
        fields=Message._meta.local_concrete_fields,
        returning_fields=[seq_field],
        using=connection.alias,
    )
    message.seq = rows[0][0]
    message._state.adding = False
    message._state.db = connection.alias
    return message


def _seq_taken(exc: IntegrityError) -> bool:
    """Another writer stored a turn with the same seq first (Postgres names the
    constraint; SQLite serializes writers, so it never happens there)."""
    diag = getattr(exc.__cause__, "diag", None)
    return getattr(diag, "constraint_name", None) == "message_unique_seq"


def _storing(store: Callable[[], T]) -> T:
    """Run `store` (it inserts turns with the next seq, and rolls back what it did
    when that fails) again while the seq it picked was taken by a concurrent writer."""
    for attempt in range(1, SEQ_ATTEMPTS + 1):
        try:
            return store()
        except IntegrityError as exc:
            if attempt == SEQ_ATTEMPTS or not _seq_taken(exc):
                raise
    raise AssertionError("unreachable")


def _statement() -> AbstractContextManager:
    """Nothing around a one-statement write (it is its own transaction), but a
    savepoint inside a caller's transaction, so that a refused seq can be retried."""
    return transaction.atomic() if connection.in_atomic_block else nullcontext()


def _on_commit_stored(message: Message) -> None:
    # robust: a cache that misbehaves never keeps the event from the sockets
    transaction.on_commit(lambda: context.turn_stored(message=message), robust=True)


class ConversationLimitReached(Exception):
    """The user started CONVERSATIONS_PER_DAY_MAX conversations in the last 24 hours."""

    def __init__(self, limit: int):
        self.limit = limit
        super().__init__(
            f"You have started {limit} conversations in the last 24 hours, the most allowed."
            " Go on with one of them from your history, or come back later."
        )


def conversation_start(*, user, persona: Persona, limited: bool = False) -> Conversation:
    """A new conversation, opened with the persona's greeting. `limited` (a user's
    own request, the talk view; not the developer tools and seeders): raises
    ConversationLimitReached past CONVERSATIONS_PER_DAY_MAX, staff excepted. The
    user's row is locked while it counts, so two requests at once cannot both take
    the last one (Postgres; SQLite writes one at a time anyway)."""
    with transaction.atomic():
        if limited:
            _conversation_limit_check(user)
        return _conversation_open(user=user, persona=persona)


def _conversation_limit_check(user) -> None:
    limit = settings.CONVERSATIONS_PER_DAY_MAX
    if not limit or user.is_staff:
        return
    get_user_model().objects.select_for_update().filter(pk=user.pk).values_list("pk").get()
    since = timezone.now() - timedelta(days=1)
    started = Conversation.objects.filter(user=user, started_at__gte=since).count()
    if started >= limit:
        raise ConversationLimitReached(limit)


def _conversation_open(*, user, persona: Persona) -> Conversation:
    conversation = Conversation.objects.create(user=user, persona=persona)
    turns = []
    if persona.greeting:
        greeting = Message.objects.create(
            conversation=conversation,
            seq=1,
            role=Message.Role.ASSISTANT,
            source=Message.Source.GREETING,
            text=persona.greeting,
        )
        turns.append(context.Turn(greeting.seq, str(greeting.role), greeting.text))

    def prime() -> None:
        context.conversation_remember(conversation=conversation)
        context.history_prime(conversation_id=conversation.id, turns=turns)

    transaction.on_commit(prime, robust=True)
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
    count the user's audio, then tell the sockets: three statements in one
    transaction. Safe to run twice: the segment's unique (conversation,
    utterance) constraint refuses the second copy, whose transaction is rolled
    back, and the stored turn is returned; nothing changes and nothing is
    published. Empty text (no speech) stores nothing."""
    text = text.strip()
    if not text:
        stored = _utterance_message(conversation_id, utterance_id)
        if stored is None:
            publish_on_commit(conversation_id, event("transcript.empty", utterance_id=utterance_id))
        return stored
    stt_ms = _ms_since(speech_end_at)
    audio_seconds = (end_ms - start_ms) / 1000
    stt_cost = costs.prices().stt_usd(kind=provider, audio_seconds=audio_seconds)

    def store() -> Message:
        with transaction.atomic():
            message = _turn_insert(
                Message(
                    conversation_id=conversation_id,
                    role=Message.Role.USER,
                    source=Message.Source.VOICE,
                    text=text,
                    provider=provider,
                    speech_end_to_final_ms=stt_ms,
                    stt_audio_seconds=audio_seconds,
                    cost_usd=stt_cost,
                )
            )
            TranscriptSegment.objects.create(
                conversation_id=conversation_id,
                message=message,
                utterance_id=utterance_id,
                seq=message.seq,
                start_ms=start_ms,
                end_ms=end_ms,
                text=text,
                confidence=confidence,
                provider=provider,
            )
            usage_add(conversation_id=conversation_id, audio_seconds=audio_seconds)
            _on_commit_stored(message)
            publish_on_commit(
                conversation_id,
                _final_event(message, utterance_id=utterance_id, speech_end_to_final_ms=stt_ms),
            )
        return message

    try:
        message = _storing(store)
    except IntegrityError:
        stored = _utterance_message(conversation_id, utterance_id)
        if stored is None:
            raise
        return stored  # a second run of the same final
    metrics.stage_observe(metrics.SPEECH_END_TO_FINAL, provider, stt_ms)
    metrics.cost_add(stage="stt", engine=provider, usd=stt_cost)
    # Ids and figures only: never the text at INFO.
    log.info(
        "final stored: utterance %s, seq %d, %d ms of audio, speech end to final %s ms (%s)",
        utterance_id, message.seq, end_ms - start_ms, stt_ms, provider,
    )  # fmt: skip
    return message


def _utterance_message(conversation_id: UUID, utterance_id: str) -> Message | None:
    segment = (
        TranscriptSegment.objects.filter(conversation_id=conversation_id, utterance_id=utterance_id)
        .select_related("message")
        .first()
    )
    return None if segment is None else segment.message


def text_message_add(*, conversation_id: UUID, text: str) -> Message:
    """A typed message: stored (one statement), then shown on every socket like
    a final transcript."""

    def store() -> Message:
        with _statement():
            message = _turn_insert(
                Message(
                    conversation_id=conversation_id,
                    role=Message.Role.USER,
                    source=Message.Source.TEXT,
                    text=text,
                )
            )
            _on_commit_stored(message)
            publish_on_commit(conversation_id, _final_event(message, utterance_id=None))
        return message

    return _storing(store)


def reply_begin(*, conversation_id: UUID, provider: str) -> Message:
    """Reserve the reply's seq before the first token (one statement), so the
    order of the conversation is fixed even when a reply is interrupted. A
    streaming turn is not history: the context cache hears of it when it finishes."""

    def store() -> Message:
        with _statement():
            return _turn_insert(
                Message(
                    conversation_id=conversation_id,
                    role=Message.Role.ASSISTANT,
                    source=Message.Source.LLM,
                    status=Message.Status.STREAMING,
                    provider=provider,
                )
            )

    return _storing(store)


def reply_finish(
    *,
    reply: Message,
    text: str,
    status: str,
    prompt_tokens: int,
    completion_tokens: int,
    final_to_first_token_ms: int | None,
    reply_total_ms: int | None,
    first_token_to_first_audio_ms: int | None = None,
    error_code: str = "",
    audio_parts: int = 0,
    tts_kind: str = "",
) -> Message:
    """Store the finished (or interrupted, or failed) reply that `reply_begin`
    reserved, count the user's tokens, and tell the sockets: two statements in
    one transaction, nothing read back. The first audio's timing, when it came
    before the end, is stored with it. Only a complete reply's timings enter the
    latency histograms (metrics.py); every reply is counted by its outcome."""
    fields = {
        "text": text,
        "status": status,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "final_to_first_token_ms": final_to_first_token_ms,
        "reply_total_ms": reply_total_ms,
        "error_code": error_code,
        "updated_at": timezone.now(),
    }
    if first_token_to_first_audio_ms is not None:
        fields["first_token_to_first_audio_ms"] = first_token_to_first_audio_ms
    llm_cost = costs.prices().llm_usd(
        kind=reply.provider, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
    )
    with transaction.atomic():
        # Added to the cost, in the same UPDATE: TTS parts may have added theirs already.
        added = {"cost_usd": F("cost_usd") + llm_cost}
        if not Message.objects.filter(pk=reply.id).update(**fields, **added):
            raise Message.DoesNotExist(f"no reply {reply.id}")
        for name, value in fields.items():
            setattr(reply, name, value)
        if prompt_tokens + completion_tokens:
            usage_add(
                conversation_id=reply.conversation_id, tokens=prompt_tokens + completion_tokens
            )
        type_ = "reply.interrupted" if status == Message.Status.INTERRUPTED else "reply.done"
        _on_commit_stored(reply)
        publish_on_commit(
            reply.conversation_id,
            event(
                type_,
                reply_id=str(reply.id),
                seq=reply.seq,
                text=text,
                status=status,
                error_code=error_code,
                audio_parts=audio_parts,
                final_to_first_token_ms=final_to_first_token_ms,
                reply_total_ms=reply_total_ms,
            ),
        )
    _reply_observe(reply, status, prompt_tokens, completion_tokens, tts_kind)
    metrics.cost_add(stage="llm", engine=reply.provider, usd=llm_cost)
    # Ids and figures only: never the text at INFO.
    log.info(
        "reply finished: %s%s, seq %d, %d tokens in, %d out, %d audio parts, "
        "final to first token %s ms, total %s ms (%s)",
        status, f" ({error_code})" if error_code else "", reply.seq, prompt_tokens,
        completion_tokens, audio_parts, final_to_first_token_ms, reply_total_ms, reply.provider,
    )  # fmt: skip
    return reply


def _reply_observe(
    reply: Message, status: str, prompt_tokens: int, completion_tokens: int, tts_kind: str
) -> None:
    engine = reply.provider
    complete = status == Message.Status.COMPLETE
    metrics.reply_finished(
        engine=engine,
        outcome="complete" if complete else str(status),  # interrupted, failed
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
    )
    if complete:
        metrics.stage_observe(metrics.FINAL_TO_FIRST_TOKEN, engine, reply.final_to_first_token_ms)
        metrics.stage_observe(
            metrics.FIRST_TOKEN_TO_FIRST_AUDIO, tts_kind, reply.first_token_to_first_audio_ms
        )


def message_record_first_audio(
    *, message_id: UUID, first_token_to_first_audio_ms: int, tts_kind: str = ""
) -> None:
    """The first audio's timing of a reply already stored (one that came before
    the end is stored by reply_finish). One statement; it enters the latency
    histogram unless the reply was interrupted or failed (a second statement
    then stores it)."""
    unset = Message.objects.filter(pk=message_id, first_token_to_first_audio_ms__isnull=True)
    fields = {
        "first_token_to_first_audio_ms": first_token_to_first_audio_ms,
        "updated_at": timezone.now(),
    }
    ended_badly = (Message.Status.INTERRUPTED, Message.Status.FAILED)
    if unset.exclude(status__in=ended_badly).update(**fields):
        metrics.stage_observe(
            metrics.FIRST_TOKEN_TO_FIRST_AUDIO, tts_kind, first_token_to_first_audio_ms
        )
    else:
        unset.update(**fields)


def reply_speech_add(*, reply_id: UUID | str, tts_kind: str, audio_seconds: float) -> None:
    """Count the speech one TTS part of a reply made (the TTS worker, once per
    part with audio), and its price: one UPDATE of the reply, added with F() so
    that parts and reply_finish, in any order, all count."""
    cost = costs.prices().tts_usd(kind=tts_kind, audio_seconds=audio_seconds)
    Message.objects.filter(pk=reply_id).update(
        tts_audio_seconds=F("tts_audio_seconds") + audio_seconds,
        cost_usd=F("cost_usd") + cost,
    )
    metrics.cost_add(stage="tts", engine=tts_kind, usd=cost)


def message_edit(*, message: Message) -> Message:
    """Staff changed a stored turn (the admin): saved, and the cached history
    made anew."""
    with transaction.atomic():
        message.save()
        transaction.on_commit(
            lambda: context.history_forget(conversation_id=message.conversation_id),
            robust=True,
        )
    return message


def conversation_delete(*, conversation: Conversation) -> None:
    """Delete a conversation with its turns, and what the cache knows of it."""
    conversation_id = conversation.id
    with transaction.atomic():
        conversation.delete()
        transaction.on_commit(
            lambda: context.conversation_forget(conversation_id=conversation_id), robust=True
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
