"""One client per event loop: asyncio clients (redis-py's, httpx's) bind to the
loop they are first used on. A web process has one loop; tests make many."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

import redis.asyncio as aredis

T = TypeVar("T")


class PerLoop(Generic[T]):
    def __init__(self, make: Callable[[], T]) -> None:
        self.make = make
        self.clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T]
        self.clients = weakref.WeakKeyDictionary()

    def get(self) -> T:
        loop = asyncio.get_running_loop()
        client = self.clients.get(loop)
        if client is None:
            client = self.clients[loop] = self.make()
        return client

    def __len__(self) -> int:
        return len(self.clients)


def redis_per_loop(url: str) -> PerLoop[aredis.Redis]:
    """Clients that give up after 2 s, so nothing waits long on a Redis that is away."""
    return PerLoop(lambda: aredis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2))
