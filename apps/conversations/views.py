from django.contrib.auth.decorators import login_required
from django.shortcuts import get_object_or_404, render

from .models import Conversation
from .selectors import conversation_list_for_user


@login_required
def history(request):
    query = request.GET.get("q", "").strip()[:100]
    conversations = conversation_list_for_user(user=request.user, query=query)[:100]
    return render(
        request, "conversations/history.html", {"conversations": conversations, "q": query}
    )


@login_required
def transcript(request, conversation_id):
    conversation = get_object_or_404(
        Conversation.objects.select_related("persona"), pk=conversation_id, user=request.user
    )
    return render(
        request,
        "conversations/transcript.html",
        {"conversation": conversation, "messages": conversation.messages.exclude(text="")},
    )


@login_required
def conversation(request, conversation_id):
    conversation = get_object_or_404(
        Conversation.objects.select_related("persona"), pk=conversation_id, user=request.user
    )
    return render(request, "conversations/conversation.html", {"conversation": conversation})
