"""A real Prometheus (Debian's package) scrapes the live test stack, the web process's
/metrics and, in services mode, the worker's exporter, both with the bearer token, and
loads the alert rules of deploy/observability/prometheus-rule.yaml. Every dashboard
panel's query and every alert's expression evaluates through its HTTP API, and after
voice turns through a real socket the panels an operator reads first show data."""

from __future__ import annotations

import math

import pytest
from django.conf import settings

from apps.observability.monitoring import dashboard_load, dashboard_queries, rules_load
from apps.personas.demo import demo_seed
from apps.pipeline.talk_client import TalkClient
from tests import live
from tests.audio import pcm_of
from tests.prometheus import ScrapeTarget, prometheus_started

from .conftest import socket_opener
from .helpers import assert_no_error, speak

pytestmark = pytest.mark.django_db(transaction=True)

CLIP = "deepspeech_LDC93S1.wav"  # one short sentence
TURNS = 2  # the first creates the labelled series, the second moves them: rates > 0
# Grafana's variables, as Grafana would fill them for a 1 s scrape interval.
GRAFANA_VARIABLES = {"$__rate_interval": "1m"}
# Panels that must show data after a voice turn, in either mode.
PANELS_WITH_DATA = {
    "HTTP requests/s",
    "HTTP 5xx share",
    "Socket handshakes/s",
    "Audio received",
    "Socket closes/s by code",
    "Per-stage latency p50 / p95",
    "Per-stage latency p95 by engine",
    "Replies/s by outcome",
    "Sockets per pod",
    "Event-loop lag p99 per pod",
    "Processes ready",
    "Queue depth",
    "Oldest task age",
    "Cache hit ratio",
    "Django database connections and queries",
    "LLM tokens/s",
    "Audio transcribed and synthesised",
    "STT real-time factor p95",
    "Cost per hour",
}
# ... and, in services mode, those of the worker processes and of PgBouncer.
SERVICES_PANELS_WITH_DATA = {
    "Worker utilisation",
    "Tasks in flight",
    "PgBouncer pools",
    "PgBouncer longest wait",
}


def grafana_filled(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a Grafana variable the test does not fill: {expr}"
    return expr


@pytest.fixture
def monitored_stack(transactional_db, live_env, live_worker, services_mode, request):
    """The web process and (services mode) the worker, as scrape targets. In services
    mode a Daphne of this test's own, which also reads PgBouncer's pools."""
    demo_seed()
    if not services_mode:
        yield request.getfixturevalue("live_daphne"), []
        return
    database = settings.DATABASES["default"]
    stats_url = f"postgres://postgres@{database['HOST']}:{database['PORT']}/pgbouncer"
    server = live.start_daphne({**live_env, "PGBOUNCER_STATS_URL": stats_url})
    worker_target = ScrapeTarget(
        job="parley-worker-all",
        address=f"127.0.0.1:{live_worker.metrics_port}",
        pod=f"worker-all-{live_worker.metrics_port}",
        token=live.METRICS_TOKEN,
    )
    try:
        yield server, [worker_target]
    finally:
        server.stop()


def test_prometheus_evaluates_every_panel_and_alert_and_the_panels_show_a_voice_turn(
    monitored_stack, services_mode, tmp_path
):
    server, worker_targets = monitored_stack
    web = ScrapeTarget(
        "parley-web", f"127.0.0.1:{server.port}", f"web-{server.port}", live.METRICS_TOKEN
    )
    rules = rules_load()
    alerts = {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    clients: list[TalkClient] = []

    with prometheus_started([web, *worker_targets], rules=rules, tmp=tmp_path) as prometheus:
        # given Prometheus scraping every target, with the rules loaded
        prometheus.wait_for_targets()
        groups = prometheus.api("rules")["groups"]
        loaded = {rule["name"] for group in groups for rule in group["rules"]}
        assert loaded == set(alerts)

        # when a user speaks two turns on a socket
        client = socket_opener(server, clients)("ada")
        try:
            for _ in range(TURNS):
                speak(client, pcm_of(CLIP))
                prometheus.wait_for_scrapes()
            assert_no_error(client)

            # every stage observed twice, as Prometheus sees it
            def stages_scraped() -> bool:
                counts = prometheus.query("sum by (stage) (parley_stage_seconds_count)")
                return len(counts) == 3 and all(float(c["value"][1]) >= TURNS for c in counts)

            live.wait_until(stages_scraped, prometheus, "three stages scraped twice", 60)
            # the open socket, on its pod
            (open_now,) = prometheus.query(f'sum by (pod) (parley_sockets_open{{pod="{web.pod}"}})')
            assert float(open_now["value"][1]) >= 1
        finally:
            client.close()
        prometheus.wait_for_scrapes()

        # then every panel's query evaluates without error
        results: dict[str, list[dict]] = {}
        for query in dashboard_queries(dashboard_load()):
            answer = prometheus.query(grafana_filled(query.expr))
            results.setdefault(query.panel, []).extend(answer)

        # and every alert's expression too, and each rule evaluates healthy
        for expr in alerts.values():
            prometheus.query(expr)  # raises on an error
        prometheus.wait_for_scrapes(1.5)
        for group in prometheus.api("rules")["groups"]:
            for rule in group["rules"]:
                assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))

    # and the panels an operator reads first show the turns
    with_data = {panel for panel, series in results.items() if series}
    print("panels with data:", sorted(with_data))
    print("panels without data:", sorted(set(results) - with_data))
    wanted = PANELS_WITH_DATA | (SERVICES_PANELS_WITH_DATA if services_mode else set())
    assert wanted <= with_data, sorted(wanted - with_data)
    if not services_mode:  # no worker processes: tasks run on Daphne's threads
        assert results["Worker utilisation"] == []

    # per-stage latency: finite p50 and p95 for each of the three stages
    latency = results["Per-stage latency p50 / p95"]
    stages = {s["metric"]["stage"] for s in latency if math.isfinite(float(s["value"][1]))}
    assert stages == {"speech_end_to_final", "final_to_first_token", "first_token_to_first_audio"}
    # sockets per pod: the web pod, by the label its scrape gave it
    pods = {s["metric"].get("pod") for s in results["Sockets per pod"]}
    assert web.pod in pods
    # event-loop lag: the web pod's (a worker has no event loop: its histogram stays empty)
    lag = {s["metric"]["pod"]: float(s["value"][1]) for s in results["Event-loop lag p99 per pod"]}
    measured = {pod: value for pod, value in lag.items() if math.isfinite(value)}
    assert list(measured) == [web.pod] and 0 <= measured[web.pod] < 1.0, lag
    (errors,) = results["HTTP 5xx share"]
    assert float(errors["value"][1]) == 0  # every scrape and page answered
    queues = {s["metric"]["queue"] for s in results["Queue depth"]}
    assert {"stt", "tts"} <= queues
    if services_mode:
        busy = results["Worker utilisation"]
        assert [s["metric"]["pod"] for s in busy] == [worker_targets[0].pod]
        assert 0 < float(busy[0]["value"][1]) <= 1.0
