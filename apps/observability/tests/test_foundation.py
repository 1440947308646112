"""The foundation works end to end in both modes: Django checks, Celery on a real
worker (or in process), Daphne over real sockets, PgBouncer pooling."""

import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import websocket
from django.conf import settings
from django.core.cache import cache
from django.db import connection

from tests.live import ROOT, NetworkBlockedError, http_get

POOL_SIZE = 10  # default_pool_size in deploy/pgbouncer/pgbouncer.ini


def manage(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=180,
    )


# --- Django checks ------------------------------------------------------------------


def test_deploy_checks_pass_in_production():
    # given production settings with every required value
    env = {
        "DJANGO_ENV": "production",
        "SECRET_KEY": secrets.token_urlsafe(64),
        "ALLOWED_HOSTS": "parley.example",
    }
    # when
    result = manage("check", "--deploy", "--fail-level", "WARNING", **env)
    # then
    assert result.returncode == 0, result.stdout + result.stderr


def test_models_and_migrations_agree():
    result = manage("makemigrations", "--check", "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr


# --- Network guard ---------------------------------------------------------------------


def test_network_beyond_this_machine_is_blocked():
    with pytest.raises(NetworkBlockedError, match="blocked in tests"):
        socket.create_connection(("192.0.2.1", 80), timeout=1)  # TEST-NET-1


# --- Celery -----------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_task_dispatched_from_django_runs_on_a_worker(services_mode, live_worker):
    from apps.observability.tasks import ping_task
    from apps.pipeline.dispatch import enqueue

    # when
    value = uuid.uuid4().hex
    enqueue(ping_task, value=value)

    # then a real worker took it from the Redis broker (services mode), or an
    # in-process worker thread ran it (no broker), and it left its mark
    if services_mode:
        assert live_worker is not None
        assert settings.CELERY_BROKER_URL.startswith("redis://")
    else:
        assert live_worker is None and settings.CELERY_BROKER_URL == ""
    for _ in range(300):
        if cache.get(f"ping:{value}"):
            break
        time.sleep(0.1)
    assert cache.get(f"ping:{value}") == f"pong:{value}"


# --- Daphne ---------------------------------------------------------------------------------


def test_daphne_serves_http(live_daphne):
    # when
    status, headers, body = http_get(f"{live_daphne.url}/healthz")
    # then
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(body)["status"] == "ok"

    # when
    status, headers, body = http_get(f"{live_daphne.url}/accounts/login/")
    # then
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert b"<form" in body


def test_daphne_reaches_the_test_database_and_cache(live_daphne):
    status, _, body = http_get(f"{live_daphne.url}/readyz")
    assert status == 200, body
    ready = json.loads(body)  # and, in services mode, its Redis servers (test_health.py)
    assert (ready["status"], ready["database"], ready["cache"]) == ("ok", "ok", "ok")


def test_daphne_echoes_over_a_websocket(live_daphne):
    # given
    ws = websocket.create_connection(
        f"{live_daphne.ws_url}/ws/echo/", origin=live_daphne.origin, timeout=10
    )
    try:
        # when
        ws.send("hello, parley")
        # then
        assert ws.recv() == "hello, parley"
    finally:
        ws.close()


def test_an_idle_websocket_stays_usable(live_daphne):
    """A consumer waits on the channel layer while its socket is quiet. With Redis,
    that wait is a blocking pop of about 5 s, which must not hit a client socket
    timeout (redis-py 8 defaults to 5 s) and kill the consumer."""
    # given a socket that has said nothing for longer than one blocking pop
    ws = websocket.create_connection(
        f"{live_daphne.ws_url}/ws/echo/", origin=live_daphne.origin, timeout=10
    )
    try:
        time.sleep(7)
        # when
        ws.send("still there?")
        # then
        assert ws.recv() == "still there?"
    finally:
        ws.close()


def test_daphne_refuses_a_websocket_from_a_foreign_origin(live_daphne):
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(
            f"{live_daphne.ws_url}/ws/echo/", origin="https://evil.example", timeout=10
        )
    assert refused.value.status_code == 403


# --- PgBouncer ----------------------------------------------------------------------------------


def test_pgbouncer_caps_postgres_backends(services_mode):
    if not services_mode:
        # embedded defaults: no PgBouncer, no Postgres
        assert connection.vendor == "sqlite"
        assert settings.DATABASES["default"]["ENGINE"] == "django_prometheus.db.backends.sqlite3"
        return

    import psycopg

    # Django's DATABASE_URL is PgBouncer (127.0.0.1:6432 under `make test`)
    pgbouncer = {
        "host": settings.DATABASES["default"]["HOST"],
        "port": int(settings.DATABASES["default"]["PORT"]),
        "user": "postgres",
    }
    assert pgbouncer["port"] != 5432
    with psycopg.connect(**pgbouncer, dbname="pgbouncer", autocommit=True) as admin:
        config = dict(row[:2] for row in admin.execute("SHOW CONFIG").fetchall())
    assert config["pool_mode"] == "transaction"
    assert int(config["default_pool_size"]) == POOL_SIZE

    # given 50 clients, each running a few slow queries at once
    clients, rounds = 50, 3
    start = threading.Barrier(clients + 1)
    done = threading.Event()
    max_backends = 0

    def client() -> int:
        with psycopg.connect(
            **pgbouncer,
            dbname="parley",
            autocommit=True,
            prepare_threshold=None,
            connect_timeout=30,
        ) as conn:
            start.wait(timeout=60)
            for _ in range(rounds):
                conn.execute("SELECT pg_sleep(0.2)")
        return rounds

    def sample() -> None:
        nonlocal max_backends
        with psycopg.connect(
            host="127.0.0.1", port=5432, dbname="postgres", user="postgres", autocommit=True
        ) as direct:
            while not done.is_set():
                (count,) = direct.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = 'parley'"
                    " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
                ).fetchone()
                max_backends = max(max_backends, count)
                time.sleep(0.02)

    # when
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(clients) as pool:
            futures = [pool.submit(client) for _ in range(clients)]
            start.wait(timeout=60)
            results = [future.result(timeout=120) for future in futures]
    finally:
        done.set()
        sampler.join(10)

    # then every client got its queries through, on at most POOL_SIZE backends
    assert results == [rounds] * clients
    assert 1 <= max_backends <= POOL_SIZE, max_backends
