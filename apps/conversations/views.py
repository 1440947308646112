from datetime import UTC, datetime, timedelta
from uuid import UUID

from django.contrib.auth.decorators import login_required
from django.http import HttpResponseBadRequest
from django.shortcuts import get_object_or_404, render

from .models import Conversation
from .selectors import conversation_page_for_user, transcript_page

HISTORY_PAGE_SIZE = 50
TRANSCRIPT_PAGE_SIZE = 100
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class BadCursor(ValueError):
    pass


def conversation_cursor(conversation: Conversation) -> str:
    """A conversation's place in the history: `<µs since the epoch>-<id hex>`."""
    micros = (conversation.started_at - EPOCH) // timedelta(microseconds=1)
    return f"{micros}-{conversation.id.hex}"


def _conversation_cursor_of(value: str) -> tuple[datetime, UUID]:
    micros, _, id_hex = value.partition("-")
    try:
        if not micros.isdigit() or len(id_hex) != 32:
            raise ValueError
        return EPOCH + timedelta(microseconds=int(micros)), UUID(hex=id_hex)
    except (ValueError, OverflowError):
        raise BadCursor(
            f"Bad cursor {value[:80]!r}: expected <microseconds>-<conversation id hex>, "
            "as in the page's own links."
        ) from None


def _seq_cursor_of(value: str) -> int:
    if not value.isdigit() or len(value) > 10:
        raise BadCursor(f"Bad cursor {value[:80]!r}: expected a turn's seq (0 or more).")
    return int(value)


def _cursors(request, parse):
    """`before` and `after` from the query string, parsed; at most one of them."""
    before, after = request.GET.get("before"), request.GET.get("after")
    if before is not None and after is not None:
        raise BadCursor("Give either `before` or `after`, not both.")
    return (
        None if before is None else parse(before),
        None if after is None else parse(after),
    )


@login_required
def history(request):
    query = request.GET.get("q", "").strip()[:100]
    try:
        before, after = _cursors(request, _conversation_cursor_of)
    except BadCursor as exc:
        return HttpResponseBadRequest(str(exc), content_type="text/plain; charset=utf-8")
    page = conversation_page_for_user(
        user=request.user, query=query, before=before, after=after, size=HISTORY_PAGE_SIZE
    )
    items = page.items
    return render(
        request,
        "conversations/history.html",
        {
            "conversations": items,
            "q": query,
            "older": conversation_cursor(items[-1]) if items and page.earlier else None,
            "newer": conversation_cursor(items[0]) if items and page.later else None,
        },
    )


@login_required
def transcript(request, conversation_id):
    try:
        before, after = _cursors(request, _seq_cursor_of)
    except BadCursor as exc:
        return HttpResponseBadRequest(str(exc), content_type="text/plain; charset=utf-8")
    conversation = get_object_or_404(
        Conversation.objects.select_related("persona"), pk=conversation_id, user=request.user
    )
    page = transcript_page(
        conversation_id=conversation.id, before=before, after=after, size=TRANSCRIPT_PAGE_SIZE
    )
    items = page.items
    return render(
        request,
        "conversations/transcript.html",
        {
            "conversation": conversation,
            "messages": items,
            "earlier": items[0].seq if items and page.earlier else None,
            "later": items[-1].seq if items and page.later else None,
        },
    )


@login_required
def conversation(request, conversation_id):
    conversation = get_object_or_404(
        Conversation.objects.select_related("persona"), pk=conversation_id, user=request.user
    )
    return render(request, "conversations/conversation.html", {"conversation": conversation})
