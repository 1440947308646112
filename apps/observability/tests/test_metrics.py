"""What /metrics shows and to whom, and the figures read at scrape time: the
queues (a real Redis with a real enqueued message, or the in-process
executors), PgBouncer's pools (the PgBouncer of scripts/services.sh)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from django.conf import settings
from prometheus_client.parser import text_string_to_metric_families

from apps.observability.collectors import (
    PgBouncerCollector,
    QueueCollector,
    pgbouncer_families,
    priority_keys,
)
from apps.observability.exposition import metrics_refusal
from apps.pipeline.dispatch import enqueue
from tests.live import free_port


def values(collector) -> dict[tuple, float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in collector.collect()
        for sample in family.samples
    }


# --- /metrics: bearer token ------------------------------------------------------------


def test_metrics_refuse_everyone_when_no_token_is_configured(client, settings):
    settings.METRICS_TOKEN = ""
    response = client.get("/metrics", HTTP_AUTHORIZATION="Bearer anything")
    assert response.status_code == 403
    assert response.content == b"metrics disabled: set METRICS_TOKEN\n"


def test_metrics_need_the_bearer_token(client, settings):
    settings.METRICS_TOKEN = "s3cret-token"
    # anonymous, a wrong token, another scheme: 401
    for header in (
        {},
        {"HTTP_AUTHORIZATION": "Bearer wrong"},
        {"HTTP_AUTHORIZATION": "s3cret-token"},
    ):
        response = client.get("/metrics", **header)
        assert response.status_code == 401, header
        assert response["WWW-Authenticate"] == 'Bearer realm="metrics"'
        assert b"parley_" not in response.content
    # the bearer reads the exposition: Parley's figures and django-prometheus's
    response = client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret-token")
    assert response.status_code == 200
    names = {f.name for f in text_string_to_metric_families(response.content.decode())}
    assert {
        "parley_stage_seconds",
        "parley_sockets_open",
        "django_http_requests_before_middlewares",
    } <= names


def test_the_token_check_is_exact():
    assert metrics_refusal("Bearer abc", "abc") is None
    assert metrics_refusal("Bearer abcd", "abc") == (401, metrics_refusal(None, "abc")[1])
    assert metrics_refusal("bearer abc", "abc") is not None
    assert metrics_refusal("Bearer abc", "")[0] == 403


# --- Queues --------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_queue_figures_show_a_real_waiting_task_and_its_age(services_mode):
    from apps.observability.tasks import ping_task

    queue = f"test-queue-{uuid.uuid4().hex[:8]}"  # no worker reads it
    collector = QueueCollector(settings.CELERY_BROKER_URL, queues=[queue])
    release = threading.Event()
    if services_mode:
        import redis

        broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
        blockers = []
    else:  # the in-process executor: keep its threads busy so the task waits
        from apps.pipeline import dispatch

        class Blocker:
            name = "test.blocker"

            def run(self) -> None:
                release.wait(30)

        blockers = [Blocker() for _ in range(settings.IN_PROCESS_WORKERS)]
        for blocker in blockers:
            dispatch._submit(queue, blocker, {})
    try:
        # given an empty queue
        assert values(collector)[("parley_queue_depth", (("queue", queue),))] == 0
        # when a task is enqueued (through the product's path), and waits
        enqueue(ping_task, queue=queue, value="x")
        if services_mode:
            deadline = time.monotonic() + 10
            while not broker.llen(queue) and time.monotonic() < deadline:
                time.sleep(0.05)
        time.sleep(1.1)
        collector.cache.at = -1e9  # past the scrape cache
        figures = values(collector)
        # then
        assert figures[("parley_queue_depth", (("queue", queue),))] == 1
        age = figures[("parley_queue_oldest_age_seconds", (("queue", queue),))]
        assert 1.0 <= age < 15, age
        # and a scrape within a second reads the cache
        enqueue(ping_task, queue=queue, value="y")
        time.sleep(0.2)
        assert values(collector)[("parley_queue_depth", (("queue", queue),))] == 1
    finally:
        release.set()
        if services_mode:
            broker.delete(*priority_keys(queue))


def test_queue_figures_are_absent_when_the_broker_is_down():
    collector = QueueCollector(f"redis://127.0.0.1:{free_port()}/0", queues=["stt"])
    assert list(collector.collect()) == []


def test_priority_queues_are_read_from_every_list_kombu_keeps():
    assert priority_keys("stt") == ["stt", "stt\x06\x163", "stt\x06\x166", "stt\x06\x169"]


# --- PgBouncer --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_pgbouncer_pool_figures(services_mode):
    if not services_mode:  # no PgBouncer: the families a SHOW POOLS would give
        families = pgbouncer_families(
            [
                {"database": "parley", "user": "a", "cl_active": 3, "cl_waiting": 1,
                 "sv_active": 2, "sv_idle": 1, "maxwait": 1, "maxwait_us": 500_000},
                {"database": "parley", "user": "b", "cl_active": 1, "cl_waiting": 0,
                 "sv_active": 1, "sv_idle": 0, "maxwait": 0, "maxwait_us": 0},
                {"database": "pgbouncer", "user": "pgbouncer", "cl_active": 1},
            ]
        )  # fmt: skip
        figures = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families
                   for s in f.samples}  # fmt: skip
        active = ("parley_pgbouncer_clients", (("database", "parley"), ("state", "active")))
        assert figures[active] == 4
        assert figures[("parley_pgbouncer_max_wait_seconds", (("database", "parley"),))] == 1.5
        assert not [k for k in figures if ("database", "pgbouncer") in k[1]]
        return
    host = settings.DATABASES["default"]["HOST"]
    port = settings.DATABASES["default"]["PORT"]
    database = settings.DATABASES["default"]["NAME"]
    # given a client of the test database, in PgBouncer's pools
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    # when
    figures = values(PgBouncerCollector(f"postgres://postgres@{host}:{port}/pgbouncer"))
    # then
    assert figures[("parley_pgbouncer_up", ())] == 1
    servers = sum(
        v for (n, ls), v in figures.items()
        if n == "parley_pgbouncer_servers" and ("database", database) in ls
    )  # fmt: skip
    assert servers >= 1, figures
    assert ("parley_pgbouncer_max_wait_seconds", (("database", database),)) in figures
    assert ("parley_pgbouncer_clients", (("database", database), ("state", "waiting"))) in figures


def test_pgbouncer_down_is_reported_as_up_0():
    figures = values(PgBouncerCollector(f"postgres://postgres@127.0.0.1:{free_port()}/pgbouncer"))
    assert figures == {("parley_pgbouncer_up", ()): 0}


# --- Provider retries ------------------------------------------------------------------------


def test_an_openai_engines_retries_are_counted(settings):
    from apps.observability.metrics import PROVIDER_RETRIES
    from apps.pipeline.providers.base import ProviderError
    from apps.pipeline.providers.openai_stt import OpenAISTT
    from apps.pipeline.tests.fake_openai import FakeOpenAI

    retries = PROVIDER_RETRIES.labels("stt", "openai")
    with FakeOpenAI() as server:
        settings.OPENAI_BASE_URL = server.base_url
        settings.LLM_API_KEY = "test-key"
        settings.LLM_MAX_RETRIES = 2
        settings.LLM_TIMEOUT_S = 2.0
        engine = OpenAISTT()
        # given a service that answers
        before = retries._value.get()
        assert engine.transcribe(bytes(3200)).text
        assert retries._value.get() == before  # no retry
        # when it fails (HTTP 500) and the client tries twice more
        server.fault = "server_error"
        with pytest.raises(ProviderError):
            engine.transcribe(bytes(3200))
    # then
    assert len(server.requests) == 1 + 3
    assert retries._value.get() == before + 2
