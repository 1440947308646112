from django.db import transaction
from django.utils.text import slugify

from .models import Persona


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
