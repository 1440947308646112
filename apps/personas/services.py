from django.db import transaction
from django.utils import timezone
from django.utils.text import slugify

from apps.conversations.context import persona_forget, persona_remember

from .models import Persona, PersonaAvatar


@transaction.atomic
def persona_save(*, persona: Persona) -> Persona:
    """Save a staff edit. Once it commits, it is written through to the context
    cache, so the persona's very next turn uses it, in every process."""
    persona.save()
    transaction.on_commit(lambda: persona_remember(persona=persona), robust=True)
    return persona


@transaction.atomic
def persona_delete(*, persona: Persona) -> None:
    """Delete a persona no conversation uses (they protect it), and its cached copy."""
    persona_id = persona.pk
    persona.delete()
    transaction.on_commit(lambda: persona_forget(persona_id=persona_id), robust=True)


@transaction.atomic
def persona_duplicate(*, persona: Persona) -> Persona:
    """An unpublished copy with a free slug, for staff to edit."""
    base = slugify(f"{persona.slug}-copy")[:70]
    slug, n = base, 2
    while Persona.objects.filter(slug=slug).exists():
        slug, n = f"{base}-{n}", n + 1
    copy = Persona.objects.get(pk=persona.pk)
    copy.pk = None
    copy.id = None
    copy._state.adding = True
    copy.name = f"{persona.name} (copy)"[:80]
    copy.slug = slug
    copy.is_published = False
    copy.save()
    return copy


@transaction.atomic
def persona_avatar_set(*, persona: Persona, png: bytes | None) -> None:
    """Keep a re-encoded avatar (avatars.avatar_encode), or drop it (None: the
    initials image shows). The persona's updated_at moves: the pages' avatar URLs
    carry it, so browsers ask for the new image."""
    if png is None:
        PersonaAvatar.objects.filter(persona=persona).delete()
    else:
        PersonaAvatar.objects.update_or_create(persona=persona, defaults={"png": png})
    persona.updated_at = timezone.now()
    Persona.objects.filter(pk=persona.pk).update(updated_at=persona.updated_at)


def persona_avatar_png(*, persona: Persona) -> bytes:
    """What views.avatar serves: the uploaded avatar or the initials image."""
    from .avatars import initials_png

    stored = PersonaAvatar.objects.filter(persona=persona).values_list("png", flat=True).first()
    return bytes(stored) if stored is not None else initials_png(persona.name)
