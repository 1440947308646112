"""A real Prometheus server for tests: Debian's `prometheus` package (make system-deps),
started on a free port with a temporary config that scrapes live test servers and
loads Parley's alert rules; stopped by its own pid, with its data directory.

    with prometheus_started(targets, rules=rules, tmp=tmp_path) as prometheus:
        prometheus.wait_for_targets()
        prometheus.query("sum(parley_sockets_open)")
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.live import LiveProcess, _spawn, answers, free_port, http_get, wait_until

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


class PrometheusQueryError(RuntimeError):
    """The HTTP API refused a query (a parse or evaluation error)."""


@dataclass
class ScrapeTarget:
    job: str  # the scrape job's name: parley-web, parley-worker-<role>
    address: str  # host:port
    pod: str  # the `pod` label Kubernetes' relabelling would give it
    token: str  # METRICS_TOKEN: sent as Authorization: Bearer


@dataclass
class LivePrometheus(LiveProcess):
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, path: str, **params: str) -> dict:
        """GET /api/v1/<path>: its `data`; PrometheusQueryError when it says error."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        status, _, body = http_get(f"{self.url}/api/v1/{path}{query}", timeout_s=15)
        answer = json.loads(body)
        if status != 200 or answer.get("status") != "success":
            raise PrometheusQueryError(
                f"{path} {params}: {answer.get('errorType')}: {answer.get('error')}"
            )
        return answer["data"]

    def query(self, expr: str) -> list[dict]:
        """An instant query at now: its result vector (or scalar, as a one-item list)."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def wait_for_targets(self, timeout_s: float = 60) -> None:
        """Until every target has been scraped and is up."""

        def all_up() -> bool:
            targets = self.api("targets")["activeTargets"]
            return bool(targets) and all(t["health"] == "up" for t in targets)

        try:
            wait_until(all_up, self, "Prometheus's targets", timeout_s)
        except RuntimeError:
            targets = self.api("targets")["activeTargets"] if self.process.poll() is None else []
            raise RuntimeError(
                "targets not up: "
                + ", ".join(f"{t['scrapeUrl']} {t['health']} {t['lastError']}" for t in targets)
            ) from None

    def wait_for_scrapes(self, seconds: float = 2.5) -> None:
        """Let a few scrapes (1 s apart) and rule evaluations happen."""
        time.sleep(seconds)


def prometheus_config(targets: list[ScrapeTarget], rules_file: str) -> dict:
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [rules_file],
        "scrape_configs": [
            {
                "job_name": target.job,
                "metrics_path": "/metrics",
                "authorization": {"type": "Bearer", "credentials": target.token},
                "static_configs": [{"targets": [target.address], "labels": {"pod": target.pod}}],
            }
            for target in targets
        ],
    }


@contextlib.contextmanager
def prometheus_started(
    targets: list[ScrapeTarget], *, rules: dict, tmp: Path, timeout_s: float = 60
) -> Iterator[LivePrometheus]:
    """Prometheus on 127.0.0.1:<free port> scraping `targets` every second with the
    rules file `rules` loaded; stopped (its pid only) and its data removed on exit."""
    if len({target.job for target in targets}) != len(targets):
        raise ValueError("each scrape target needs its own job name")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    config = tmp / "prometheus.yaml"
    config.write_text(yaml.safe_dump(prometheus_config(targets, "rules.yaml"), sort_keys=False))
    port = free_port()
    command = [
        PROMETHEUS,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--storage.tsdb.retention.time=1h",
        "--log.level=warn",
    ]
    proc = _spawn(command, {"PATH": "/usr/bin:/bin"}, f"prometheus-{port}.log")
    server = LivePrometheus(process=proc.process, log_path=proc.log_path, log_file=proc.log_file)
    server.port = port
    wait_until(lambda: answers(f"{server.url}/-/ready"), server, f"Prometheus on port {port}",
               timeout_s)  # fmt: skip
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(tmp / "data", ignore_errors=True)
