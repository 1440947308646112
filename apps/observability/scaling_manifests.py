"""The autoscaling numbers of a rendered deployment: the web HPA, each KEDA
ScaledObject, every Deployment's requests and the Karpenter NodePool limits,
read from `kubectl kustomize` output (or a YAML file of the same shape). A
missing overlay, HPA or ScaledObject, or a malformed number, is a CapacityError
that names it."""

from __future__ import annotations

import math
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .capacity_inputs import CapacityError

SCALED_WORKLOADS = ("worker-stt", "worker-tts", "worker-default", "vllm")
# the jobs a pod runs at once: a worker's task threads (its env, else
# deploy/docker-entrypoint.sh's default), vLLM's batch slots (its argument, else vLLM's)
THREADS = {
    "worker-stt": ("STT_CONCURRENCY", 16),
    "worker-tts": ("TTS_CONCURRENCY", 2),
    "worker-default": ("DEFAULT_CONCURRENCY", 2),
    "vllm": ("--max-num-seqs", 256),
}
METRIC_TYPES = ("AverageValue", "Value")


@dataclass(frozen=True)
class Policy:
    kind: str  # Pods or Percent
    value: int
    period_s: int


@dataclass(frozen=True)
class Rules:
    window_s: int
    policies: tuple[Policy, ...]
    select: str  # Max, Min or Disabled


# Kubernetes' defaults (autoscaling/v2) when a behavior is not configured.
DEFAULT_UP = Rules(0, (Policy("Percent", 100, 15), Policy("Pods", 4, 15)), "Max")
DEFAULT_DOWN = Rules(300, (Policy("Percent", 100, 15),), "Max")


@dataclass(frozen=True)
class Hpa:
    name: str
    min_replicas: int
    max_replicas: int
    cpu_percent: float | None  # target averageUtilization
    sockets_per_pod: float | None  # target averageValue of parley_sockets_open
    up: Rules
    down: Rules


@dataclass(frozen=True)
class Trigger:
    query: str
    threshold: float
    activation: float
    metric_type: str = "AverageValue"  # KEDA's default; or Value


@dataclass(frozen=True)
class Scaled:
    name: str
    min_replicas: int
    max_replicas: int
    polling_s: int
    cooldown_s: int
    triggers: tuple[Trigger, ...]
    up: Rules
    down: Rules


@dataclass(frozen=True)
class Requests:
    cores: float
    memory_mb: float
    gpus: int


@dataclass(frozen=True)
class Cluster:
    hpa: Hpa
    scaled: dict[str, Scaled]
    requests: dict[str, Requests]  # every Deployment's pod
    replicas: dict[str, int]  # every Deployment's spec.replicas (1 when unset)
    cpu_limit: float | None  # NodePool general: limits.cpu
    gpu_limit: float | None  # NodePool gpu: limits nvidia.com/gpu
    source: str
    threads: dict[str, int] = field(default_factory=dict)  # a worker's Celery threads
    consolidate_s: dict[str, float] = field(default_factory=dict)  # NodePool consolidateAfter


def render(path: Path) -> list[dict[str, Any]]:
    """The documents of `path`: a kustomize directory (rendered with `kubectl
    kustomize`) or a YAML file."""
    if path.is_file():
        text = path.read_text()
    elif path.is_dir():
        try:
            done = subprocess.run(
                ["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60
            )
        except FileNotFoundError:
            raise CapacityError("kubectl is not installed: it renders the overlay") from None
        if done.returncode:
            raise CapacityError(f"`kubectl kustomize {path}` failed: {done.stderr.strip()[:500]}")
        text = done.stdout
    else:
        raise CapacityError(f"{path} is missing: render the overlay there or pass --manifests")
    try:
        docs = [d for d in yaml.safe_load_all(text) if d]
    except yaml.YAMLError as exc:
        raise CapacityError(f"{path} is not valid YAML ({exc})") from None
    if not all(isinstance(d, dict) for d in docs):
        raise CapacityError(f"{path}: every document must be a mapping")
    return docs


def quantity(value: Any, *, what: str) -> float:
    """A Kubernetes quantity (`500m`, `2`, `512Mi`, `2Gi`) as cores, MB or a count."""
    text = str(value).strip()
    units = {"m": 1e-3, "Ki": 1 / 1024, "Mi": 1.0, "Gi": 1024.0, "Ti": 1024.0**2}
    units |= {"k": 1e3 / 2**20, "M": 1e6 / 2**20, "G": 1e9 / 2**20}
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            text, scale = text[: -len(suffix)], factor
            break
    else:
        scale = 1.0
    try:
        number = float(text) * scale
    except ValueError:
        raise CapacityError(f"{what} is {value!r}, not a Kubernetes quantity") from None
    if not math.isfinite(number) or number < 0:
        raise CapacityError(f"{what} is {value!r}, not a positive quantity")
    return number


def _memory_mb(value: Any, *, what: str) -> float:
    text = str(value)
    if text.isdigit():  # bytes
        return int(text) / 2**20
    return quantity(value, what=what)


def _int(doc: dict[str, Any], key: str, default: int | None, *, what: str) -> int:
    value = doc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CapacityError(f"{what}: `{key}` is {value!r}, not a whole number")
    return value


def _rules(spec: dict[str, Any] | None, default: Rules, *, what: str) -> Rules:
    if not spec:
        return default
    policies = (
        tuple(
            Policy(str(p["type"]), int(p["value"]), int(p["periodSeconds"]))
            for p in spec.get("policies", [])
        )
        or default.policies
    )
    window = spec.get("stabilizationWindowSeconds", default.window_s)
    select = spec.get("selectPolicy", "Max")
    if select not in ("Max", "Min", "Disabled"):
        raise CapacityError(f"{what}: selectPolicy {select!r} is not Max, Min or Disabled")
    return Rules(int(window), policies, select)


def _hpa(doc: dict[str, Any]) -> Hpa:
    spec, what = doc.get("spec") or {}, "HorizontalPodAutoscaler web"
    cpu = sockets = None
    for metric in spec.get("metrics") or []:
        if metric.get("type") == "Resource" and metric["resource"]["name"] == "cpu":
            cpu = float(metric["resource"]["target"]["averageUtilization"])
        if metric.get("type") == "Pods" and metric["pods"]["metric"]["name"] == (
            "parley_sockets_open"
        ):
            sockets = quantity(metric["pods"]["target"]["averageValue"], what=what)
    if cpu is None and sockets is None:
        raise CapacityError(f"{what} has neither a cpu nor a parley_sockets_open metric")
    behavior = spec.get("behavior") or {}
    return Hpa(
        "web",
        _int(spec, "minReplicas", 1, what=what),
        _int(spec, "maxReplicas", None, what=what),
        cpu,
        sockets,
        _rules(behavior.get("scaleUp"), DEFAULT_UP, what=what),
        _rules(behavior.get("scaleDown"), DEFAULT_DOWN, what=what),
    )


def _scaled(doc: dict[str, Any]) -> Scaled:
    spec, name = doc.get("spec") or {}, doc["metadata"]["name"]
    what = f"ScaledObject {name}"
    triggers = []
    for trigger in spec.get("triggers") or []:
        meta = trigger.get("metadata") or {}
        if "query" not in meta or "threshold" not in meta:
            raise CapacityError(f"{what}: a trigger without metadata.query and threshold")
        metric_type = trigger.get("metricType", "AverageValue")
        if metric_type not in METRIC_TYPES:
            raise CapacityError(f"{what}: metricType {metric_type!r} is not AverageValue or Value")
        threshold = quantity(meta["threshold"], what=f"{what} threshold")
        if threshold <= 0:
            raise CapacityError(f"{what}: a trigger threshold must be above 0")
        triggers.append(
            Trigger(
                str(meta["query"]),
                threshold,
                quantity(meta.get("activationThreshold", 0), what=f"{what} activation"),
                metric_type,
            )
        )
    if not triggers:
        raise CapacityError(f"{what} has no trigger")
    behavior = ((spec.get("advanced") or {}).get("horizontalPodAutoscalerConfig") or {}).get(
        "behavior"
    ) or {}
    return Scaled(
        name,
        _int(spec, "minReplicaCount", 0, what=what),
        _int(spec, "maxReplicaCount", 100, what=what),
        _int(spec, "pollingInterval", 30, what=what),
        _int(spec, "cooldownPeriod", 300, what=what),
        tuple(triggers),
        _rules(behavior.get("scaleUp"), DEFAULT_UP, what=what),
        _rules(behavior.get("scaleDown"), DEFAULT_DOWN, what=what),
    )


def _requests(doc: dict[str, Any]) -> Requests:
    name = doc["metadata"]["name"]
    cores = memory = 0.0
    gpus = 0
    pod = doc["spec"]["template"]["spec"]
    for container in pod.get("containers") or []:
        req = (container.get("resources") or {}).get("requests") or {}
        what = f"Deployment {name} container {container.get('name')} requests"
        cores += quantity(req.get("cpu", 0), what=f"{what} cpu")
        memory += _memory_mb(req.get("memory", 0), what=f"{what} memory")
        limits = (container.get("resources") or {}).get("limits") or {}
        gpus += int(quantity(req.get("nvidia.com/gpu", limits.get("nvidia.com/gpu", 0)), what=what))
    return Requests(cores, memory, gpus)


def _threads(doc: dict[str, Any]) -> int:
    name = doc["metadata"]["name"]
    variable, default = THREADS[name]
    for container in doc["spec"]["template"]["spec"].get("containers") or []:
        values = [
            str(e.get("value", "")) for e in container.get("env") or [] if e.get("name") == variable
        ]
        values += [
            str(a).split("=", 1)[1]
            for a in container.get("args") or []
            if str(a).startswith(f"{variable}=")
        ]
        for value in values:
            if not value.isdigit() or int(value) < 1:
                raise CapacityError(f"Deployment {name}: {variable} is {value!r}, not a count")
            return int(value)
    return default


def duration_s(value: Any, *, what: str) -> float:
    """A Karpenter duration (`30s`, `1m`, `5m`, `1h`; `Never`: no removal) in seconds."""
    text = str(value).strip()
    if text == "Never":
        return math.inf
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        return float(text[:-1]) * units[text[-1]]
    except (KeyError, ValueError, IndexError):
        raise CapacityError(f"{what} is {value!r}, not a duration like 30s, 1m or 1h") from None


def cluster_read(*, manifests: Path, karpenter: Path) -> Cluster:
    """The numbers the simulation needs, from the rendered overlay and NodePools."""
    docs = render(manifests) + (render(karpenter) if karpenter != manifests else [])
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for doc in docs:
        name = (doc.get("metadata") or {}).get("name", "")
        by_kind.setdefault(str(doc.get("kind")), {})[name] = doc
    hpas = by_kind.get("HorizontalPodAutoscaler", {})
    if "web" not in hpas:
        raise CapacityError(f"{manifests} has no HorizontalPodAutoscaler `web`")
    objects = by_kind.get("ScaledObject", {})
    missing = [name for name in SCALED_WORKLOADS if name not in objects]
    if missing:
        raise CapacityError(f"{manifests} has no ScaledObject {', '.join(missing)}")
    deployments = by_kind.get("Deployment", {})
    for name in ("web", *SCALED_WORKLOADS):
        if name not in deployments:
            raise CapacityError(f"{manifests} has no Deployment `{name}`")
    pools = by_kind.get("NodePool", {})
    for pool in ("general", "gpu"):
        if pool not in pools:
            raise CapacityError(f"{karpenter} has no Karpenter NodePool `{pool}`")

    def limit(pool: str, key: str) -> float | None:
        value = ((pools[pool].get("spec") or {}).get("limits") or {}).get(key)
        return None if value is None else quantity(value, what=f"NodePool {pool} limits {key}")

    hpa = _hpa(hpas["web"])
    scaled = {name: _scaled(objects[name]) for name in SCALED_WORKLOADS}
    for what, low, high in [
        ("HorizontalPodAutoscaler web", hpa.min_replicas, hpa.max_replicas),
        *((f"ScaledObject {s.name}", s.min_replicas, s.max_replicas) for s in scaled.values()),
    ]:
        if low > high:
            raise CapacityError(f"{what}: its minimum {low} is above its maximum {high}")
    return Cluster(
        hpa=hpa,
        scaled=scaled,
        requests={name: _requests(doc) for name, doc in deployments.items()},
        replicas={
            name: _int(doc["spec"], "replicas", 1, what=f"Deployment {name}")
            for name, doc in deployments.items()
        },
        cpu_limit=limit("general", "cpu"),
        gpu_limit=limit("gpu", "nvidia.com/gpu"),
        source=f"{manifests} + {karpenter}",
        threads={name: _threads(deployments[name]) for name in THREADS},
        consolidate_s={
            pool: duration_s(
                ((pools[pool].get("spec") or {}).get("disruption") or {}).get(
                    "consolidateAfter", "0s"
                ),
                what=f"NodePool {pool} consolidateAfter",
            )
            for pool in ("general", "gpu")
        },
    )
