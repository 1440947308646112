from django.contrib.auth.decorators import login_required
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from apps.conversations.services import conversation_start

from .models import Persona
from .selectors import persona_list_published


def home(request):
    return render(request, "personas/gallery.html", {"personas": persona_list_published()})


@login_required
@require_POST
def talk(request, slug):
    persona = get_object_or_404(Persona.objects.published(), slug=slug)
    conversation = conversation_start(user=request.user, persona=persona)
    return redirect("conversation", conversation_id=conversation.id)
