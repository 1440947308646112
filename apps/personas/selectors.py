from django.db.models import QuerySet

from .models import Persona


def persona_list_published() -> QuerySet[Persona]:
    return Persona.objects.published()
