from django.core.management.base import BaseCommand

from apps.personas.demo import DEMO_PASSWORD, demo_seed


class Command(BaseCommand):
    help = "Create three published demo personas and a demo (staff) user."

    def handle(self, *args, **options):
        personas, user = demo_seed()
        names = ", ".join(persona.name for persona in personas)
        self.stdout.write(f"Personas: {names}")
        self.stdout.write(f"Demo login: {user.username} / {DEMO_PASSWORD}")
