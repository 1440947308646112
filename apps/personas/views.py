import hashlib

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpResponse, HttpResponseNotModified
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_POST

from apps.conversations.services import ConversationLimitReached, conversation_start

from .models import Persona
from .selectors import persona_list_published, persona_visible_to
from .services import persona_avatar_png


def home(request):
    return render(request, "personas/gallery.html", {"personas": persona_list_published()})


@login_required
@require_POST
def talk(request, slug):
    persona = get_object_or_404(Persona.objects.published(), slug=slug)
    try:
        conversation = conversation_start(user=request.user, persona=persona, limited=True)
    except ConversationLimitReached as exc:
        context = {"personas": persona_list_published(), "refused": str(exc)}
        return render(request, "personas/gallery.html", context, status=429)
    return redirect("conversation", conversation_id=conversation.id)


@require_GET
def avatar(request, slug):
    """The persona's avatar, always a PNG we encoded (avatars.py), never the upload.
    Published personas' for anyone; a draft's for staff and for users who talked
    with it. Pages ask with `?v=<version>`, so browsers may keep it a day."""
    persona = get_object_or_404(Persona, slug=slug)
    if not persona_visible_to(persona=persona, user=request.user):
        raise Http404("No such persona.")
    body = persona_avatar_png(persona=persona)
    etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
    if request.headers.get("If-None-Match") == etag:
        response: HttpResponse = HttpResponseNotModified()
    else:
        response = HttpResponse(body, content_type="image/png")
    response["ETag"] = etag
    response["X-Content-Type-Options"] = "nosniff"
    response["Content-Security-Policy"] = "default-src 'none'; sandbox"
    response["Cache-Control"] = (
        "public, max-age=86400" if "v" in request.GET and persona.is_published else "no-cache"
    )
    return response
