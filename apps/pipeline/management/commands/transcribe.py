import json

from django.core.management.base import BaseCommand, CommandError

from apps.pipeline.files import file_transcribe
from apps.pipeline.providers.base import ProviderError


class Command(BaseCommand):
    requires_system_checks = ()  # audio tools: no database, URLs or models involved
    help = "Transcribe an audio file (any format PyAV reads); the transcript goes to stdout."

    def add_arguments(self, parser):
        parser.add_argument("file")
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        parser.add_argument("--stt", default="", help="STT kind (default: settings.STT_KIND)")

    def handle(self, *args, **options):
        try:
            result = file_transcribe(path=options["file"], kind=options["stt"])
        except (ValueError, ProviderError) as exc:
            raise CommandError(str(exc)) from exc
        self.stderr.write(
            f"{result.provider}: load {result.load_ms:.0f} ms, transcribe "
            f"{result.transcribe_ms:.0f} ms, audio {result.audio_seconds:.2f} s, "
            f"RTF {result.rtf:.3f}"
        )
        self.stdout.write(json.dumps(result.as_dict()) if options["json"] else result.text)
