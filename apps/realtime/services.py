"""What a socket needs from the system of record, in one call each: who may
join which conversation (with the persona's engines and the user's quotas),
and what a (re)connecting socket is sent. Run on a database thread
(`database_sync_to_async`); never on a frame.

socket_open reads the conversation and its persona from the context cache
(apps/conversations/context.py: no query on a hit) and the quotas from the user
the session loaded (what is left of them is in the ledger, apps/accounts/
ledger.py); socket_resume runs one query (the turns to replay and the last
turn together)."""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from django.conf import settings
from django.urls import reverse

from apps.conversations.models import Message
from apps.conversations.selectors import conversation_for_socket, turns_for_resume
from apps.conversations.services import replay_events
from apps.pipeline.values import PersonaEngines


@dataclass(frozen=True)
class SocketContext:
    conversation_id: UUID
    user_id: int
    persona: dict[str, str]  # name, slug, avatar: shown by clients
    engines: PersonaEngines
    audio_seconds_per_day: int  # the user's daily quotas (0: unlimited), as loaded
    tokens_per_day: int


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
            conversation_id=conversation.conversation_id,
            user_id=user.pk,
            persona={
                "name": persona.name,
                "slug": persona.slug,
                "avatar": persona.avatar,
                "avatar_url": reverse("persona_avatar", args=[persona.slug]),
            },
            engines=PersonaEngines.of(persona),
            audio_seconds_per_day=user.audio_seconds_quota,
            tokens_per_day=user.tokens_quota,
        ),
        "",
    )


def socket_resume(*, conversation_id: UUID, resume_from: int) -> Resume:
    """At most WS_REPLAY_MAX_TURNS turns, the newest; older ones are on the
    conversation's page (a repeated hello is also limited to one a second)."""
    messages, last = turns_for_resume(
        conversation_id=conversation_id, seq=resume_from, limit=settings.WS_REPLAY_MAX_TURNS
    )
    unanswered = last if last is not None and last.role == Message.Role.USER else None
    return Resume(
        last_seq=max([resume_from, *(m.seq for m in messages)]),
        events=replay_events(messages=messages),
        unanswered_id=None if unanswered is None else str(unanswered.id),  # no reply began
    )
