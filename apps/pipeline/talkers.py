"""Set-up for developer tools that talk to a running server as a user."""

from apps.accounts.models import User
from apps.accounts.services import session_key_create
from apps.conversations.services import conversation_start
from apps.personas.models import Persona


def talker_prepare(*, persona_slug: str, username: str, base_url: str) -> tuple[str, str]:
    """A new conversation with the persona, and (socket URL, session key) to join it."""
    persona = Persona.objects.filter(slug=persona_slug).first()
    if persona is None:
        raise ValueError(f"no persona {persona_slug!r}; try `manage.py seed_demo`")
    user = User.objects.filter(username=username).first()
    if user is None:
        raise ValueError(f"no user {username!r}")
    conversation = conversation_start(user=user, persona=persona)
    socket_url = f"{base_url.rstrip('/')}/ws/conversations/{conversation.id}/"
    return socket_url, session_key_create(user=user)
