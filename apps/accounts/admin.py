from django.contrib import admin
from django.contrib.auth.admin import UserAdmin as BaseUserAdmin
from django.db.models import OuterRef, Subquery

from apps.conversations.costs import usd_text
from apps.conversations.selectors import user_cost_usd

from .ledger import today
from .models import DailyUsage, User
from .services import usage_reset_today


@admin.register(User)
class UserAdmin(BaseUserAdmin):
    list_display = (
        "username",
        "email",
        "is_staff",
        "audio_today",
        "audio_seconds_quota",
        "tokens_today",
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
                    "audio_today",
                    "tokens_quota",
                    "tokens_today",
                    "cost_total",
                )
            },
        ),
    )
    readonly_fields = ("cost_total", "audio_today", "tokens_today")
    actions = ["reset_usage"]

    def get_queryset(self, request):
        # The total and today's usage as subqueries per row: the list costs no query per user.
        today_row = DailyUsage.objects.filter(user=OuterRef("pk"), day=today())
        return (
            super()
            .get_queryset(request)
            .annotate(
                cost_total=user_cost_usd(),
                audio_today=Subquery(today_row.values("audio_seconds")[:1]),
                tokens_today=Subquery(today_row.values("tokens")[:1]),
            )
        )

    @admin.display(description="speaking seconds today", ordering="audio_today")
    def audio_today(self, obj):
        return round(obj.audio_today or 0, 1)

    @admin.display(description="tokens today", ordering="tokens_today")
    def tokens_today(self, obj):
        return obj.tokens_today or 0

    @admin.display(description="cost (USD)", ordering="cost_total")
    def cost_total(self, obj):
        return usd_text(obj.cost_total)

    @admin.action(description="Reset today's usage to zero", permissions=["change"])
    def reset_usage(self, request, queryset):
        updated = usage_reset_today(user_ids=list(queryset.values_list("pk", flat=True)))
        self.message_user(request, f"Today's usage reset for {updated} user(s).")


@admin.register(DailyUsage)
class DailyUsageAdmin(admin.ModelAdmin):
    list_display = ("day", "user", "audio_seconds", "tokens")
    list_filter = ("day",)
    search_fields = ("user__username",)
    list_select_related = ("user",)
    date_hierarchy = "day"
