import factory

from apps.personas.models import Persona


class PersonaFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Persona

    name = factory.Sequence(lambda n: f"Persona {n}")
    slug = factory.Sequence(lambda n: f"persona-{n}")
    description = "A persona made for a test."
    system_prompt = "You are a persona in a test. Answer briefly."
    greeting = "Hello from the test persona."
    llm_kind = "echo"
    tts_kind = "espeak"
    is_published = True
