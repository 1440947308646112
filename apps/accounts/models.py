from django.conf import settings
from django.contrib.auth.models import AbstractUser
from django.db import models


def default_audio_quota() -> int:
    return settings.QUOTA_AUDIO_SECONDS


def default_token_quota() -> int:
    return settings.QUOTA_TOKENS


class User(AbstractUser):
    """A person who talks with personas. Quotas of 0 mean unlimited."""

    audio_seconds_quota = models.PositiveIntegerField(default=default_audio_quota)
    tokens_quota = models.PositiveIntegerField(default=default_token_quota)
    audio_seconds_used = models.FloatField(default=0)
    tokens_used = models.PositiveIntegerField(default=0)

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

    def quota_problem(self) -> str:
        """Why this user may not talk now, or an empty string."""
        if self.audio_seconds_quota and self.audio_seconds_used >= self.audio_seconds_quota:
            return "You have used all of your speaking minutes."
        if self.tokens_quota and self.tokens_used >= self.tokens_quota:
            return "You have used all of your reply tokens."
        return ""

    @property
    def audio_seconds_left(self) -> float | None:
        if not self.audio_seconds_quota:
            return None
        return max(0.0, self.audio_seconds_quota - self.audio_seconds_used)

    @property
    def tokens_left(self) -> int | None:
        if not self.tokens_quota:
            return None
        return max(0, self.tokens_quota - self.tokens_used)
