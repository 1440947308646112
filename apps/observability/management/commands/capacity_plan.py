from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from apps.observability.capacity import Options, capacity_plan, options_add, options_of, plan_text
from apps.observability.capacity_inputs import CapacityError


class Command(BaseCommand):
    requires_system_checks = ()  # arithmetic on JSON files: no database involved
    help = "How many pods, workers, connections and nodes a load needs, from docs/benchmarks."

    def add_arguments(self, parser):
        parser.add_argument("--users", type=int, required=True)
        parser.add_argument("--speaking-ratio", type=float, required=True, help="0 to 1")
        parser.add_argument("--gpu", action="store_true", help="speech-to-text on GPUs")
        parser.add_argument("--bench-dir", type=Path, default=settings.BASE_DIR / "docs/benchmarks")
        options_add(parser, Options)

    def handle(self, *args, **options):
        chosen = options_of(Options, options)
        try:
            plan = capacity_plan(
                users=options["users"],
                speaking_ratio=options["speaking_ratio"],
                gpu=options["gpu"],
                options=chosen,
                bench_dir=options["bench_dir"],
            )
        except CapacityError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(plan_text(plan))
