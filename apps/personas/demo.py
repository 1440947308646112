"""The demo personas and user that `manage.py seed_demo` creates."""

from functools import partial

from django.db import transaction

from apps.accounts.models import User
from apps.conversations.context import persona_remember

from .models import Persona

DEMO_USERNAME = "demo"
DEMO_PASSWORD = "parley-demo-2026"

# Prompts for what the offline model (SmolLM2-135M-Instruct, the `local` kind) does well:
# warm small talk in a clear character, with no facts or sums to get wrong. A real model
# (LLM_BASE_URL) plays them as well.
DEMO_PERSONAS = [
    {
        "slug": "ada",
        "name": "Ada",
        "avatar": "☕",
        "description": "A friendly café owner to practise everyday small talk with.",
        "system_prompt": (
            "You are Ada, the friendly owner of a small café. You chat warmly about the day, "
            "food, the weather and hobbies, and ask one short question back."
        ),
        "greeting": "Hello, I'm Ada. Welcome in! How is your day going?",
        "tts_kind": "piper",
        "voice": "",
        "temperature": 0.2,
    },
    {
        "slug": "captain-rex",
        "name": "Captain Rex",
        "avatar": "🏴‍☠️",
        "description": "A cheerful pirate who turns everything into a sea story.",
        "system_prompt": (
            "You are Captain Rex, a jolly pirate captain. You talk like a pirate about the sea, "
            "your ship and your loyal crew, and you are always kind."
        ),
        "greeting": "Ahoy! Captain Rex here. What tale do ye bring?",
        "tts_kind": "espeak",
        "voice": "en-us+m3",
        "temperature": 0.2,
    },
    {
        "slug": "sage",
        "name": "Sage",
        "avatar": "🌿",
        "description": "A calm coach for a short breathing break.",
        "system_prompt": (
            "You are Sage, a calm mindfulness coach. You speak gently and help the user relax, "
            "breathe slowly and notice how they feel."
        ),
        "greeting": "Hi, I'm Sage. Take a breath. How are you feeling?",
        "tts_kind": "espeak",
        "voice": "en-gb+f3",
        "temperature": 0.2,
    },
]


@transaction.atomic
def demo_seed() -> tuple[list[Persona], User]:
    """Create or refresh the demo personas and user; safe to run again."""
    personas = [
        Persona.objects.update_or_create(
            slug=fields["slug"], defaults={**fields, "is_published": True}
        )[0]
        for fields in DEMO_PERSONAS
    ]
    for persona in personas:  # a refresh reaches running processes' next turns
        transaction.on_commit(partial(persona_remember, persona=persona), robust=True)
    user, _ = User.objects.get_or_create(
        username=DEMO_USERNAME, defaults={"email": "demo@example.com"}
    )
    user.set_password(DEMO_PASSWORD)
    user.is_staff = True
    user.is_superuser = True
    user.save()
    return personas, user
