from uuid import UUID

from django.db.models import Count, Exists, OuterRef, Q, QuerySet

from .models import Conversation, Message


def conversation_for_socket(*, conversation_id: UUID, user) -> tuple[Conversation | None, str]:
    """The conversation a socket may join, or None and why not ('not_found',
    'forbidden')."""
    conversation = Conversation.objects.select_related("persona").filter(pk=conversation_id).first()
    if conversation is None:
        return None, "not_found"
    if conversation.user_id != user.pk:
        return None, "forbidden"
    return conversation, ""


def messages_after(*, conversation_id: UUID, seq: int) -> list[Message]:
    """Stored turns after `seq` that a socket should see again (no reply still streaming)."""
    return list(
        Message.objects.filter(conversation_id=conversation_id, seq__gt=seq)
        .exclude(status=Message.Status.STREAMING)
        .select_related("segment")
        .order_by("seq")
    )


def history_for_reply(*, conversation_id: UUID, budget_tokens: int) -> list[Message]:
    """The most recent finished turns that fit the token budget, oldest first
    (≈ 4 characters a token)."""
    picked: list[Message] = []
    used = 0
    recent = (
        Message.objects.filter(conversation_id=conversation_id)
        .exclude(status=Message.Status.STREAMING)
        .exclude(text="")
        .only("role", "text", "seq")
        .order_by("-seq")[:100]
    )
    for message in recent:
        cost = len(message.text) // 4 + 4
        if picked and used + cost > budget_tokens:
            break
        picked.append(message)
        used += cost
    return picked[::-1]


def conversation_list_for_user(*, user, query: str = "") -> QuerySet[Conversation]:
    conversations = Conversation.objects.filter(user=user).select_related("persona")
    if query:
        said = Message.objects.filter(conversation=OuterRef("pk"), text__icontains=query)
        conversations = conversations.filter(Q(persona__name__icontains=query) | Exists(said))
    # Meta.ordering does not apply to GROUP BY queries: order explicitly.
    return conversations.annotate(message_count=Count("messages")).order_by("-started_at")


def turn_unanswered(*, conversation_id: UUID) -> Message | None:
    """The conversation's last turn, when it is the user's (no reply began)."""
    last = Message.objects.filter(conversation_id=conversation_id).order_by("-seq").first()
    return last if last is not None and last.role == Message.Role.USER else None
