from functools import cache

import factory
from django.contrib.auth.hashers import make_password

from apps.accounts.ledger import today
from apps.accounts.models import DailyUsage, User

PASSWORD = "correct-Horse-42"


@cache
def _password_hash() -> str:
    """Hashed once per run: the default hasher is deliberately slow."""
    return make_password(PASSWORD)


class UserFactory(factory.django.DjangoModelFactory):
    """A user whose password is PASSWORD."""

    class Meta:
        model = User
        django_get_or_create = ("username",)

    username = factory.Sequence(lambda n: f"user{n}")
    email = factory.LazyAttribute(lambda user: f"{user.username}@example.com")
    password = factory.LazyFunction(_password_hash)


def usage_set(user: User, *, audio_seconds: float = 0, tokens: int = 0) -> DailyUsage:
    """The user has used this much today (persisted; the live counter is seeded from it)."""
    row, _ = DailyUsage.objects.update_or_create(
        user=user, day=today(), defaults={"audio_seconds": audio_seconds, "tokens": tokens}
    )
    return row


def usage_of(user: User) -> tuple[float, int]:
    """What the user's row of today holds: (speaking seconds, tokens)."""
    row = DailyUsage.objects.filter(user=user, day=today()).first()
    return (row.audio_seconds, row.tokens) if row else (0.0, 0)
