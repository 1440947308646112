from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from django.db.models import Count, OuterRef, Q, QuerySet, Subquery
from django.db.models.functions import Coalesce

from . import context
from .context import ConversationContext, Turn
from .models import Conversation, Message


def conversation_for_socket(
    *, conversation_id: UUID, user
) -> tuple[ConversationContext | None, str]:
    """The conversation a socket may join (with its persona, from the context
    cache), or None and why not ('not_found', 'forbidden')."""
    found = context.conversation_context(conversation_id=conversation_id)
    if found is None:
        return None, "not_found"
    if found.user_id != user.pk:
        return None, "forbidden"
    return found, ""


def turns_for_resume(*, conversation_id: UUID, seq: int) -> tuple[list[Message], Message | None]:
    """The stored turns after `seq` that a socket should see again (no reply
    still streaming), in order, and the conversation's last turn (streaming or
    not). One query, which reads from `seq` itself on (so that it also finds the
    last turn when nothing came after it); a second only when `seq` is past the
    last turn, or there is none."""
    rows = list(
        Message.objects.filter(conversation_id=conversation_id, seq__gte=seq)
        .select_related("segment")
        .order_by("seq")
    )
    last = (
        rows[-1]
        if rows
        else (Message.objects.filter(conversation_id=conversation_id).order_by("-seq").first())
    )
    replay = [m for m in rows if m.seq > seq and m.status != Message.Status.STREAMING]
    return replay, last


def history_for_reply(
    *, conversation_id: UUID, budget_tokens: int, through_seq: int = 0
) -> list[Turn]:
    """The most recent finished turns that fit the token budget, oldest first
    (≈ 4 characters a token), from the context cache; `through_seq`: the cached
    copy must have seen every turn up to it (the one before the reply's own)."""
    picked: list[Turn] = []
    used = 0
    recent = context.history_turns(conversation_id=conversation_id, through_seq=through_seq)
    for turn in reversed(recent):
        cost = len(turn.text) // 4 + 4
        if picked and used + cost > budget_tokens:
            break
        picked.append(turn)
        used += cost
    return picked[::-1]


# --- Pages, by keyset (never OFFSET) ---------------------------------------------------


@dataclass(frozen=True)
class Page:
    items: list
    earlier: bool  # there is more before the first item (older conversations, earlier turns)
    later: bool  # there is more after the last one


def conversation_page_for_user(
    *,
    user,
    query: str = "",
    before: tuple[datetime, UUID] | None = None,
    after: tuple[datetime, UUID] | None = None,
    size: int,
) -> Page:
    """A page of the user's conversations, newest first, by keyset on
    (started_at, id) (index conversation_user_recent): the `size` just older
    than `before`, or just newer than `after`, or the newest. Each with its
    number of messages (counted on the (conversation, seq) index, per row)."""
    conversations = Conversation.objects.filter(user=user).select_related("persona")
    if query:
        # The user's turns that say it, through the user's conversations (both indexes),
        # rather than a subquery per conversation that the planner may run as one scan
        # of every turn.
        said = Message.objects.filter(conversation__user=user, text__icontains=query)
        conversations = conversations.filter(
            Q(persona__name__icontains=query) | Q(pk__in=said.values("conversation_id"))
        )
    count = (
        Message.objects.filter(conversation=OuterRef("pk"))
        .order_by()
        .values("conversation")
        .annotate(n=Count("*"))
        .values("n")
    )
    conversations = conversations.annotate(message_count=Coalesce(Subquery(count), 0))
    # (started_at, id) past the cursor, written so that the index seeks to the
    # cursor's started_at (the first condition) and only ties are filtered.
    if after is not None:
        started_at, id_ = after
        newer = Q(started_at__gt=started_at) | Q(id__gt=id_)
        conversations = conversations.filter(started_at__gte=started_at).filter(newer)
        rows = list(conversations.order_by("started_at", "id")[: size + 1])
        return Page(rows[:size][::-1], earlier=True, later=len(rows) > size)
    if before is not None:
        started_at, id_ = before
        older = Q(started_at__lt=started_at) | Q(id__lt=id_)
        conversations = conversations.filter(started_at__lte=started_at).filter(older)
    rows = list(conversations.order_by("-started_at", "-id")[: size + 1])
    # In this list "earlier" is further down: older conversations.
    return Page(rows[:size], earlier=len(rows) > size, later=before is not None)


def transcript_page(
    *, conversation_id: UUID, after: int | None = None, before: int | None = None, size: int
) -> Page:
    """A page of a conversation's turns with text, in seq order, by keyset on seq
    (the unique (conversation, seq) index): the `size` after seq `after`, or just
    before seq `before`, or the first."""
    turns: QuerySet[Message] = Message.objects.filter(conversation_id=conversation_id).exclude(
        text=""
    )
    if before is not None:
        rows = list(turns.filter(seq__lt=before).order_by("-seq")[: size + 1])
        return Page(rows[:size][::-1], earlier=len(rows) > size, later=True)
    if after is not None:
        turns = turns.filter(seq__gt=after)
    rows = list(turns.order_by("seq")[: size + 1])
    return Page(rows[:size], earlier=after is not None and after > 0, later=len(rows) > size)
