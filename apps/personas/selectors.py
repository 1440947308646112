from django.db.models import QuerySet

from .models import Persona


def persona_list_published() -> QuerySet[Persona]:
    return Persona.objects.published()


def persona_visible_to(*, persona: Persona, user) -> bool:
    """Whether `user` may see this persona's face: it is published, or they are
    staff, or they have a conversation with it (a draft now, or unpublished since)."""
    if persona.is_published:
        return True
    if not user.is_authenticated:
        return False
    return user.is_staff or persona.conversations.filter(user=user).exists()
