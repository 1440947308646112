"""Each Celery worker process's metrics and probes, on its own small HTTP server.

Parley's workers run the threads pool (config.celery.worker_arguments): one
process runs every task of a worker, so each worker process exports its own
registry on WORKER_METRICS_PORT (0: off) — a per-worker exporter, scraped like
a pod, rather than prometheus_client's multiprocess mode (which exists for
prefork children that share one port through files on disk, and loses the
gauges' per-process meaning). A prefork worker (not one of our roles) would
start one exporter per child: only the first binds the port, the others log
that they could not.

- `/metrics`: the process's registry, for a bearer of METRICS_TOKEN (exposition.py);
- `/healthz`: liveness: the process and this server answer; the body reports the
  consumer's state (`starting` until Celery's worker_ready, `ok`, `draining` after
  worker_shutting_down) without failing on it, so a long model load is no restart;
- `/readyz`: readiness: the broker answers (cached READY_CACHE_S) and the
  engines of the queues it consumes are loaded; 503 otherwise, and while the
  worker drains. Sets parley_ready.

Also here: the task figures (Celery's task_prerun / task_postrun signals),
parley_worker_threads and parley_process_info, set by `worker_process_start`
(config/celery.py's task_process_start)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from celery.signals import task_postrun, task_prerun, worker_ready, worker_shutting_down
from django.conf import settings

from . import metrics
from .exposition import metrics_response

log = logging.getLogger(__name__)

READY_CACHE_S = 2.0
ROLES = {  # the queues of each role of config.celery.worker_arguments
    frozenset({"stt", "stt_partial"}): "stt",
    frozenset({"tts", "default"}): "tts",
    frozenset({"stt", "stt_partial", "tts", "default"}): "all",
}


class _State:
    lock = threading.Lock()
    started: dict[str, tuple[float, str]] = {}  # task id -> (perf_counter, queue)
    consuming = False  # the consumer started (worker_ready)
    draining = False  # warm shutdown began
    needs: set[str] = set()  # engines the role must have loaded (stt, tts)
    loaded: set[str] = set()
    broker_checked_at = -1e9
    broker_ok = False
    server: ThreadingHTTPServer | None = None


def worker_role(queues: set[str]) -> str:
    """PARLEY_ROLE when the worker's starter set it, else worker-<role of its queues>."""
    if settings.PARLEY_ROLE != "web":
        return settings.PARLEY_ROLE
    return f"worker-{ROLES.get(frozenset(queues), 'custom')}"


# --- Tasks ------------------------------------------------------------------------


def _task_started(task_id=None, task=None, **_kwargs) -> None:
    info = getattr(getattr(task, "request", None), "delivery_info", None) or {}
    queue = info.get("routing_key") or settings.CELERY_TASK_DEFAULT_QUEUE
    metrics.TASKS_IN_FLIGHT.labels(queue).inc()
    with _State.lock:
        _State.started[str(task_id)] = (time.perf_counter(), queue)


def _task_finished(task_id=None, state=None, **_kwargs) -> None:
    with _State.lock:
        started = _State.started.pop(str(task_id), None)
    if started is None:
        return
    at, queue = started
    metrics.TASKS_IN_FLIGHT.labels(queue).dec()
    outcome = "ok" if state == "SUCCESS" else "error"
    metrics.TASK_SECONDS.labels(queue, outcome).observe(time.perf_counter() - at)


def _consuming(**_kwargs) -> None:
    _State.consuming = True


def _draining(**_kwargs) -> None:
    _State.draining = True
    metrics.READY.set(0)


# --- Probes ---------------------------------------------------------------------------


def engine_loaded(prefix: str) -> None:
    """The role's `stt` or `tts` engine is loaded (config.celery.preload_engines)."""
    _State.loaded.add(prefix)


def _broker_ok() -> bool:
    now = time.monotonic()
    if now - _State.broker_checked_at < READY_CACHE_S:
        return _State.broker_ok
    url = settings.CELERY_BROKER_URL
    if not url:
        return True  # no broker: tasks run in this process (embedded)
    try:
        if url.startswith(("redis://", "rediss://", "unix://")):
            import redis

            client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
            try:
                ok = bool(client.ping())
            finally:
                client.close()
        else:
            from config.celery import app

            with app.connection_for_read() as connection:
                connection.ensure_connection(max_retries=1, timeout=1)
                ok = True
    except Exception as exc:  # reported by /readyz
        log.warning("readiness: broker unreachable: %s", exc)
        ok = False
    _State.broker_checked_at, _State.broker_ok = time.monotonic(), ok
    return ok


def liveness() -> tuple[bool, dict]:
    alive = threading.main_thread().is_alive()
    return alive, {"process": "ok" if alive else "gone", "consumer": _consumer_state()}


def _consumer_state() -> str:
    if _State.draining:
        return "draining"
    return "ok" if _State.consuming else "starting"


def readiness() -> tuple[bool, dict]:
    checks = {
        "broker": "ok" if _broker_ok() else "error: unreachable",
        "consumer": _consumer_state(),
    }
    for prefix in sorted(_State.needs):
        checks[f"{prefix}_engine"] = "ok" if prefix in _State.loaded else "loading"
    ok = all(value == "ok" for value in checks.values())
    metrics.READY.set(1 if ok else 0)
    return ok, checks


class _Handler(BaseHTTPRequestHandler):
    server_version = "parley-worker"

    def do_GET(self) -> None:  # noqa: N802 — http.server's name
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            status, headers, body = metrics_response(self.headers.get("Authorization"))
            return self._send(status, headers, body)
        if path in ("/healthz", "/readyz"):
            ok, checks = liveness() if path == "/healthz" else readiness()
            body = json.dumps({"status": "ok" if ok else "unavailable", **checks}).encode()
            return self._send(200 if ok else 503, {"Content-Type": "application/json"}, body)
        self._send(404, {"Content-Type": "text/plain"}, b"not found: /metrics, /healthz, /readyz\n")

    def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 — probes are not news
        pass


def exporter_start(port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer | None:  # noqa: S104
    """Serve /metrics, /healthz and /readyz on a daemon thread (never a task thread)."""
    if _State.server is not None:
        return _State.server
    try:
        server = ThreadingHTTPServer((host, port), _Handler)
    except OSError as exc:
        log.warning("worker metrics exporter not started on port %s: %s", port, exc)
        return None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-exporter", daemon=True).start()
    _State.server = server
    log.info("worker metrics exporter on %s:%s", host, server.server_address[1])
    return server


def worker_process_start(*, queues: set[str], threads: int) -> None:
    """A process that runs tasks: its role and concurrency, the task signals, the
    engines its readiness waits for, and its exporter (WORKER_METRICS_PORT)."""
    metrics.process_role(worker_role(queues))
    metrics.WORKER_THREADS.set(threads)
    metrics.READY.set(0)
    for signal, receiver in (
        (task_prerun, _task_started),
        (task_postrun, _task_finished),
        (worker_ready, _consuming),
        (worker_shutting_down, _draining),
    ):
        signal.connect(receiver, weak=False)
    if os.environ.get("WORKER_PRELOAD", "1") != "0":
        _State.needs = {p for p in ("stt", "tts") if any(q.startswith(p) for q in queues)}
    if settings.WORKER_METRICS_PORT:
        exporter_start(settings.WORKER_METRICS_PORT, settings.WORKER_METRICS_HOST)
