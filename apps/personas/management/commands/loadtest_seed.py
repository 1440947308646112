from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from apps.personas.loadtest import (
    LOADTEST_PREFIX,
    LoadtestSeedError,
    loadtest_users_seed,
    loadtest_users_write,
)


class Command(BaseCommand):
    help = (
        "Create (or refresh) load-test users with new random passwords, each with a "
        "conversation, and write them to a JSON file for the Locust users."
    )

    def add_arguments(self, parser):
        parser.add_argument("--users", type=int, default=20, help="how many users (default 20)")
        parser.add_argument(
            "--out",
            default="var/loadtest-users.json",
            help="where to write the accounts (default var/loadtest-users.json; mode 0600)",
        )
        parser.add_argument("--prefix", default=LOADTEST_PREFIX, help="username prefix")
        parser.add_argument(
            "--allow-production",
            action="store_true",
            help="seed even with DJANGO_ENV=production (creates real accounts)",
        )

    def handle(self, *args, users, out, prefix, allow_production, **options):
        if settings.PRODUCTION and not allow_production:
            raise CommandError(
                "loadtest_seed creates accounts that can sign in; refusing in production "
                "(pass --allow-production to insist)"
            )
        try:
            accounts = loadtest_users_seed(count=users, prefix=prefix)
        except LoadtestSeedError as exc:
            raise CommandError(str(exc)) from exc
        loadtest_users_write(accounts, Path(out))
        self.stdout.write(f"{len(accounts)} load-test users ({prefix}0001…) written to {out}")
