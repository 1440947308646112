"""What a socket needs from the system of record, in one call each: who may
join which conversation (with the persona's engines and the user's quota),
and what a (re)connecting socket is sent. Run on a database thread
(`database_sync_to_async`); never on a frame."""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from apps.conversations.selectors import conversation_for_socket, messages_after, turn_unanswered
from apps.conversations.services import replay_events
from apps.pipeline.values import PersonaEngines


@dataclass(frozen=True)
class SocketContext:
    conversation_id: UUID
    user_id: int
    persona: dict[str, str]  # name, slug, avatar: shown by clients
    engines: PersonaEngines
    quota_problem: str  # why the user may not talk now, or ""


@dataclass(frozen=True)
class Resume:
    last_seq: int
    events: list[dict]  # the stored turns after resume_from, as events
    unanswered_id: str | None  # a user turn no reply began for


def socket_open(*, conversation_id: UUID, user) -> tuple[SocketContext | None, str]:
    """The socket's context, or None and why not ('not_found', 'forbidden')."""
    conversation, problem = conversation_for_socket(conversation_id=conversation_id, user=user)
    if conversation is None:
        return None, problem
    persona = conversation.persona
    return (
        SocketContext(
            conversation_id=conversation.id,
            user_id=user.pk,
            persona={"name": persona.name, "slug": persona.slug, "avatar": persona.avatar},
            engines=PersonaEngines.of(persona),
            quota_problem=user.quota_problem(),
        ),
        "",
    )


def socket_resume(*, conversation_id: UUID, resume_from: int) -> Resume:
    messages = messages_after(conversation_id=conversation_id, seq=resume_from)
    unanswered = turn_unanswered(conversation_id=conversation_id)
    return Resume(
        last_seq=max([resume_from, *(m.seq for m in messages)]),
        events=replay_events(messages=messages),
        unanswered_id=None if unanswered is None else str(unanswered.id),
    )
