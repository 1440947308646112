"""`manage.py serve_llm`: the offline reply model as an OpenAI-compatible endpoint
on a loopback port (apps/pipeline/llm_server.py). `make run` starts it beside
Daphne when no LLM_BASE_URL is set, and points the `local` LLM kind at it."""

from django.conf import settings
from django.core.management.base import BaseCommand

from apps.pipeline.llamacpp import MODEL_NAME
from apps.pipeline.llm_server import serve


class Command(BaseCommand):
    help = "Serve the offline reply model at http://HOST:PORT/v1 (OpenAI-compatible)."

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=settings.LLM_LOCAL_PORT,
                            help="0: a free port, printed once listening")  # fmt: skip
        parser.add_argument("--processes", type=int, default=settings.LLM_LOCAL_PROCESSES,
                            help="replies made at once, one process (~200 MB) each")  # fmt: skip
        parser.add_argument("--threads", type=int, default=settings.LLM_LOCAL_THREADS)

    def handle(self, *, host, port, processes, threads, **options):
        def ready(bound: int) -> None:
            self.stdout.write(f"serve_llm: {MODEL_NAME} at http://{host}:{bound}/v1", ending="\n")
            self.stdout.flush()

        serve(host=host, port=port, processes=processes, threads=threads, ready=ready)
