from functools import partial

from django.db import transaction
from django.db.models import F, Subquery

from apps.realtime.broadcast import group_publish
from apps.realtime.events import event, user_group_name

from .models import User


def usage_add(*, user_id: int | Subquery, audio_seconds: float = 0, tokens: int = 0) -> None:
    """Count what a user spent, atomically (no read-modify-write race), in one
    statement; `user_id` may be a subquery of it (a conversation's user)."""
    User.objects.filter(pk=user_id).update(
        audio_seconds_used=F("audio_seconds_used") + audio_seconds,
        tokens_used=F("tokens_used") + tokens,
    )


def user_quota_problem(*, user_id: int) -> str:
    return User.objects.get(pk=user_id).quota_problem()


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
