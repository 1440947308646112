import uuid

from django.conf import settings
from django.db import models


class Conversation(models.Model):
    class Status(models.TextChoices):
        ACTIVE = "active"
        ENDED = "ended"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # No index of its own: conversation_user_recent starts with it.
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="conversations",
        db_index=False,
    )
    persona = models.ForeignKey(
        "personas.Persona", on_delete=models.PROTECT, related_name="conversations"
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    started_at = models.DateTimeField(auto_now_add=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-started_at", "-id"]
        # The history page's keyset: a user's conversations, newest first.
        indexes = [
            models.Index(fields=["user", "-started_at", "-id"], name="conversation_user_recent")
        ]

    def __str__(self) -> str:
        return f"{self.persona} with {self.user} ({self.started_at:%Y-%m-%d %H:%M})"

    @property
    def group_name(self) -> str:
        return f"conversation.{self.id}"


class Message(models.Model):
    """One turn: what the user said or typed, or what the persona replied.
    `seq` orders everything a conversation stores; a socket resumes after it.
    It is the conversation's highest seq + 1, computed by the INSERT itself
    (apps/conversations/services.py); the unique (conversation, seq) index
    serves that, every read of a conversation's turns, and their keyset pages."""

    class Role(models.TextChoices):
        USER = "user"
        ASSISTANT = "assistant"

    class Source(models.TextChoices):
        VOICE = "voice"
        TEXT = "text"
        GREETING = "greeting"
        LLM = "llm"

    class Status(models.TextChoices):
        STREAMING = "streaming"
        COMPLETE = "complete"
        INTERRUPTED = "interrupted"
        FAILED = "failed"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # No index of its own: message_unique_seq starts with it.
    conversation = models.ForeignKey(
        Conversation, on_delete=models.CASCADE, related_name="messages", db_index=False
    )
    seq = models.PositiveIntegerField()
    role = models.CharField(max_length=16, choices=Role.choices)
    source = models.CharField(max_length=16, choices=Source.choices)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.COMPLETE)
    text = models.TextField(blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    provider = models.CharField(max_length=64, blank=True, help_text="Engine that made it.")
    # Why a reply ended failed or interrupted by its engine (a ProviderError code,
    # e.g. llm_timeout); empty for a complete reply and for one the user stopped.
    error_code = models.CharField(max_length=32, blank=True)
    # What the turn's work was and cost (apps/conversations/costs.py): the utterance's
    # audio seconds on a voice turn, the seconds of speech synthesised on a reply (added
    # by each TTS part as it is made), and the price of all of it, in US dollars.
    stt_audio_seconds = models.FloatField(default=0)
    tts_audio_seconds = models.FloatField(default=0)
    cost_usd = models.DecimalField(max_digits=14, decimal_places=8, default=0)
    # Stage timings in milliseconds (see docs/protocol.md).
    speech_end_to_final_ms = models.PositiveIntegerField(null=True, blank=True)
    final_to_first_token_ms = models.PositiveIntegerField(null=True, blank=True)
    first_token_to_first_audio_ms = models.PositiveIntegerField(null=True, blank=True)
    reply_total_ms = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        # The column, not the relation: ordering by "conversation" would join it for its
        # own ordering.
        ordering = ["conversation_id", "seq"]
        constraints = [
            models.UniqueConstraint(fields=["conversation", "seq"], name="message_unique_seq"),
        ]
        indexes = [
            # The few replies streaming now: the sweeper's backstop (apps/realtime/sweeper.py)
            # reads the stale ones without scanning every message.
            models.Index(
                fields=["created_at"],
                condition=models.Q(status="streaming"),
                name="message_streaming",
            ),
        ]

    def __str__(self) -> str:
        return f"#{self.seq} {self.role}: {self.text[:60]}"


class TranscriptSegment(models.Model):
    """The final transcript of one utterance, with where it sits in the audio."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # No index of its own: segment_unique_utterance starts with it.
    conversation = models.ForeignKey(
        Conversation, on_delete=models.CASCADE, related_name="segments", db_index=False
    )
    message = models.OneToOneField(Message, on_delete=models.CASCADE, related_name="segment")
    utterance_id = models.CharField(max_length=64)
    seq = models.PositiveIntegerField()
    start_ms = models.PositiveIntegerField()
    end_ms = models.PositiveIntegerField()
    text = models.TextField()
    confidence = models.FloatField(null=True, blank=True)
    provider = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["conversation_id", "seq"]
        constraints = [
            models.UniqueConstraint(
                fields=["conversation", "utterance_id"], name="segment_unique_utterance"
            ),
            models.CheckConstraint(
                condition=models.Q(end_ms__gte=models.F("start_ms")), name="segment_end_after_start"
            ),
        ]

    def __str__(self) -> str:
        return self.text[:80]
