"""Accounts for load tests (`manage.py loadtest_seed`): users with a password
made for the run, each with one conversation, written to a file the Locust
users read (locustfiles/README.md). No password is fixed in the code."""

import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from django.db import transaction

from apps.accounts.models import User
from apps.conversations.services import conversation_start

from .models import Persona

LOADTEST_PREFIX = "loadtest-"


class LoadtestSeedError(ValueError):
    pass


@dataclass(frozen=True)
class LoadtestAccount:
    username: str
    password: str
    conversation_id: str


@transaction.atomic
def loadtest_users_seed(*, count: int, prefix: str = LOADTEST_PREFIX) -> list[LoadtestAccount]:
    """`count` users named `<prefix>0001`…, created or refreshed, each given a new
    random password and a new conversation with a published persona (in turn).
    Their quotas are unlimited: a long run measures the stack, not the quota (a
    10-minute `make soak` ran its typing users out of reply tokens)."""
    if count < 1:
        raise LoadtestSeedError(f"--users must be at least 1, not {count}")
    if not prefix or len(prefix) > 100:
        raise LoadtestSeedError("the username prefix must have 1 to 100 characters")
    personas = list(Persona.objects.published().order_by("slug"))
    if not personas:
        raise LoadtestSeedError(
            "no published persona to talk to: run `manage.py seed_demo` first "
            "(or publish one in the admin)"
        )
    accounts = []
    for n in range(1, count + 1):
        username = f"{prefix}{n:04d}"
        user, _ = User.objects.get_or_create(
            username=username, defaults={"email": f"{username}@loadtest.invalid"}
        )
        password = secrets.token_urlsafe(18)
        user.set_password(password)
        user.audio_seconds_quota = user.tokens_quota = 0  # 0: unlimited
        user.save(update_fields=["password", "audio_seconds_quota", "tokens_quota"])
        conversation = conversation_start(user=user, persona=personas[(n - 1) % len(personas)])
        accounts.append(LoadtestAccount(username, password, str(conversation.id)))
    return accounts


def loadtest_users_write(accounts: list[LoadtestAccount], path: Path) -> None:
    """The accounts as JSON, readable by the owner only (it holds passwords)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump({"users": [asdict(a) for a in accounts]}, handle, indent=1)
        handle.write("\n")
    os.chmod(path, 0o600)  # an existing file keeps its old mode through O_TRUNC
