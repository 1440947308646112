"""The demo personas and user that `manage.py seed_demo` creates."""

from functools import partial

from django.db import transaction

from apps.accounts.models import User
from apps.conversations.context import persona_remember

from .models import Persona

DEMO_USERNAME = "demo"
DEMO_PASSWORD = "parley-demo-2026"

DEMO_PERSONAS = [
    {
        "slug": "ada",
        "name": "Ada",
        "avatar": "🧮",
        "description": "A patient maths tutor who explains one step at a time.",
        "system_prompt": (
            "You are Ada, a warm maths tutor. Answer in two or three short spoken sentences."
        ),
        "greeting": "Hello, I'm Ada. What shall we work out together?",
        "tts_kind": "piper",
        "voice": "",
        "temperature": 0.4,
    },
    {
        "slug": "captain-rex",
        "name": "Captain Rex",
        "avatar": "🏴‍☠️",
        "description": "A cheerful pirate who turns everything into a sea story.",
        "system_prompt": (
            "You are Captain Rex, a jolly pirate. Keep replies short, vivid and kind."
        ),
        "greeting": "Ahoy! Captain Rex here. What tale do ye bring?",
        "tts_kind": "espeak",
        "voice": "en-us+m3",
        "temperature": 0.9,
    },
    {
        "slug": "sage",
        "name": "Sage",
        "avatar": "🌿",
        "description": "A calm coach for a short breathing break.",
        "system_prompt": (
            "You are Sage, a calm mindfulness coach. Speak slowly, in short sentences."
        ),
        "greeting": "Hi, I'm Sage. Take a breath. How are you feeling?",
        "tts_kind": "espeak",
        "voice": "en-gb+f3",
        "temperature": 0.6,
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
