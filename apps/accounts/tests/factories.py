from functools import cache

import factory
from django.contrib.auth.hashers import make_password

from apps.accounts.models import User

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
