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
        max_length=8,
        default="🙂",
        help_text="A short text avatar for socket clients (the ready event). The pages show"
        " the uploaded image, or the name's initials.",
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


class PersonaAvatar(models.Model):
    """A persona's uploaded avatar, as re-encoded by avatars.avatar_encode (a small
    PNG, kept here so that every web pod serves it). Its own table: nothing that
    lists personas loads the bytes."""

    persona = models.OneToOneField(
        Persona, on_delete=models.CASCADE, primary_key=True, related_name="avatar_image"
    )
    png = models.BinaryField()
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"avatar of {self.persona_id}"
