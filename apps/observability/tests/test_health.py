"""The probes (apps/observability/health.py): /healthz answers whatever is down,
/readyz is cached, bounded, names what failed, recovers by itself, and fails
while the process drains. The fault test runs a Daphne on a Redis and a
PgBouncer of its own, and stops and starts them."""

import asyncio
import json
import tempfile
import threading
import time
from pathlib import Path

import pytest
from django.db import InterfaceError, OperationalError
from django_redis.exceptions import ConnectionInterrupted
from prometheus_client import REGISTRY
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from apps.observability.health import HealthProbes, Readiness
from tests import live

# --- Readiness, with checks of the test's own ---------------------------------------------


class Counting:
    """A check that counts its runs, fails on demand, or hangs until released."""

    def __init__(self) -> None:
        self.runs = 0
        self.fail = False
        self.hang = threading.Event()
        self.hang.set()

    def __call__(self) -> None:
        self.runs += 1
        self.hang.wait(10)
        if self.fail:
            raise ConnectionRefusedError("down")


def test_a_result_is_reused_for_the_cache_period_and_shared_by_concurrent_probes():
    check = Counting()
    readiness = Readiness({"database": check}, cache_s=0.3, timeout_s=1.0)

    async def probe() -> None:
        results = await asyncio.gather(*(readiness.report() for _ in range(20)))
        assert all(result == (True, {"status": "ok", "database": "ok"}) for result in results)
        assert check.runs == 1  # twenty probes at once: one run
        await readiness.report()
        assert check.runs == 1  # fresh: reused
        await asyncio.sleep(0.35)
        check.fail = True
        assert await readiness.report() == (
            False,
            {"status": "unavailable", "database": "error: ConnectionRefusedError"},
        )
        assert check.runs == 2

    asyncio.run(probe())
    assert REGISTRY.get_sample_value("parley_ready") == 0


def test_a_hung_check_is_bounded_and_not_started_twice():
    hung, fine = Counting(), Counting()
    hung.hang.clear()
    readiness = Readiness({"database": hung, "cache": fine}, cache_s=0.0, timeout_s=0.3)

    async def probe() -> None:
        started = time.monotonic()
        ready, body = await readiness.report()
        assert time.monotonic() - started < 1.0
        assert not ready
        assert body == {
            "status": "unavailable",
            "database": "error: no answer within 0.3 s",
            "cache": "ok",
        }
        await readiness.report()
        assert (hung.runs, fine.runs) == (1, 2)  # the hung one is still waited for
        hung.hang.set()
        await asyncio.sleep(0.05)
        assert (await readiness.report())[0]  # it answered: ready again, by itself
        assert REGISTRY.get_sample_value("parley_ready") == 1

    asyncio.run(probe())


def test_draining_fails_readiness_at_once_without_running_checks(tmp_path):
    check = Counting()
    drain = tmp_path / "draining"
    readiness = Readiness({"database": check}, cache_s=60, timeout_s=1.0, drain_file=str(drain))

    async def probe() -> None:
        assert (await readiness.report())[0]
        drain.touch()
        assert await readiness.report() == (False, {"status": "draining"})
        assert REGISTRY.get_sample_value("parley_ready") == 0
        drain.unlink()
        assert (await readiness.report())[0]

    asyncio.run(probe())
    assert check.runs == 1


# --- The ASGI probes ------------------------------------------------------------------------


def call(app, path: str, method: str = "GET") -> tuple[int, dict, bytes]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b""}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "path": path, "method": method, "headers": []}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], dict(sent[0]["headers"]), b"".join(m["body"] for m in sent[1:])


def test_probes_answer_in_front_of_the_application_and_refuse_other_methods():
    passed: list[str] = []

    async def django(scope, receive, send):
        passed.append(scope["path"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    def no_readiness() -> Readiness:
        raise AssertionError("/healthz must not build the readiness checks")

    app = HealthProbes(django, readiness=no_readiness)
    status, headers, body = call(app, "/healthz")
    assert (status, body) == (200, b'{"status": "ok"}')
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"cache-control"] == b"no-store"
    assert call(app, "/healthz", "HEAD")[2] == b""
    status, headers, body = call(app, "/readyz", "POST")
    assert (status, headers[b"allow"]) == (405, b"GET, HEAD")
    assert json.loads(body)["error"] == "method_not_allowed"
    assert call(app, "/accounts/login/")[0] == 204
    assert passed == ["/accounts/login/"]


# --- A live Daphne ---------------------------------------------------------------------------


def timed_get(url: str) -> tuple[float, int, dict]:
    started = time.monotonic()
    status, _, body = live.http_get(url, timeout_s=10)
    return time.monotonic() - started, status, json.loads(body)


def test_a_draining_daphne_is_not_ready_but_alive(transactional_db, live_env, tmp_path):
    drain = tmp_path / "draining"
    server = live.start_daphne({**live_env, "READINESS_DRAIN_FILE": str(drain)})
    try:
        assert timed_get(f"{server.url}/readyz")[1:] == (200, {"status": "ok", **(
            {"database": "ok", "cache": "ok", "channel_layer": "ok", "broker": "ok",
             "audio_store": "ok"} if live.services_mode() else {"database": "ok", "cache": "ok"}
        )})  # fmt: skip
        # when the preStop hook touches the drain file
        drain.touch()
        # then
        assert timed_get(f"{server.url}/readyz")[1:] == (503, {"status": "draining"})
        assert timed_get(f"{server.url}/healthz")[1:] == (200, {"status": "ok"})
    finally:
        server.stop()


@pytest.fixture
def own_servers(services_mode):
    """A Redis of this test's own and, in services mode, a PgBouncer of its own in
    front of this machine's Postgres (stopped by pid at the end)."""
    ports = {"redis": live.free_port(), "pgbouncer": live.free_port()}
    run_dir = Path(tempfile.mkdtemp(prefix="parley-test-pgbouncer-"))  # reachable by postgres
    starts = {"redis": lambda: live.start_redis(ports["redis"])}
    if services_mode:
        starts["pgbouncer"] = lambda: live.start_pgbouncer(ports["pgbouncer"], run_dir)
    servers = {name: start() for name, start in starts.items()}
    yield servers, starts, ports
    for process in servers.values():
        if process.poll() is None:
            live.stop_by_pid(process)


def test_healthz_lives_and_readyz_fails_then_recovers_while_postgres_and_redis_go(
    transactional_db, live_env, services_mode, own_servers
):
    servers, starts, ports = own_servers
    redis_url = f"redis://127.0.0.1:{ports['redis']}"
    env = {
        **live_env,
        "CACHE_URL": f"{redis_url}/1",
        "CHANNEL_LAYER_URL": f"{redis_url}/2",
        "AUDIO_STORE_URL": f"{redis_url}/4",
        "READINESS_CACHE_S": "1",
        "DEBUG": "false",  # what users get: Django's error handlers, not the debug page
    }
    expected_failures = {"cache", "channel_layer", "audio_store"}
    if services_mode:  # the database through our PgBouncer, the broker on our Redis
        database = live_env["DATABASE_URL"].rsplit("/", 1)[1]
        env["DATABASE_URL"] = f"postgres://postgres@127.0.0.1:{ports['pgbouncer']}/{database}"
        env["REDIS_URL"], env["CELERY_BROKER_URL"] = f"{redis_url}/0", f"{redis_url}/3"
        expected_failures |= {"database", "broker"}
    server = live.start_daphne(env)
    try:
        # given everything up: ready
        assert timed_get(f"{server.url}/readyz")[1] == 200

        # when Redis and (services mode) PgBouncer, so Postgres for this process, go away
        for process in servers.values():
            live.stop_by_pid(process)

        # then it stays alive, answering at once
        took, status, body = timed_get(f"{server.url}/healthz")
        assert (status, body) == (200, {"status": "ok"})
        assert took < 1.0
        if services_mode:  # and a page that reads the database is a quick 503, not a hang
            started = time.monotonic()
            status, headers, page = live.http_get(f"{server.url}/", timeout_s=10)
            assert time.monotonic() - started < 4.0  # the connect timeout (2 s) bounds it
            assert (status, headers.get("Retry-After")) == (503, "2"), (status, page[:300])
            assert b"briefly unavailable" in page
        # and is not ready once the cached result expires, each probe bounded (~1 s of checks)
        deadline = time.monotonic() + 5
        while True:
            took, status, body = timed_get(f"{server.url}/readyz")
            assert took < 2.5, f"a probe took {took:.1f} s"
            if status == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert status == 503
        assert body["status"] == "unavailable"
        failed = {name for name, value in body.items() if value.startswith("error")}
        assert failed == expected_failures, body

        # when they come back on the same ports
        for name, start in starts.items():
            servers[name] = start()

        # then it is ready again by itself
        deadline = time.monotonic() + 20
        while timed_get(f"{server.url}/readyz")[1] != 200:
            assert time.monotonic() < deadline, timed_get(f"{server.url}/readyz")
            time.sleep(0.3)
        assert timed_get(f"{server.url}/healthz")[1] == 200
        # and pages work again, at the latest after one more 503 on a connection the
        # restart broke (Django drops it at the end of that request)
        deadline = time.monotonic() + 10
        while live.http_get(f"{server.url}/", timeout_s=10)[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.3)
    finally:
        server.stop()


@pytest.mark.parametrize(
    "error, status",
    [
        (OperationalError("could not connect"), 503),
        (InterfaceError("connection already closed"), 503),
        (RedisConnectionError("Error 111 connecting"), 503),
        (RedisTimeoutError("Timeout reading"), 503),
        (ConnectionInterrupted(connection=None), 503),  # django_redis: the cache or sessions
        (ValueError("a bug"), 500),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v),
)
def test_an_unreachable_database_or_redis_is_a_503_and_a_bug_a_500(rf, error, status):
    from apps.observability.views import server_error

    try:
        raise error
    except Exception:
        response = server_error(rf.get("/conversations/"))

    assert response.status_code == status
    if status == 503:
        assert response["Retry-After"] == "2" and b"briefly unavailable" in response.content
