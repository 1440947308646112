"""A text turn outside a socket (manage.py chat), through the same services
as the socket: store the message, stream the reply, store the reply."""

import asyncio
import time
from collections.abc import Callable
from uuid import UUID

from channels.db import database_sync_to_async

from apps.conversations.services import text_message_add

from .services import ReplyState, reply_run


async def chat_turn(*, conversation_id: UUID, text: str, on_delta: Callable[[str], object]) -> str:
    await database_sync_to_async(text_message_add)(conversation_id=conversation_id, text=text)
    state = ReplyState()
    shown = 0

    def show_new() -> None:
        nonlocal shown
        if len(state.text) > shown:
            on_delta(state.text[shown:])
            shown = len(state.text)

    async def watch() -> None:
        while not state.done:
            show_new()
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    await reply_run(conversation_id=conversation_id, final_at=time.time(), state=state, speak=False)
    await watcher
    show_new()
    return state.text
