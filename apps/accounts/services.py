from django.db.models import F

from .models import User


def usage_add(*, user_id: int, audio_seconds: float = 0, tokens: int = 0) -> None:
    """Count what a user spent, atomically (no read-modify-write race)."""
    User.objects.filter(pk=user_id).update(
        audio_seconds_used=F("audio_seconds_used") + audio_seconds,
        tokens_used=F("tokens_used") + tokens,
    )


def user_quota_problem(*, user_id: int) -> str:
    return User.objects.get(pk=user_id).quota_problem()
