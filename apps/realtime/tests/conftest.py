import pytest

from apps.accounts.models import User
from apps.accounts.services import session_key_create
from apps.conversations.services import conversation_start
from apps.personas.demo import demo_seed
from apps.personas.models import Persona
from apps.pipeline.talk_client import TalkClient


@pytest.fixture
def voice_server(transactional_db, live_daphne, live_worker):
    """A real Daphne (and, in services mode, a real Celery worker) with the demo personas."""
    demo_seed()
    return live_daphne


def socket_opener(server, clients: list[TalkClient]):
    """A function that opens a socket to `server` (a live Daphne) as a new user (or a
    given one) on a new conversation (or a given one); the sockets go to `clients`."""

    def open_socket(
        persona: str = "ada",
        *,
        user: User | None = None,
        conversation=None,
        resume_from: int = 0,
        connect: bool = True,
    ) -> TalkClient:
        if user is None:
            user = User.objects.create_user(f"talker{User.objects.count()}", password="pw-123456!")
        if conversation is None:
            conversation = conversation_start(user=user, persona=Persona.objects.get(slug=persona))
        client = TalkClient(
            f"{server.ws_url}/ws/conversations/{conversation.id}/",
            session_cookie=session_key_create(user=user),
        )
        client.conversation = conversation
        client.user = user
        clients.append(client)
        if connect:
            ready = client.connect(resume_from=resume_from)
            assert ready["type"] == "ready", ready
            client.ready = ready
        return client

    return open_socket


@pytest.fixture
def talker(voice_server):
    """Open a socket as a new user (or a given one) on a new conversation."""
    clients: list[TalkClient] = []
    yield socket_opener(voice_server, clients)
    for client in clients:
        client.close()
