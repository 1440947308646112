"""deploy/observability/ as files: the PrometheusRule against the Operator's CRD
schema, its rules through promtool (check and unit tests), the dashboard's queries
against the metric catalogue, the ConfigMaps the kustomization makes, and the
Promtail config against the log lines the code writes. The same dashboard and rules
meet a real Prometheus in test_prometheus.py."""

import copy
import json
import logging
import re
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from apps.observability import monitoring
from apps.observability.logging import ContextFilter, JsonFormatter
from apps.observability.monitoring import (
    DEPLOY_DIR,
    MonitoringFileError,
    dashboard_load,
    dashboard_queries,
    rule_expressions,
    rules_from_prometheus_rule,
    rules_load,
)

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
ALERT_TESTS = DEPLOY_DIR / "tests" / "alerts-test.yaml"
CRD = DEPLOY_DIR.parent / "crds" / "monitoring.coreos.com_prometheusrules.yaml"
# Issue #9: one alert at least for each of these (the alert names say which).
ALERTS = {
    "ParleySpeechToFinalSlow",
    "ParleyQueueBacklogOld",
    "ParleyEventLoopLag",
    "ParleySocketErrors",
    "Parley5xxRate",
    "ParleyWorkerDown",
    "ParleyNoWorkers",
    "ParleyReadinessFlapping",
}


def prometheus_rule() -> dict:
    return yaml.safe_load((DEPLOY_DIR / "prometheus-rule.yaml").read_text())


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def rules_dir(tmp_path: Path, rules: dict | None = None) -> Path:
    """The rules file written by the module's CLI (or `rules`), next to a copy of the
    unit tests that read it as parley-rules.yaml."""
    if rules is None:
        assert monitoring.main(["rules", "-o", str(tmp_path / "parley-rules.yaml")]) == 0
    else:
        (tmp_path / "parley-rules.yaml").write_text(yaml.safe_dump(rules))
    shutil.copy(ALERT_TESTS, tmp_path / "alerts-test.yaml")
    return tmp_path


# --- The PrometheusRule -----------------------------------------------------------------


def strict(schema: dict) -> dict:
    """The CRD's schema as the API server applies it to typos: an object with declared
    properties accepts no other (the server would prune them, silently)."""
    schema = copy.deepcopy(schema)
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                node.setdefault("additionalProperties", False)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return schema


def crd_validator() -> jsonschema.Draft202012Validator:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft202012Validator(strict(version["schema"]["openAPIV3Schema"]))


def test_the_prometheus_rule_is_valid_for_the_operators_crd():
    errors = [e.message for e in crd_validator().iter_errors(prometheus_rule())]
    assert errors == []


@pytest.mark.parametrize(
    "path, value, error",
    [
        (("spec", "groups", 0, "rules", 0, "expression"), "up", "'expression' was unexpected"),
        (("spec", "groups", 0, "rules", 0, "for"), "ten minutes", "does not match"),
        (("spec", "groups", 0, "name"), None, "None is not of type 'string'"),
    ],
)
def test_the_crd_schema_refuses_a_broken_rule(path, value, error):
    # given the rule with a typo'd field, a bad duration, a group without a name
    document = prometheus_rule()
    node = document
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    # then
    messages = [e.message for e in crd_validator().iter_errors(document)]
    assert any(error in message for message in messages), messages


def test_every_alert_pages_with_severity_summary_description_and_runbook():
    rules = rules_load()
    alerts = [rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule]
    assert {rule["alert"] for rule in alerts} == ALERTS
    for rule in alerts:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        for field in ("summary", "description", "runbook"):
            assert len(rule["annotations"].get(field, "")) > 20, (rule["alert"], field)


def test_the_rules_file_is_the_prometheus_rules_spec(tmp_path):
    # when the CLI writes the rules file
    assert monitoring.main(["rules", "-o", str(tmp_path / "rules.yaml")]) == 0
    # then it is the PrometheusRule's spec, nothing added or lost
    assert yaml.safe_load((tmp_path / "rules.yaml").read_text()) == prometheus_rule()["spec"]


def test_the_rules_cli_writes_to_stdout(capsys):
    assert monitoring.main(["rules"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == prometheus_rule()["spec"]


@pytest.mark.parametrize(
    "document, error",
    [
        (["a", "list"], "a PrometheusRule is a mapping"),
        ({"apiVersion": "v1", "kind": "ConfigMap"}, "expected kind PrometheusRule"),
        ({"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule"}, "no spec.groups"),
        (
            {
                "apiVersion": "monitoring.coreos.com/v1",
                "kind": "PrometheusRule",
                "spec": {"groups": []},
            },
            "no spec.groups",
        ),
        (
            {
                "apiVersion": "monitoring.coreos.com/v1",
                "kind": "PrometheusRule",
                "spec": {"groups": [{"name": "empty", "rules": []}]},
            },
            r"spec.groups\[0\] needs a name and rules",
        ),
    ],
)
def test_a_file_that_is_not_a_prometheus_rule_is_refused(document, error):
    with pytest.raises(MonitoringFileError, match=error):
        rules_from_prometheus_rule(document)


def test_the_rules_cli_says_what_is_wrong(tmp_path, capsys):
    # given a file that is not YAML, and one that does not exist
    (tmp_path / "broken.yaml").write_text("spec: [unclosed\n")
    # then each exits 2 with the reason
    assert monitoring.main(["rules", str(tmp_path / "broken.yaml")]) == 2
    assert "not YAML" in capsys.readouterr().err
    assert monitoring.main(["rules", str(tmp_path / "missing.yaml")]) == 2
    assert "No such file" in capsys.readouterr().err


# --- promtool ---------------------------------------------------------------------------


def test_promtool_checks_the_rules(tmp_path):
    result = promtool("check", "rules", str(rules_dir(tmp_path) / "parley-rules.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rule_expressions(rules_load()))} rules found" in result.stdout


def test_promtool_refuses_a_broken_expression(tmp_path):
    rules = rules_load()
    rules["groups"][0]["rules"][0]["expr"] = "sum(rate(parley_stage_seconds_bucket[5m]"
    path = rules_dir(tmp_path, rules) / "parley-rules.yaml"
    result = promtool("check", "rules", str(path))
    assert result.returncode != 0
    assert "parse error" in result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_non_firing_unit_test():
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    for alert in ALERTS:
        mine = [case for case in cases if case["alertname"] == alert]
        assert any(case["exp_alerts"] for case in mine), f"{alert}: no firing case"
        assert any(not case["exp_alerts"] for case in mine), f"{alert}: no silent case"


def test_the_alert_unit_tests_pass(tmp_path):
    result = promtool("test", "rules", "alerts-test.yaml", cwd=rules_dir(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_alert_unit_tests_catch_a_wrong_threshold(tmp_path):
    # given a queue alert that fires at 1 s instead of 30 s
    rules = rules_load()
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == "ParleyQueueBacklogOld":
                rule["expr"] = rule["expr"].replace("> 30", "> 1")
    # then its unit test fails: the tts queue's 5 s fires too
    result = promtool("test", "rules", "alerts-test.yaml", cwd=rules_dir(tmp_path, rules))
    assert result.returncode != 0
    assert "ParleyQueueBacklogOld" in result.stdout + result.stderr


# --- The dashboard ------------------------------------------------------------------------


def exported_names() -> set[str]:
    """Every series name Parley's processes can expose: the registry of this process
    (metrics.py, django-prometheus, the context cache) and the scrape-time collectors."""
    import django_prometheus.cache.metrics  # noqa: F401 (the "context" cache's backend)
    import django_prometheus.db.metrics  # noqa: F401 (django_db_*: its database backends)
    from django_prometheus.middleware import Metrics
    from prometheus_client import REGISTRY

    import apps.conversations.context  # noqa: F401 (registers parley_context_cache_reads)
    from apps.observability import metrics

    Metrics.get_instance()  # django-prometheus's HTTP metrics
    names = set(REGISTRY._names_to_collectors)  # each name a scrape can show
    names |= {metrics.QUEUE_DEPTH._name, metrics.QUEUE_AGE._name, "up"}
    names |= {value for key, value in vars(metrics).items() if key.startswith("PGBOUNCER_")}
    return names


def test_every_panel_has_a_place_a_title_and_queries():
    dashboard = dashboard_load()
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    taken: set[tuple[int, int]] = set()
    for panel in panels:
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(box["x"], box["x"] + box["w"])
                 for y in range(box["y"], box["y"] + box["h"])}  # fmt: skip
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells
        if panel["type"] != "row":
            assert panel["description"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"


def test_every_query_names_a_metric_parley_exports():
    exported = exported_names()
    queries = dashboard_queries(dashboard_load())
    expressions = [q.expr for q in queries] + list(rule_expressions(rules_load()).values())
    for expr in expressions:
        assert metric_names(expr), expr
        for name in metric_names(expr):
            assert name in exported, f"{name!r} in {expr!r} is exported by no Parley process"


def test_the_catalogue_documents_every_parley_metric():
    # every parley_ series a process can expose has its row in docs/observability.md
    catalogue = (Path(__file__).resolve().parents[3] / "docs" / "observability.md").read_text()
    rows = set(re.findall(r"^\| `(parley_\w+)` \|", catalogue, re.MULTILINE))
    parley = {name for name in exported_names() if name.startswith("parley_")}
    # prometheus_client lists a counter under its name with and without _total, and a
    # histogram under its _bucket/_count/_sum/_created series: one row each
    documented = {name for name in parley if name in rows or f"{name}_total" in rows}
    series = {n for n in parley - documented if not re.search(r"_(bucket|count|sum|created)$", n)}
    assert series == set(), f"metrics missing from the catalogue: {sorted(series)}"
    assert rows <= parley | {f"{name}_total" for name in parley}, "a row for no metric"


def metric_names(expr: str) -> set[str]:
    """The metric names in a PromQL expression: what is left of its identifiers once
    strings, selectors, ranges, label lists and function names are gone."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\{[^}]*\}|\[[^\]]*\]', " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set(re.findall(r"\b([a-zA-Z_:][\w:]*)\b(?!\s*\()", expr))
    return names - {"and", "or", "unless", "bool", "offset", "inf", "nan"}


@pytest.mark.parametrize(
    "dashboard, error",
    [
        ({"title": "no panels"}, "a Grafana dashboard is a mapping with a list of panels"),
        ({"panels": [{"type": "timeseries", "title": "empty"}]}, "panel 'empty' has no targets"),
        (
            {"panels": [{"type": "row", "panels": [{"title": "x", "targets": [{"refId": "A"}]}]}]},
            "panel 'x' target A has no expr",
        ),
    ],
)
def test_a_panel_without_a_query_is_refused(dashboard, error):
    with pytest.raises(MonitoringFileError, match=error):
        dashboard_queries(dashboard)


def generated_config_maps() -> list[dict]:
    """The ConfigMaps `kustomize build` makes from configMapGenerator: its files and
    options (not the kustomization's common labels; kustomize is not a test dependency)."""
    kustomization = yaml.safe_load((DEPLOY_DIR / "kustomization.yaml").read_text())
    maps = []
    for generator in kustomization["configMapGenerator"]:
        data = {}
        for entry in generator["files"]:
            key, _, path = entry.rpartition("=")
            data[key or Path(path).name] = (DEPLOY_DIR / path).read_text()
        options = generator.get("options", {})
        metadata = {"name": generator["name"], "labels": options.get("labels", {})}
        if options.get("annotations"):
            metadata["annotations"] = options["annotations"]
        maps.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    return maps


def test_the_kustomization_provisions_the_dashboard_for_grafanas_sidecar():
    kustomization = yaml.safe_load((DEPLOY_DIR / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (DEPLOY_DIR / resource).is_file(), resource
    (dashboards,) = [
        m for m in generated_config_maps() if m["metadata"]["name"].endswith("dashboard")
    ]
    assert dashboards["metadata"]["labels"] == {"grafana_dashboard": "1"}
    (text,) = dashboards["data"].values()
    assert json.loads(text) == dashboard_load()  # the one JSON, not a copy
    # kubectl apply keeps the whole object in an annotation of at most 256 KiB
    assert len(text.encode()) < 200_000
    for config_map in generated_config_maps():
        kubernetes_validate.validate(config_map, "1.30.0", strict=True)


# --- Promtail ---------------------------------------------------------------------------


def promtail_stages() -> dict[str, dict]:
    config = yaml.safe_load((DEPLOY_DIR / "promtail.yaml").read_text())
    assert config["clients"][0]["url"].endswith("/loki/api/v1/push")
    (job,) = config["scrape_configs"]
    return {name: body for stage in job["pipeline_stages"] for name, body in stage.items()}


def a_log_line() -> dict:
    """A line as the code writes it (LOG_FORMAT=json), with every id set."""
    record = logging.LogRecord("apps.realtime", logging.INFO, __file__, 1, "socket open", (), None)
    record.request_id, record.conversation_id, record.user_id = "r-1", "c-1", "42"
    ContextFilter(pod="web-7d9f-abcde", role="web").filter(record)
    return json.loads(JsonFormatter().format(record))


def test_promtail_parses_the_json_line_and_labels_only_level_role_pod():
    stages = promtail_stages()
    line = a_log_line()
    # every field Promtail extracts is one the code writes
    expressions = stages["json"]["expressions"]
    assert set(expressions.values()) == set(line) - {"exc"}
    # labels are few and bounded: never a request, conversation or user id
    assert set(stages["labels"]) == {"level", "role", "pod"}
    # the line's own time: ISO 8601 with an offset, as Go's RFC3339Nano reads it
    assert stages["timestamp"] == {
        "source": "ts",
        "format": "RFC3339Nano",
        "action_on_failure": "skip",
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", line["ts"])
    assert datetime.fromisoformat(line["ts"]).utcoffset() is not None
