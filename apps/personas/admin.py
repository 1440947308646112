from django.contrib import admin

from .models import Persona
from .services import persona_delete, persona_duplicate, persona_save


@admin.register(Persona)
class PersonaAdmin(admin.ModelAdmin):
    list_display = (
        "avatar",
        "name",
        "slug",
        "is_published",
        "llm_kind",
        "stt_kind",
        "tts_kind",
        "voice",
        "updated_at",
    )
    list_display_links = ("avatar", "name")
    list_filter = ("is_published", "tts_kind", "stt_kind", "llm_kind")
    list_editable = ("is_published",)
    search_fields = ("name", "slug", "description", "system_prompt")
    prepopulated_fields = {"slug": ("name",)}
    readonly_fields = ("id", "created_at", "updated_at")
    actions = ["duplicate"]
    fieldsets = (
        (None, {"fields": ("name", "slug", "avatar", "description", "is_published")}),
        ("Conversation", {"fields": ("system_prompt", "greeting")}),
        (
            "Engines (empty: the deployment's default)",
            {
                "fields": (
                    "llm_kind",
                    "llm_model",
                    "temperature",
                    "max_tokens",
                    "stt_kind",
                    "tts_kind",
                    "voice",
                )
            },
        ),
        ("Record", {"fields": ("id", "created_at", "updated_at")}),
    )

    # Every staff change goes through the services, which write it through to the
    # context cache: the persona's next turn uses it (the change form and list_editable
    # both save through save_model).
    def save_model(self, request, obj, form, change):
        persona_save(persona=obj)

    def delete_model(self, request, obj):
        persona_delete(persona=obj)

    def delete_queryset(self, request, queryset):
        for persona in queryset:
            persona_delete(persona=persona)

    @admin.action(
        description="Duplicate selected personas (as unpublished copies)", permissions=["add"]
    )
    def duplicate(self, request, queryset):
        copies = [persona_duplicate(persona=persona) for persona in queryset]
        self.message_user(
            request, f"Created {len(copies)} cop{'y' if len(copies) == 1 else 'ies'}."
        )
