"""A worker survives a Redis broker restart (celery/celery#10205, celery/kombu#2007).

When a worker's broker connection breaks, Celery 5.7's consumer first calls
`connection.collect()`, which detaches kombu's Redis transport from the
connection (`transport.client = None`), and then `connection.close()`, which
closes the connection's default channel. Closing a channel puts its
unacknowledged messages back on their queues (`restore_unacked`), and for that
the Redis channel builds a new connection pool from `transport.client`, which
is gone: `AttributeError: 'NoneType' object has no attribute 'hostname'`.
Celery ignores only connection errors while it closes a broken connection, so
the AttributeError ended the worker (reproduced with a Redis of our own:
apps/pipeline/tests/test_worker_faults.py).

The patch: a channel whose transport was detached raises redis-py's
ConnectionError instead, which every close path ignores, so the consumer goes
on to reconnect. The channel's unacknowledged messages are still in the
broker's `unacked` hash: the visibility timeout gives them back
(CELERY_VISIBILITY_TIMEOUT_S), as it does for a worker that died. A task that
was running meanwhile finishes; its acknowledgement, on the dead channel,
fails with the same error (logged by Celery), so it may run once more after
the visibility timeout, which every task is safe to do."""

from __future__ import annotations


def kombu_redis_close_survives_a_lost_broker() -> None:
    """Install the patch once (config/celery.py, at import)."""
    from kombu.transport.redis import Channel
    from redis.exceptions import ConnectionError as RedisConnectionError

    original = Channel._connparams  # type: ignore[attr-defined]
    if getattr(original, "survives_a_lost_broker", False):
        return

    def connparams(self, asynchronous=False):
        if self.connection.client is None:  # collected: the broker connection is gone
            raise RedisConnectionError("the broker connection was closed")
        return original(self, asynchronous=asynchronous)

    connparams.survives_a_lost_broker = True  # type: ignore[attr-defined]
    connparams.original = original  # type: ignore[attr-defined]
    Channel._connparams = connparams  # type: ignore[attr-defined]
