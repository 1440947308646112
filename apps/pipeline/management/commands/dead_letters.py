import json

from django.core.management.base import BaseCommand, CommandError

from apps.pipeline.redelivery import broker_redis, dead_letters


class Command(BaseCommand):
    help = (
        "List the tasks dead-lettered after TASK_MAX_STARTS starts that did not finish "
        "(each killed its worker), newest first, one JSON object a line: task, id, queue, "
        "kwargs, starts, dead_lettered_at, request_id (docs/reliability.md, Workers)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--limit", type=int, default=100, help="at most this many (100)")

    def handle(self, *args, limit: int, **options):
        if limit < 1:
            raise CommandError("--limit must be at least 1")
        if broker_redis() is None:
            raise CommandError("no Redis broker (CELERY_BROKER_URL): nothing is dead-lettered")
        for record in dead_letters(limit=limit):
            self.stdout.write(json.dumps(record, sort_keys=True))
