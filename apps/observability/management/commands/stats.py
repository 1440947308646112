import json

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from apps.observability.stats import TURN_LIMIT, since_parse, stats_table, turn_stats


class Command(BaseCommand):
    help = (
        "Per-stage latency percentiles (complete turns), turns by status, tokens, audio "
        "and cost, from the turns stored since a while ago: no Prometheus needed."
    )

    def add_arguments(self, parser):
        parser.add_argument("--since", default="1h", help="how far back: 30m, 1h, 2d (default 1h)")
        parser.add_argument("--json", action="store_true", help="the same, as one JSON object")
        parser.add_argument(
            "--limit",
            type=int,
            default=TURN_LIMIT,
            help=f"complete turns whose timings are read, newest first (default {TURN_LIMIT})",
        )

    def handle(self, *args, **options):
        try:
            span = since_parse(options["since"])
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        if options["limit"] <= 0:
            raise CommandError(f"--limit {options['limit']}: must be more than 0")
        now = timezone.now()
        stats = turn_stats(since=now - span, until=now, limit=options["limit"])
        if options["json"]:
            self.stdout.write(json.dumps(stats.as_dict(), indent=2))
        else:
            self.stdout.write(stats_table(stats))
