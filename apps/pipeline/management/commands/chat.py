import asyncio
import sys

from asgiref.sync import sync_to_async
from django.core.management.base import BaseCommand, CommandError

from apps.accounts.models import User
from apps.conversations.services import conversation_start
from apps.personas.models import Persona
from apps.pipeline.chat import chat_turn


class Command(BaseCommand):
    help = "Chat with a persona in the terminal, through the real reply path (no audio)."

    def add_arguments(self, parser):
        parser.add_argument("persona", help="persona slug")
        parser.add_argument("--user", default="demo")

    def handle(self, *args, persona, user, **options):
        found = Persona.objects.filter(slug=persona).first()
        account = User.objects.filter(username=user).first()
        if found is None or account is None:
            raise CommandError("unknown persona or user; try `manage.py seed_demo`")
        conversation = conversation_start(user=account, persona=found)
        if found.greeting:
            self.stdout.write(f"{found.name}: {found.greeting}")
        asyncio.run(self.loop(conversation.id, found.name))

    async def loop(self, conversation_id, name):
        while True:
            line = await sync_to_async(sys.stdin.readline)()
            if not line:
                return
            if not line.strip():
                continue
            self.stdout.write(f"{name}: ", ending="")
            await chat_turn(
                conversation_id=conversation_id,
                text=line.strip(),
                on_delta=lambda d: (self.stdout.write(d, ending=""), self.stdout.flush()),
            )
            self.stdout.write("")
