from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from apps.personas.demo import DEMO_PASSWORD, demo_seed


class Command(BaseCommand):
    help = "Create three published demo personas and a demo (staff) user."

    def add_arguments(self, parser):
        parser.add_argument(
            "--allow-production",
            action="store_true",
            help="seed outside development (staging, production): the demo login is public",
        )

    def handle(self, *args, allow_production, **options):
        if settings.ENV != "development" and not allow_production:
            raise CommandError(
                "seed_demo creates a superuser with a published password; refusing "
                f"with DJANGO_ENV={settings.ENV} (pass --allow-production to insist)"
            )
        personas, user = demo_seed()
        names = ", ".join(persona.name for persona in personas)
        self.stdout.write(f"Personas: {names}")
        self.stdout.write(f"Demo login: {user.username} / {DEMO_PASSWORD}")
