"""Find what blocks the event loop. With LOOP_GUARD_MS > 0 (the tests turn it
on in every live server), every callback the loop runs is watched:

- a blocking call made from it (a sleep, a blocking socket connect or DNS
  lookup, a subprocess, an SQLite connect, a synchronous Redis command or a
  Celery/kombu publish) is reported whatever it cost;
- a callback that keeps the loop's thread busy (CPU time, so a busy machine
  does not count) for longer than LOOP_GUARD_MS is reported with its time.
  Garbage collections that happen to run inside it are not counted: they are
  the collector's, not the callback's (`gc_pauses_log` reports long ones).

Each report is one log line starting `loop-guard:` at ERROR, with the
callback; `blocked_total()` counts them."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import threading
import time

log = logging.getLogger("parley.loopguard")

BLOCKING_EVENTS = frozenset(
    {
        "time.sleep",
        "socket.connect",
        "socket.getaddrinfo",
        "socket.gethostbyname",
        "socket.gethostbyaddr",
        "subprocess.Popen",
        "os.system",
        "sqlite3.connect",
        "parley.sync_redis",
        "parley.kombu_publish",
    }
)


class _Watch(threading.local):
    active = False
    calls: list[str]
    gc_ms = 0.0  # collections inside the callback: logged apart (gc-pause), not counted
    gc_started = 0.0


_watch = _Watch()
_blocked = 0
_installed = False


def blocked_total() -> int:
    return _blocked


def _audit(name: str, args: tuple) -> None:
    if not _watch.active or name not in BLOCKING_EVENTS:
        return
    if name == "socket.connect" and args[0].gettimeout() == 0.0:
        return  # a non-blocking connect, as asyncio makes them
    if name == "time.sleep" and not args[0]:
        return
    detail = args[0] if name in ("time.sleep", "socket.getaddrinfo") else ""
    _watch.calls.append(f"{name}({detail!r})"[:120])


def _gc_observe(phase: str, info: dict) -> None:
    if not _watch.active:
        return
    if phase == "start":
        _watch.gc_started = time.thread_time()
    else:
        _watch.gc_ms += (time.thread_time() - _watch.gc_started) * 1000


def _where(handle: asyncio.Handle) -> str:
    """The callback, or for a task's step the coroutine and where it now waits."""
    task = getattr(getattr(handle, "_callback", None), "__self__", None)
    if not isinstance(task, asyncio.Task):
        return repr(handle)
    coroutine = task.get_coro()
    frame = getattr(coroutine, "cr_frame", None)
    at = f" (now at {frame.f_code.co_filename}:{frame.f_lineno})" if frame else ""
    return f"task {getattr(coroutine, '__qualname__', coroutine)!s}{at}"


def _report(handle: asyncio.Handle, cpu_ms: float, calls: list[str]) -> None:
    global _blocked
    _blocked += 1
    what = ", ".join(calls) if calls else "CPU"
    log.error(
        "loop-guard: blocked the event loop for %.1f ms CPU (%s) in %s",
        cpu_ms,
        what,
        _where(handle),
    )


def _audited(owner, attribute: str, event_name: str) -> None:
    original = getattr(owner, attribute)

    def audited(*args, **kwargs):
        sys.audit(event_name, *args[:1])
        return original(*args, **kwargs)

    setattr(owner, attribute, audited)


def install(threshold_ms: float) -> None:
    """Watch every callback of every asyncio loop in this process."""
    global _installed
    if _installed:
        return
    _installed = True
    sys.addaudithook(_audit)
    gc.callbacks.append(_gc_observe)
    import kombu
    import redis.connection

    _audited(time, "sleep", "time.sleep")  # Python 3.12 audits it; 3.11 does not
    _audited(redis.connection.AbstractConnection, "send_packed_command", "parley.sync_redis")
    _audited(kombu.Producer, "publish", "parley.kombu_publish")
    run = asyncio.events.Handle._run

    def watched_run(handle: asyncio.Handle) -> None:
        if _watch.active:  # nested (should not happen): count it in the outer one
            return run(handle)
        _watch.active, _watch.calls, _watch.gc_ms = True, [], 0.0
        started = time.thread_time()
        try:
            run(handle)
        finally:
            _watch.active = False
            cpu_ms = (time.thread_time() - started) * 1000 - _watch.gc_ms
            if _watch.calls or cpu_ms > threshold_ms:
                _report(handle, cpu_ms, _watch.calls)

    asyncio.events.Handle._run = watched_run  # type: ignore[method-assign, assignment]


def gc_pauses_log(threshold_ms: float) -> None:
    """Log a garbage collection that stops the process for longer than `threshold_ms`:
    every socket of the process waits for it."""
    started: list[float] = [0.0]

    def observe(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        pause_ms = (time.perf_counter() - started[0]) * 1000
        if pause_ms > threshold_ms:
            log.warning(
                "gc-pause: generation %s took %.0f ms (%s collected, %s uncollectable)",
                info.get("generation"), pause_ms, info.get("collected"), info.get("uncollectable"),
            )  # fmt: skip

    gc.callbacks.append(observe)
