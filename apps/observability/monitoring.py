"""The files of deploy/observability/ read as data: the alert rules of the
PrometheusRule as a plain Prometheus rules file, and the queries of the Grafana
dashboard. The PrometheusRule is the one source of the rules; plain Prometheus and
promtool get its `spec` through this module:

    python -m apps.observability.monitoring rules deploy/observability/prometheus-rule.yaml \\
        -o var/parley-rules.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEPLOY_DIR = Path(__file__).resolve().parent.parent.parent / "deploy" / "observability"
PROMETHEUS_RULE = DEPLOY_DIR / "prometheus-rule.yaml"
DASHBOARD = DEPLOY_DIR / "grafana-dashboard.json"


class MonitoringFileError(ValueError):
    """A deploy/observability file that is not what it should be."""


@dataclass(frozen=True)
class PanelQuery:
    panel: str  # the panel's title
    ref: str  # the target's refId
    expr: str


def rules_from_prometheus_rule(document: object) -> dict[str, Any]:
    """A PrometheusRule (monitoring.coreos.com/v1) as a Prometheus rules file: its spec."""
    if not isinstance(document, dict):
        raise MonitoringFileError("a PrometheusRule is a mapping, not " + type(document).__name__)
    kind, api = document.get("kind"), document.get("apiVersion")
    if kind != "PrometheusRule" or api != "monitoring.coreos.com/v1":
        raise MonitoringFileError(
            "expected kind PrometheusRule, apiVersion monitoring.coreos.com/v1;"
            f" got {kind!r}, {api!r}"
        )
    spec = document.get("spec")
    groups = spec.get("groups") if isinstance(spec, dict) else None
    if not isinstance(groups, list) or not groups:
        raise MonitoringFileError("the PrometheusRule has no spec.groups")
    for index, group in enumerate(groups):
        if not isinstance(group, dict) or not group.get("name") or not group.get("rules"):
            raise MonitoringFileError(f"spec.groups[{index}] needs a name and rules")
    return {"groups": groups}


def rules_load(path: Path = PROMETHEUS_RULE) -> dict[str, Any]:
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise MonitoringFileError(f"{path}: not YAML: {error}") from error
    return rules_from_prometheus_rule(document)


def rule_expressions(rules: dict[str, Any]) -> dict[str, str]:
    """Each rule's name (alert or record) and its expression."""
    return {
        rule.get("alert") or rule["record"]: rule["expr"]
        for group in rules["groups"]
        for rule in group["rules"]
    }


def dashboard_queries(dashboard: object) -> list[PanelQuery]:
    """Every query of every panel (rows' nested panels included)."""
    if not isinstance(dashboard, dict) or not isinstance(dashboard.get("panels"), list):
        raise MonitoringFileError("a Grafana dashboard is a mapping with a list of panels")
    queries = []
    panels = list(dashboard["panels"])
    while panels:
        panel = panels.pop(0)
        panels.extend(panel.get("panels") or [])
        if panel.get("type") == "row":
            continue
        title = panel.get("title") or f"panel {panel.get('id')}"
        targets = panel.get("targets") or []
        if not targets:
            raise MonitoringFileError(f"panel {title!r} has no targets")
        for target in targets:
            if not target.get("expr"):
                raise MonitoringFileError(
                    f"panel {title!r} target {target.get('refId')} has no expr"
                )
            queries.append(PanelQuery(title, target.get("refId", ""), target["expr"]))
    return queries


def dashboard_load(path: Path = DASHBOARD) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise MonitoringFileError(f"{path}: not JSON: {error}") from error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m apps.observability.monitoring",
        description="Write the PrometheusRule's spec as a plain Prometheus rules file.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    rules = commands.add_parser("rules", help="a PrometheusRule's spec as a rules file")
    rules.add_argument("path", type=Path, nargs="?", default=PROMETHEUS_RULE)
    rules.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    args = parser.parse_args(argv)
    try:
        text = yaml.safe_dump(rules_load(args.path), sort_keys=False, width=100)
    except (OSError, MonitoringFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
