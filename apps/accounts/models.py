from django.conf import settings
from django.contrib.auth.models import AbstractUser
from django.db import models


def default_audio_quota() -> int:
    return settings.QUOTA_AUDIO_SECONDS


def default_token_quota() -> int:
    return settings.QUOTA_TOKENS


class User(AbstractUser):
    """A person who talks with personas. Quotas are per UTC day (apps/accounts/ledger.py);
    0 means unlimited. New accounts get the small defaults of settings; staff raise them."""

    audio_seconds_quota = models.PositiveIntegerField(
        "speaking seconds per day", default=default_audio_quota, help_text="0 is unlimited."
    )
    tokens_quota = models.PositiveIntegerField(
        "reply tokens per day", default=default_token_quota, help_text="0 is unlimited."
    )

    _loaded_auth: tuple[str | None, bool | None] | None = None  # as loaded (from_db)

    @classmethod
    def from_db(cls, db, field_names, values, **kwargs):
        user = super().from_db(db, field_names, values, **kwargs)
        user._loaded_auth = (user.__dict__.get("password"), user.__dict__.get("is_active"))
        return user

    def save(self, *args, **kwargs):
        """A password change or a deactivation of a stored user ends its live sockets,
        on every path that saves it (the password forms, the admin, `changepassword`).
        Compared with what was loaded: a user made here (a factory, a sign-up) has none."""
        loaded = self._loaded_auth
        super().save(*args, **kwargs)
        if loaded is None:
            return
        password_changed = loaded[0] is not None and self.password != loaded[0]
        deactivated = loaded[1] is True and not self.is_active
        self._loaded_auth = (self.password, self.is_active)
        if password_changed or deactivated:
            from .services import user_sockets_end

            reason = "deactivated" if deactivated else "password_changed"
            user_sockets_end(user_id=self.pk, reason=reason)


class DailyUsage(models.Model):
    """What one user used on one UTC day: speech transcribed and reply tokens.
    Written in the same transaction as the turn that used it; the live quota
    counters (ledger.py) start from it."""

    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="daily_usage")
    day = models.DateField()
    audio_seconds = models.FloatField(default=0)
    tokens = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "day"], name="daily_usage_once")]
        ordering = ["-day"]
        verbose_name_plural = "daily usage"

    def __str__(self) -> str:
        return f"{self.user_id} on {self.day}"
