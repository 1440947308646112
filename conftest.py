"""Shared by every test module: offline environment, a network guard, the test
database's life cycle behind PgBouncer, and live Daphne/Celery fixtures.

Two modes (`make test` runs both):
- embedded defaults: SQLite file var/test.sqlite3, in-memory layers, in-process workers;
- services (`PARLEY_TEST_MODE=services`, REDIS_URL and DATABASE_URL set): Postgres
  through PgBouncer, Redis, and a real Celery worker from `live_worker`.
"""

import os

# Before any application code: models ship in packages, nothing is fetched.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost,::1"
# The suite signs in hundreds of times from 127.0.0.1, and the fuzz test opens its sockets
# as one user faster than their leases are let go, in this process and in the live servers
# it starts; test_throttle.py and test_leases.py set the limits they test.
for _name in ("AUTH_THROTTLE_LOGIN_PER_IP", "AUTH_THROTTLE_LOGIN_PER_USER",
              "AUTH_THROTTLE_SIGNUP_PER_IP", "SOCKETS_PER_USER_MAX"):  # fmt: skip
    os.environ.setdefault(_name, "1000000")
# This process serves sockets in tests too, but is no web process of a deployment: it does
# not sweep the shared Redis for dead ones (tests.live gives the live servers the default).
os.environ["LIVE_SWEEP_S"] = "0"

import urllib.parse  # noqa: E402

import pytest  # noqa: E402

from tests import live  # noqa: E402

live.LOG_DIR.mkdir(parents=True, exist_ok=True)  # also creates var/ for the SQLite files
live.install_network_guard()


def pytest_configure(config):
    if os.environ.get("PARLEY_TEST_MODE") == "services":
        missing = [name for name in ("DATABASE_URL", "REDIS_URL") if not os.environ.get(name)]
        if missing:
            raise pytest.UsageError(
                f"PARLEY_TEST_MODE=services needs {', '.join(missing)} (see `make test`)"
            )


@pytest.fixture(scope="session")
def services_mode() -> bool:
    """True when the run uses Postgres/Redis/Celery, False on embedded defaults."""
    return live.services_mode()


# --- Test database behind PgBouncer -------------------------------------------
# Django creates and drops the test database through PgBouncer (the `*` entry in
# deploy/pgbouncer/pgbouncer.ini routes its `postgres` maintenance connection).
# PgBouncer keeps idle server connections to test_parley in its pool after clients
# leave, and Postgres refuses DROP DATABASE while any backend is connected. So,
# before pytest-django creates the test database (it drops a leftover one first)
# and before it drops it at the end, we end those backends on the server directly
# (port 5432); PgBouncer notices and discards them.


def _end_test_database_backends() -> None:
    url = os.environ.get("DATABASE_URL")
    if not url:
        return
    import psycopg
    from django.conf import settings

    name = settings.DATABASES["default"].get("TEST", {}).get("NAME")
    name = name or "test_" + urllib.parse.urlsplit(url).path.lstrip("/")
    with psycopg.connect(
        host="127.0.0.1", port=5432, user="postgres", dbname="postgres", autocommit=True
    ) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            [name],
        )


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings):
    """Runs before the test database is created (see above)."""
    _end_test_database_backends()


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup):
    """pytest-django's, plus ending pooled backends before the test database is dropped."""
    yield
    _end_test_database_backends()


# --- Live servers ---------------------------------------------------------------


@pytest.fixture(scope="session")
def live_env(django_db_setup) -> dict:
    """The environment for live subprocesses: the tests' own, on the test database."""
    from django.db import connection

    return live.subprocess_env(connection.settings_dict["NAME"])


@pytest.fixture(scope="session")
def live_daphne(live_env):
    """A real Daphne (`daphne config.asgi:application`) on 127.0.0.1:<free port>,
    with the tests' settings on the test database; .url, .ws_url, .port, .origin.

    The server is another process: it sees only committed data. A test that writes
    data the server must read, or reads what the server wrote, uses
    `transactional_db` (not `db`, whose transaction is never committed; with SQLite
    it would also hold the write lock the server waits for).
    Log: var/test-logs/daphne-<port>.log (its tail is added to a failing test's report).
    """
    server = live.start_daphne(live_env)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def live_worker(live_env, services_mode):
    """In services mode a real Celery worker (`celery -A config worker -Q default,stt,tts
    -c 2 --pool prefork`) on the test database, answering pings; in embedded mode None,
    as tasks run on in-process worker threads (inside Daphne, or this process).

    Like `live_daphne`, the worker only sees committed data: use `transactional_db`.
    Log: var/test-logs/celery-<name>.log.
    """
    if not services_mode:
        yield None
        return
    worker = live.start_worker(live_env)
    yield worker
    worker.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure, append the live servers' log tails to the report."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for name, value in getattr(item, "funcargs", {}).items():
        # live_daphne, live_worker, and any other fixture that is (or holds, as
        # .worker) a live server process
        for server in (value, getattr(value, "worker", None)):
            if isinstance(server, live.LiveProcess):
                what = name if server is value else f"{name}.worker"
                report.sections.append((f"{what} log tail ({server.log_path})", server.log_tail()))


@pytest.fixture(autouse=True)
def generous_limits(settings):
    """The limits above, for this process too (its settings may have been read before
    this file set the environment); the tests of those limits set their own."""
    for name in ("AUTH_THROTTLE_LOGIN_PER_IP", "AUTH_THROTTLE_LOGIN_PER_USER",
                 "AUTH_THROTTLE_SIGNUP_PER_IP", "SOCKETS_PER_USER_MAX"):  # fmt: skip
        setattr(settings, name, 1_000_000)


@pytest.fixture(autouse=True)
def fresh_quota_ledger():
    """Each test starts with no quota counters: the test database reuses user ids (SQLite
    rolls its sequences back), and a run's fresh database those of an earlier run."""
    from apps.accounts.ledger import ledger

    ledger().clear_sync()


@pytest.fixture(autouse=True)
def fresh_channel_layer():
    """Each test its own channel layer object. A layer lives as long as its process
    and binds its receive state to the one loop that receives (channels_redis counts
    the receivers and refuses a second loop); every test here runs on a loop of its
    own, so a receive that a test's loop left pending would fail every later test's
    sockets with "Two event loops are trying to receive() on one channel layer"
    (18 consumer tests in one services run)."""
    from channels.layers import channel_layers

    yield
    channel_layers.backends.clear()
