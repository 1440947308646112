from django.core.management.base import BaseCommand, CommandError

from apps.pipeline.files import text_say_to_wav
from apps.pipeline.providers.base import ProviderError


class Command(BaseCommand):
    requires_system_checks = ()  # audio tools: no database, URLs or models involved
    help = "Synthesise text to a WAV file with a TTS engine."

    def add_arguments(self, parser):
        parser.add_argument("text")
        parser.add_argument("-o", "--output", required=True, help="WAV file to write")
        parser.add_argument("--tts", default="", help="TTS kind (default: settings.TTS_KIND)")
        parser.add_argument("--voice", default="", help="engine-specific voice")

    def handle(self, *args, **options):
        try:
            seconds = text_say_to_wav(
                text=options["text"],
                out=options["output"],
                kind=options["tts"],
                voice=options["voice"],
            )
        except (ValueError, OSError, ProviderError) as exc:
            raise CommandError(str(exc)) from exc
        self.stderr.write(f"wrote {options['output']} ({seconds:.2f} s of audio)")
