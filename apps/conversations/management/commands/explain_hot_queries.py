from django.core.management.base import BaseCommand
from django.db import connection

from apps.conversations.hot_queries import hot_query_plans


class Command(BaseCommand):
    help = (
        "Seed rows in a transaction that is rolled back, run every hot path (voice turn, "
        "socket, pages) and print each statement's plan, then the statement, as Markdown "
        "(docs/database.md). On Postgres (DATABASE_URL) for Postgres's plans."
    )

    def handle(self, *args, **options):
        self.stdout.write(f"Plans on {connection.vendor}.\n")
        for query in hot_query_plans():
            verdict = f"**scans {', '.join(query.scans)}**" if query.scans else "indexed"
            self.stdout.write(f"#### {query.path} ({verdict})\n")
            self.stdout.write("```\n" + "\n".join(query.plan) + "\n```\n")
            self.stdout.write(
                f"<details><summary>SQL</summary>\n\n```sql\n{query.sql}\n```\n</details>\n"
            )
