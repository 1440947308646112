import json
import sys

from django.core.management.base import BaseCommand, CommandError

from apps.pipeline.audio import decode_to_pcm16
from apps.pipeline.talk_client import TalkClient, turn_after_speech
from apps.pipeline.talkers import talker_prepare


class Command(BaseCommand):
    help = (
        "Stream an audio file to a running server over a real WebSocket at real-time pace "
        "and print every event as a JSON line with its arrival time."
    )

    def add_arguments(self, parser):
        parser.add_argument("persona", help="persona slug")
        parser.add_argument("--wav", required=True, help="audio file (any format PyAV reads)")
        parser.add_argument("--url", default="ws://127.0.0.1:8000", help="server base URL")
        parser.add_argument("--user", default="demo", help="username to talk as")
        parser.add_argument("--timeout", type=float, default=60)

    def handle(self, *args, persona, wav, url, user, timeout, **options):
        try:
            pcm = decode_to_pcm16(wav)
            socket_url, cookie = talker_prepare(persona_slug=persona, username=user, base_url=url)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        client = TalkClient(socket_url, session_cookie=cookie, on_event=_print_event)
        try:
            client.connect()
        except OSError as exc:
            raise CommandError(f"cannot reach {url}: {exc}") from exc
        after = len(client.received)
        client.stream(pcm + bytes(32_000 * 2))  # and 2 s of silence to end the utterance
        try:
            turn_after_speech(client, after=after, timeout=timeout)
        except TimeoutError as exc:
            raise CommandError(str(exc)) from exc
        finally:
            client.close()


def _print_event(item) -> None:
    event = {k: v for k, v in item.event.items() if k != "data"}
    sys.stdout.write(json.dumps({"t": round(item.t, 3), **event}) + "\n")
    sys.stdout.flush()
