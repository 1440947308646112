from dataclasses import dataclass
from functools import partial
from uuid import UUID

from django.db import connection, transaction

from apps.conversations.models import Conversation
from apps.realtime.broadcast import group_publish
from apps.realtime.events import event, user_group_name

from .ledger import quota_forget, today
from .models import DailyUsage, User


def usage_add(*, conversation_id: UUID, audio_seconds: float = 0, tokens: int = 0) -> None:
    """Count what the conversation's user used today (UTC): one statement, an
    upsert that adds in the database (no read-modify-write race), run inside
    the transaction of the turn that used it."""
    daily = DailyUsage._meta.db_table
    conversation_id_db = Conversation._meta.pk.get_db_prep_value(conversation_id, connection)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {daily} (user_id, day, audio_seconds, tokens)"  # noqa: S608 - names only
            f" SELECT user_id, %s, %s, %s FROM {Conversation._meta.db_table} WHERE id = %s"
            f" ON CONFLICT (user_id, day) DO UPDATE SET"
            f" audio_seconds = {daily}.audio_seconds + excluded.audio_seconds,"
            f" tokens = {daily}.tokens + excluded.tokens",
            [
                connection.ops.adapt_datefield_value(today()),
                audio_seconds,
                tokens,
                conversation_id_db,
            ],
        )


@dataclass(frozen=True)
class UsageToday:
    audio_seconds: float
    tokens: int
    audio_seconds_left: float | None  # None: unlimited
    tokens_left: int | None


def usage_days(*, user_id: int, size: int) -> list[DailyUsage]:
    """The user's last `size` days of use, newest first (one query)."""
    return list(DailyUsage.objects.filter(user_id=user_id).order_by("-day")[:size])


def usage_today(*, user: User, days: list[DailyUsage]) -> UsageToday:
    """Today's use against the user's daily quotas, from `usage_days` (no query)."""
    day = today()
    row = next((d for d in days if d.day == day), None)
    audio, tokens = (row.audio_seconds, row.tokens) if row else (0.0, 0)
    return UsageToday(
        audio_seconds=audio,
        tokens=tokens,
        audio_seconds_left=None
        if not user.audio_seconds_quota
        else max(0.0, user.audio_seconds_quota - audio),
        tokens_left=None if not user.tokens_quota else max(0, user.tokens_quota - tokens),
    )


def usage_reset_today(*, user_ids: list[int]) -> int:
    """Staff reset the users' usage of today: the persisted rows and the live counters."""
    day = today()
    DailyUsage.objects.filter(user_id__in=user_ids, day=day).delete()
    quota_forget(user_ids=user_ids, day=day)
    return len(user_ids)


def session_key_create(*, user: User) -> str:
    """A signed-in session for `user`, for developer tools that open sockets
    (manage.py talk, benchmarks, load tests) without a browser."""
    from django.conf import settings
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
    from django.contrib.sessions.backends.base import SessionBase
    from django.utils.module_loading import import_string

    store: SessionBase = import_string(f"{settings.SESSION_ENGINE}.SessionStore")()
    store[SESSION_KEY] = str(user.pk)
    store[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    store[HASH_SESSION_KEY] = user.get_session_auth_hash()
    store.save()
    session_key = store.session_key
    assert session_key is not None  # save() assigns one
    return session_key


def user_sockets_end(*, user_id: int, reason: str, session_key: str = "") -> None:
    """After the transaction commits, close the user's live sockets on every web
    process with 4401: those of `session_key` only (a logout), or all of them (a
    password change, a deactivation). A socket otherwise keeps the user it
    authenticated with when it opened, for as long as it stays open."""
    message = event("session.ended", reason=reason, session_key=session_key)
    transaction.on_commit(partial(group_publish, user_group_name(user_id), message), robust=True)
