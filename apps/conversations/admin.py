from django.contrib import admin

from .costs import usd_text
from .models import Conversation, Message, TranscriptSegment
from .selectors import conversation_cost_usd
from .services import conversation_delete, message_edit

TIMINGS = (
    "speech_end_to_final_ms",
    "final_to_first_token_ms",
    "first_token_to_first_audio_ms",
    "reply_total_ms",
)
# What each turn used and cost (apps/conversations/costs.py).
COSTS = ("stt_audio_seconds", "tts_audio_seconds", "cost_usd")


class MessageInline(admin.TabularInline):
    model = Message
    fields = (
        "seq",
        "role",
        "source",
        "status",
        "text",
        "prompt_tokens",
        "completion_tokens",
        *COSTS,
        *TIMINGS,
    )
    readonly_fields = fields
    extra = 0
    can_delete = False
    ordering = ("seq",)

    def has_add_permission(self, request, obj=None):
        return False


class TranscriptSegmentInline(admin.TabularInline):
    model = TranscriptSegment
    fields = ("seq", "start_ms", "end_ms", "text", "confidence", "provider")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ("id", "user", "persona", "status", "started_at", "ended_at", "cost_total")
    list_filter = ("status", "persona", "started_at")
    search_fields = ("id", "user__username", "user__email", "persona__name", "messages__text")
    list_select_related = ("user", "persona")
    readonly_fields = (
        "id",
        "user",
        "persona",
        "started_at",
        "ended_at",
        "updated_at",
        "cost_total",
    )
    date_hierarchy = "started_at"
    inlines = [MessageInline, TranscriptSegmentInline]

    def get_queryset(self, request):
        # The total as a subquery per row: the list costs no query per conversation.
        return super().get_queryset(request).annotate(cost_total=conversation_cost_usd())

    @admin.display(description="cost (USD)", ordering="cost_total")
    def cost_total(self, obj):
        return usd_text(obj.cost_total)

    def delete_model(self, request, obj):
        conversation_delete(conversation=obj)

    def delete_queryset(self, request, queryset):
        for conversation in queryset:
            conversation_delete(conversation=conversation)


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = (
        "conversation",
        "seq",
        "role",
        "source",
        "status",
        "short_text",
        "prompt_tokens",
        "completion_tokens",
        *COSTS,
        *TIMINGS,
    )
    list_filter = ("role", "source", "status", "provider")
    search_fields = ("text", "conversation__id", "conversation__user__username")
    list_select_related = ("conversation",)
    readonly_fields = (
        "id",
        "conversation",
        "seq",
        "role",
        "source",
        "provider",
        "prompt_tokens",
        "completion_tokens",
        *COSTS,
        *TIMINGS,
        "created_at",
        "updated_at",
    )

    @admin.display(description="text")
    def short_text(self, obj):
        return obj.text[:80]

    def save_model(self, request, obj, form, change):
        message_edit(message=obj)

    def has_delete_permission(self, request, obj=None):
        # A turn's seq is never handed out again; delete the whole conversation instead.
        return False
