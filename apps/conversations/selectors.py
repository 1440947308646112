from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from django.db.models import Count, DecimalField, OuterRef, Q, QuerySet, Subquery, Sum, Value
from django.db.models.functions import Coalesce

from . import context
from .context import ConversationContext, Turn
from .costs import usd
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


def turns_for_resume(
    *, conversation_id: UUID, seq: int, limit: int | None = None
) -> tuple[list[Message], Message | None]:
    """The stored turns after `seq` that a socket should see again (no reply
    still streaming), in order, and the conversation's last turn (streaming or
    not). With a `limit`, only the newest `limit` turns after `seq` are read
    (a hello on a long conversation reads a bounded page). One query, which
    reads from `seq` itself on (so that it also finds the last turn when nothing
    came after it); a second only when `seq` is past the last turn, or there is
    none."""
    query = (
        Message.objects.filter(conversation_id=conversation_id, seq__gte=seq)
        .select_related("segment")
        .order_by("-seq")
    )
    rows = list(query if limit is None else query[: limit + 1])
    last = (
        rows[0]
        if rows
        else (Message.objects.filter(conversation_id=conversation_id).order_by("-seq").first())
    )
    newer = [m for m in rows if m.seq > seq][:limit]
    replay = [m for m in reversed(newer) if m.status != Message.Status.STREAMING]
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


# --- What turns cost (apps/conversations/costs.py prices them) -------------------------

USD = DecimalField(max_digits=16, decimal_places=8)


@dataclass(frozen=True)
class CostTotals:
    """What a set of turns used and cost."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    stt_audio_seconds: float = 0.0
    tts_audio_seconds: float = 0.0
    cost_usd: Decimal = Decimal(0)


def _cost_sums() -> dict:
    return {
        "prompt_tokens": Sum("prompt_tokens"),
        "completion_tokens": Sum("completion_tokens"),
        "stt_audio_seconds": Sum("stt_audio_seconds"),
        "tts_audio_seconds": Sum("tts_audio_seconds"),
        "cost_usd": Sum("cost_usd", output_field=USD),
    }


def _totals(row: Mapping[str, Any]) -> CostTotals:
    return CostTotals(
        prompt_tokens=row["prompt_tokens"] or 0,
        completion_tokens=row["completion_tokens"] or 0,
        stt_audio_seconds=row["stt_audio_seconds"] or 0.0,
        tts_audio_seconds=row["tts_audio_seconds"] or 0.0,
        cost_usd=usd(row["cost_usd"]),
    )


def cost_totals_for_user(*, user_id: int) -> CostTotals:
    """Everything the user's turns used and cost, in one query: the sums of each
    of their conversations (a subquery per conversation, on message_unique_seq),
    summed over their conversations (on conversation_user_recent). It reads the
    user's own turns only, by index (a join would let the planner read every turn)."""
    per_conversation = {
        f"{name}_of": Subquery(
            Message.objects.filter(conversation_id=OuterRef("pk"))
            .order_by()
            .values("conversation_id")
            .annotate(total=total)
            .values("total")
        )
        for name, total in _cost_sums().items()
    }
    row = (
        Conversation.objects.filter(user_id=user_id)
        .order_by()
        .annotate(**per_conversation)
        .aggregate(**{name: Sum(f"{name}_of") for name in _cost_sums()})
    )
    return _totals(row)


@dataclass(frozen=True)
class ConversationCost:
    conversation: Conversation
    totals: CostTotals


def cost_by_conversation_for_user(*, user_id: int, size: int) -> list[ConversationCost]:
    """The user's `size` newest conversations (with their persona), each with what
    its turns used and cost: two queries, whatever `size` (the page, on the
    conversation_user_recent keyset's first page; their turns grouped by
    conversation, on message_unique_seq)."""
    recent = list(
        Conversation.objects.filter(user_id=user_id)
        .select_related("persona")
        .order_by("-started_at", "-id")[:size]
    )
    rows = (
        Message.objects.filter(conversation_id__in=[c.id for c in recent])
        .order_by()
        .values("conversation_id")
        .annotate(**_cost_sums())
    )
    by_id = {row["conversation_id"]: _totals(row) for row in rows} if recent else {}
    return [ConversationCost(c, by_id.get(c.id, CostTotals())) for c in recent]


def _turns_cost_usd(owner: str) -> Coalesce:
    """An annotation: the cost of the turns whose `owner` is the row (a subquery per
    row, so a list page costs no more queries)."""
    total = (
        Message.objects.filter(**{owner: OuterRef("pk")})
        .order_by()
        .values(owner)
        .annotate(total=Sum("cost_usd", output_field=USD))
        .values("total")
    )
    return Coalesce(Subquery(total), Value(Decimal(0)), output_field=USD)


def conversation_cost_usd() -> Coalesce:
    """An annotation of conversations: the cost of their turns (on message_unique_seq)."""
    return _turns_cost_usd("conversation_id")


def user_cost_usd() -> Coalesce:
    """An annotation of users: the cost of all their turns."""
    return _turns_cost_usd("conversation__user_id")
