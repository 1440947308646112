import re
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from apps.accounts.models import User
from apps.personas.models import Persona

pytestmark = pytest.mark.django_db


def seed_demo() -> str:
    out = StringIO()
    call_command("seed_demo", stdout=out)
    return out.getvalue()


def printed_credentials(output: str) -> tuple[str, str]:
    match = re.search(r"^Demo login: (\S+) / (\S+)$", output, re.MULTILINE)
    assert match, output
    return match.group(1), match.group(2)


def test_seed_demo_creates_three_distinct_published_personas():
    # when
    output = seed_demo()

    # then
    personas = list(Persona.objects.all())
    assert len(personas) == 3
    assert all(persona.is_published for persona in personas)
    assert len({persona.system_prompt for persona in personas}) == 3
    assert len({persona.greeting for persona in personas}) == 3
    assert len({(persona.tts_kind, persona.voice) for persona in personas}) == 3
    assert len({persona.voice for persona in personas}) == 3
    assert len({persona.tts_kind for persona in personas}) >= 2
    assert all(persona.name in output for persona in personas)


def test_seed_demo_personas_use_known_engines():
    from apps.pipeline.providers.registry import LLM_KINDS, STT_KINDS, TTS_KINDS

    seed_demo()

    for persona in Persona.objects.all():
        assert persona.tts_kind in TTS_KINDS
        assert persona.stt_kind in ("", *STT_KINDS)
        assert persona.llm_kind in ("", *LLM_KINDS)
        assert 0 <= persona.temperature <= 2


def test_seed_demo_prints_credentials_that_log_in(client):
    # given
    username, password = printed_credentials(seed_demo())

    # when
    response = client.post("/accounts/login/", {"username": username, "password": password})

    # then
    assert response.status_code == 302
    assert client.get("/accounts/usage/").status_code == 200
    assert User.objects.get(username=username).is_staff


def test_seed_demo_twice_duplicates_nothing(client):
    # given
    seed_demo()
    first = {persona.slug: persona.pk for persona in Persona.objects.all()}

    # when
    output = seed_demo()

    # then
    assert {persona.slug: persona.pk for persona in Persona.objects.all()} == first
    assert User.objects.count() == 1
    username, password = printed_credentials(output)
    assert client.login(username=username, password=password)


def test_seed_demo_republishes_and_restores_an_edited_persona():
    # given a demo persona that staff unpublished and edited
    seed_demo()
    Persona.objects.filter(slug="ada").update(is_published=False, system_prompt="changed")

    # when
    seed_demo()

    # then
    ada = Persona.objects.get(slug="ada")
    assert ada.is_published
    assert ada.system_prompt != "changed"


@pytest.mark.parametrize("env", ["production", "staging"])
def test_seed_demo_refuses_outside_development_unless_asked(settings, env):
    settings.ENV = env
    with pytest.raises(CommandError, match=f"refusing with DJANGO_ENV={env}"):
        call_command("seed_demo", stdout=StringIO())
    assert not User.objects.filter(username="demo").exists()

    call_command("seed_demo", "--allow-production", stdout=StringIO())
    assert User.objects.filter(username="demo", is_staff=True).exists()
