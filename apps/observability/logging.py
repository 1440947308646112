"""Log lines that follow one turn across processes (docs/observability.md, Logs).

Every record carries the ids of the work at hand, kept in context variables:
`request_id` (born at the HTTP request, RequestIdMiddleware, or at the socket
handshake, the consumer's connect), `conversation_id` and `user_id` where known,
plus this process's `pod` (POD_NAME or the host name) and `role` (PARLEY_ROLE).
With LOG_FORMAT=json each record is one JSON object on one line (Loki-ready);
the development default is one line of text with the request id.

The ids travel with the work: `task_headers()` puts them in every Celery
message (apps.pipeline.dispatch.enqueue), and `task_context()` restores them
in the worker for the task's duration (Celery's task_prerun/task_postrun
signals, connected by `celery_signals_connect()`, and the in-process executor
of embedded mode). Events a worker publishes reach the socket, whose handlers
log under the socket's own ids.

No transcripts, prompts, reply text or secrets at INFO: content goes to DEBUG."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
conversation_id_var: contextvars.ContextVar[str] = contextvars.ContextVar(
    "conversation_id", default=""
)
user_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("user_id", default="")

# Message headers of a Celery task (besides Celery's own).
HEADER_REQUEST_ID = "parley_request_id"
HEADER_CONVERSATION_ID = "parley_conversation_id"
HEADER_USER_ID = "parley_user_id"
HEADER_ENQUEUED_AT = "parley_enqueued_at"  # time.time() at enqueue (queue age)
_VARS = {
    HEADER_REQUEST_ID: request_id_var,
    HEADER_CONVERSATION_ID: conversation_id_var,
    HEADER_USER_ID: user_id_var,
}
REQUEST_ID_MAX = 64

log = logging.getLogger("parley.tasks")


def request_id_of(incoming: str = "") -> str:
    """The request id of a request or a socket handshake: the proxy's X-Request-ID
    (printable, no spaces, at most 64 characters), or a new one."""
    kept = "".join(c for c in incoming[:REQUEST_ID_MAX] if c.isprintable() and not c.isspace())
    return kept or uuid.uuid4().hex


def request_id_of_scope(scope: Mapping) -> str:
    """The same, from an ASGI scope's headers (the socket handshake)."""
    for name, value in scope.get("headers") or ():
        if name == b"x-request-id":
            return request_id_of(value.decode("latin-1"))
    return request_id_of()


def ids_bind(*, request_id: str = "", conversation_id: object = "", user_id: object = "") -> None:
    """Set the ids for the rest of this task's context (a socket's consumer task:
    every handler and every task it spawns logs with them). Empty values are left as they are."""
    for var, value in (
        (request_id_var, request_id),
        (conversation_id_var, conversation_id),
        (user_id_var, user_id),
    ):
        if value:
            var.set(str(value))


def task_headers() -> dict[str, object]:
    """The headers a task message carries: the ids of the work that enqueues it,
    and when it was enqueued."""
    headers: dict[str, object] = {name: var.get() for name, var in _VARS.items() if var.get()}
    headers[HEADER_ENQUEUED_AT] = time.time()
    return headers


@contextlib.contextmanager
def task_context(headers: Mapping[str, object] | None) -> Iterator[None]:
    """Run a task under the ids its message carried (`task_headers()`)."""
    tokens = [(var, var.set(str((headers or {}).get(name) or ""))) for name, var in _VARS.items()]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


# --- Tasks: restore the ids for each task, log each task's start and end ---------------


def task_started(name: str, queue: str, headers: Mapping[str, object]) -> float:
    """Log a task's start (how long it queued, from `parley_enqueued_at`); its start time."""
    enqueued_at = headers.get(HEADER_ENQUEUED_AT)
    waited = (
        f"{(time.time() - float(enqueued_at)) * 1000:.0f} ms"
        if isinstance(enqueued_at, int | float)
        else "unknown"
    )
    log.info("task started: %s from %s, queued %s", name, queue or "?", waited)
    return time.monotonic()


def task_done(name: str, outcome: str, started: float | None) -> None:
    took = f"{(time.monotonic() - started) * 1000:.0f} ms" if started is not None else "?"
    log.info("task done: %s, %s in %s", name, outcome, took)


@contextlib.contextmanager
def task_logged(name: str, queue: str, headers: Mapping[str, object] | None) -> Iterator[None]:
    """An in-process task (embedded mode) run as a worker runs it: under its ids, logged."""
    with task_context(headers):
        started = task_started(name, queue, headers or {})
        outcome = "failure"
        try:
            yield
            outcome = "success"
        finally:
            task_done(name, outcome, started)


# Celery: the signals run on the thread that runs the task, before and after it.
_running: dict[str, tuple[float, contextlib.ExitStack]] = {}


def _header(request: object, name: str) -> object:
    """A custom message header as Celery's task request holds it (top level, or in .headers)."""
    value = getattr(request, name, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(name)
    return value


def _task_prerun(task_id: str, task, **_kwargs) -> None:
    request = task.request
    headers = {name: _header(request, name) for name in (*_VARS, HEADER_ENQUEUED_AT)}
    stack = contextlib.ExitStack()
    stack.enter_context(task_context(headers))
    queue = (getattr(request, "delivery_info", None) or {}).get("routing_key", "")
    _running[task_id] = (task_started(task.name, queue, headers), stack)


def _task_postrun(task_id: str, task, state: str | None = None, **_kwargs) -> None:
    started, stack = _running.pop(task_id, (None, None))
    task_done(task.name, (state or "?").lower(), started)
    if stack is not None:
        stack.close()


def celery_signals_connect() -> None:
    from celery.signals import task_postrun, task_prerun

    task_prerun.connect(_task_prerun, weak=False, dispatch_uid="parley-log-context-start")
    task_postrun.connect(_task_postrun, weak=False, dispatch_uid="parley-log-context-end")


# --- Records and their formats -----------------------------------------------------------------


class ContextFilter(logging.Filter):
    """Adds the ids of the work at hand, and this process's pod and role, to every record."""

    def __init__(self, pod: str = "", role: str = "") -> None:
        super().__init__()
        self.pod = pod or os.environ.get("POD_NAME") or socket.gethostname()
        self.role = role or os.environ.get("PARLEY_ROLE", "")

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = getattr(record, "request_id", "") or request_id_var.get()
        record.conversation_id = getattr(record, "conversation_id", "") or conversation_id_var.get()
        record.user_id = getattr(record, "user_id", "") or user_id_var.get()
        record.pod, record.role = self.pod, self.role
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", ""),
            "conversation_id": getattr(record, "conversation_id", ""),
            "user_id": getattr(record, "user_id", ""),
            "pod": getattr(record, "pod", ""),
            "role": getattr(record, "role", ""),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """Development: one readable line, with the request id when there is one."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(ids)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", "")
        record.ids = f" [{request_id[:12]}]" if request_id else ""
        return super().format(record)


# --- Daphne's access log, as records --------------------------------------------------------


def daphne_access_log_to_records() -> None:
    """Daphne's access log (one line per HTTP request and socket event, written
    raw to stdout) becomes records of the `parley.access` logger, so that with
    LOG_FORMAT=json every line of a web process is JSON. Probes are at DEBUG.
    Daphne's command line builds its access logger after it imported the
    application (config/asgi.py calls this), from `daphne.cli.AccessLogGenerator`."""
    try:
        from daphne import access, cli
    except ImportError:  # not served by Daphne
        return

    access_log = logging.getLogger("parley.access")

    class AccessLogRecords(access.AccessLogGenerator):
        def write_entry(self, host, date, request, status=None, length=None, ident=None, user=None):
            probe = request.split(" ", 1)[-1] in ("/healthz", "/readyz")
            access_log.log(
                logging.DEBUG if probe else logging.INFO,
                '%s "%s" %s %s', host, request, status or "-", length or "-",
            )  # fmt: skip

    cli.AccessLogGenerator = AccessLogRecords


# --- Celery's own output, as JSON ------------------------------------------------------------


def celery_output_to_json(worker) -> None:
    """With LOG_FORMAT=json, a Celery worker's lines are JSON too: no banner, and the
    few lines Celery prints itself from its signal handlers ("worker: Warm shutdown")
    are written as JSON lines (still without the logging module's locks, as Celery's
    own `safe_say` does). Called at `celeryd_init`, before the worker prints anything."""
    from celery.apps import worker as celery_worker
    from django.conf import settings

    worker.quiet = True
    formatter, pod, role = JsonFormatter(), settings.POD_NAME, settings.PARLEY_ROLE

    def say(message: str, stream=None) -> None:
        record = logging.LogRecord("celery.apps.worker", logging.WARNING, "", 0, message, (), None)
        record.pod, record.role = pod, role
        try:
            print(formatter.format(record), file=stream or sys.__stderr__, flush=True)
        except OSError:
            pass

    setattr(celery_worker, "safe_say", say)  # noqa: B010 — not in the stubs
