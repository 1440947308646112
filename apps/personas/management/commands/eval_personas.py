"""`manage.py eval_personas`: the demo personas on the offline model, a report
(apps/personas/evaluation.py): a table, and JSON with every answer."""

import json
import logging
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand

from apps.personas.demo import DEMO_PERSONAS
from apps.personas.evaluation import PROMPTS, personas_evaluate_sync
from apps.pipeline.llm_server import served_in_thread


class Command(BaseCommand):
    help = "Ask each demo persona the same prompts on the offline model; report how it does."

    def add_arguments(self, parser):
        parser.add_argument("--prompts", type=int, default=len(PROMPTS),
                            help=f"how many of the {len(PROMPTS)} prompts to ask")  # fmt: skip
        parser.add_argument("--out", default="reports/eval_personas.json")
        parser.add_argument("--url", default=settings.LLM_LOCAL_URL,
                            help="a running serve_llm (default: LLM_LOCAL_URL, else one "
                                 "started in this process)")  # fmt: skip

    def handle(self, *, prompts, out, url, **options):
        logging.getLogger("httpx2").setLevel(logging.WARNING)  # a line per request otherwise
        logging.getLogger("httpx").setLevel(logging.WARNING)
        asked = PROMPTS[: max(1, prompts)]
        if url:
            reports = personas_evaluate_sync(personas=DEMO_PERSONAS, prompts=asked, base_url=url)
        else:
            with served_in_thread() as local:
                reports = personas_evaluate_sync(
                    personas=DEMO_PERSONAS, prompts=asked, base_url=local
                )
        summaries = [report.summary() for report in reports]
        self.stdout.write(f"{'persona':<14}{'prompts':>8}{'in character':>14}{'refusals':>10}"
                          f"{'echoes':>8}{'mean words':>12}{'max sentences':>15}")  # fmt: skip
        for s in summaries:
            self.stdout.write(
                f"{s['slug']:<14}{s['prompts']:>8}{s['in_character_rate']:>14.0%}"
                f"{s['refusal_rate']:>10.0%}{s['echo_rate']:>8.0%}{s['mean_words']:>12.1f}"
                f"{s['max_sentences']:>15}"
            )
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"personas": summaries}, indent=2, ensure_ascii=False) + "\n")
        self.stdout.write(f"written: {path}")
