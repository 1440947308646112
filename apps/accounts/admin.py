from django.contrib import admin
from django.contrib.auth.admin import UserAdmin as BaseUserAdmin

from .models import User


@admin.register(User)
class UserAdmin(BaseUserAdmin):
    list_display = (
        "username",
        "email",
        "is_staff",
        "audio_seconds_used",
        "audio_seconds_quota",
        "tokens_used",
        "tokens_quota",
        "date_joined",
    )
    list_filter = (*BaseUserAdmin.list_filter, "date_joined")
    fieldsets = (
        *(BaseUserAdmin.fieldsets or ()),  # typed Optional on ModelAdmin; UserAdmin sets it
        (
            "Usage and quotas",
            {
                "fields": (
                    "audio_seconds_quota",
                    "audio_seconds_used",
                    "tokens_quota",
                    "tokens_used",
                )
            },
        ),
    )
    actions = ["reset_usage"]

    @admin.action(description="Reset usage to zero", permissions=["change"])
    def reset_usage(self, request, queryset):
        updated = queryset.update(audio_seconds_used=0, tokens_used=0)
        self.message_user(request, f"Usage reset for {updated} user(s).")
