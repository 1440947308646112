from django.contrib import admin
from django.contrib.auth.admin import UserAdmin as BaseUserAdmin

from apps.conversations.costs import usd_text
from apps.conversations.selectors import user_cost_usd

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
        "cost_total",
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
                    "cost_total",
                )
            },
        ),
    )
    readonly_fields = ("cost_total",)
    actions = ["reset_usage"]

    def get_queryset(self, request):
        # The total as a subquery per row: the list costs no query per user.
        return super().get_queryset(request).annotate(cost_total=user_cost_usd())

    @admin.display(description="cost (USD)", ordering="cost_total")
    def cost_total(self, obj):
        return usd_text(obj.cost_total)

    @admin.action(description="Reset usage to zero", permissions=["change"])
    def reset_usage(self, request, queryset):
        updated = queryset.update(audio_seconds_used=0, tokens_used=0)
        self.message_user(request, f"Usage reset for {updated} user(s).")
