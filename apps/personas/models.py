import uuid

from django.db import models


class PersonaQuerySet(models.QuerySet):
    def published(self) -> "PersonaQuerySet":
        return self.filter(is_published=True)


class Persona(models.Model):
    """Who the user talks to: prompt, voice, and which engines run each stage.
    An empty `*_kind` means the deployment's default (settings.STT_KIND etc.)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=80)
    slug = models.SlugField(max_length=80, unique=True)
    avatar = models.CharField(
        max_length=8, default="🙂", help_text="An emoji shown in the gallery."
    )
    description = models.CharField(max_length=200, blank=True)
    system_prompt = models.TextField()
    greeting = models.TextField(blank=True)
    voice = models.CharField(
        max_length=80, blank=True, help_text="Voice name for the TTS engine; empty: its default."
    )
    llm_kind = models.CharField(max_length=32, blank=True)
    llm_model = models.CharField(max_length=120, blank=True)
    temperature = models.FloatField(default=0.7)
    max_tokens = models.PositiveIntegerField(default=300)
    stt_kind = models.CharField(max_length=32, blank=True)
    tts_kind = models.CharField(max_length=32, blank=True)
    is_published = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = PersonaQuerySet.as_manager()

    class Meta:
        ordering = ["name"]
        # The gallery: published personas by name.
        indexes = [
            models.Index(
                fields=["name"],
                condition=models.Q(is_published=True),
                name="persona_published_by_name",
            )
        ]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(temperature__gte=0) & models.Q(temperature__lte=2),
                name="persona_temperature_range",
            )
        ]

    def __str__(self) -> str:
        return self.name
