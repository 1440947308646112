"""The deploy manifests, rendered and checked offline (`make test-deploy`, part of `make test`).

Each overlay of deploy/k8s and deploy/karpenter is rendered with `kubectl kustomize`; core
kinds are validated with kubernetes-validate (strict, Kubernetes TARGET_VERSION), custom
resources against the CRD schemas in deploy/crds; then our own policy: resources, probes and
a locked-down security context on every container, GPU pods on the GPU pool, every target
and selector pointing at something that exists, pinned images, the deploy contract's names
and numbers, and every metric an autoscaler, adapter rule or alert names being one a live
Daphne or worker exporter serves. Each policy check is also shown failing on a broken copy.
Services mode only (the live half needs a worker on the broker), like test_image.py.
"""

import copy
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from apps.observability.monitoring import rule_expressions, rules_load
from apps.observability.tests.test_monitoring import metric_names, strict
from tests import live

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CRDS = DEPLOY / "crds"
TARGETS = {
    "staging": DEPLOY / "k8s" / "overlays" / "staging",
    "production": DEPLOY / "k8s" / "overlays" / "production",
    "karpenter": DEPLOY / "karpenter",
}
# EKS's newest widely available minor when this was written; kubernetes-validate bundles
# the schemas (offline), 1.25 to 1.37 in the pinned version.
TARGET_VERSION = "1.31.0"
WORKLOADS = ("Deployment", "Job", "StatefulSet", "DaemonSet")
GPU = "nvidia.com/gpu"
GPU_POOL = {"karpenter.sh/nodepool": "gpu"}
WORKERS = ("worker-stt", "worker-tts", "worker-default")
# Not Parley's: Prometheus's own series, and vLLM's (its server exports them, `vllm:` prefix).
FOREIGN_METRIC = re.compile(r"^(up|vllm:.+)$")


class Manifests(list):
    """The rendered documents of one target, with lookups by kind and name."""

    def of(self, kind: str) -> list[dict]:
        return [d for d in self if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict:
        matches = [d for d in self.of(kind) if d["metadata"]["name"] == name]
        assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
        return matches[0]


def kubectl() -> str:
    path = shutil.which("kubectl")
    assert path, "kubectl is missing: `make system-deps` installs it (deploy/k8s/README.md)"
    return path


def render(path: Path) -> Manifests:
    result = subprocess.run(
        [kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"kubectl kustomize {path}: {result.stderr}"
    return Manifests(d for d in yaml.safe_load_all(result.stdout) if d)


@pytest.fixture(scope="module")
def rendered() -> dict[str, Manifests]:
    return {name: render(path) for name, path in TARGETS.items()}


@pytest.fixture(scope="module")
def apps(rendered) -> dict[str, Manifests]:
    return {name: rendered[name] for name in ("staging", "production")}


# --- Schemas ------------------------------------------------------------------------------


def crd_validators() -> dict[tuple[str, str], jsonschema.Draft202012Validator]:
    """(apiVersion, kind) -> a validator of the CRD's openAPIV3Schema, strict as the API
    server is on unknown fields (test_monitoring.strict)."""
    validators = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = strict(version["schema"]["openAPIV3Schema"])
            validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft202012Validator(
                schema
            )
    return validators


CRD_VALIDATORS = crd_validators()


def schema_errors(document: dict) -> list[str]:
    """What the API server's schema would refuse in `document` (core kinds through
    kubernetes-validate, custom resources through their CRD)."""
    key = (document["apiVersion"], document["kind"])
    name = f"{document['kind']}/{document['metadata']['name']}"
    if key in CRD_VALIDATORS:
        return [
            f"{name}: {'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in CRD_VALIDATORS[key].iter_errors(document)
        ]
    try:
        kubernetes_validate.validate(document, TARGET_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{name}: {'/'.join(map(str, error.path))}: {error.message}"]
    return []


@pytest.mark.parametrize("target", TARGETS)
def test_every_document_is_valid_for_its_schema(rendered, target):
    errors = [error for document in rendered[target] for error in schema_errors(document)]
    assert errors == []


def test_custom_resources_have_their_crd_here(rendered):
    # every kind that is not Kubernetes' own has its schema in deploy/crds
    custom = {
        (d["apiVersion"], d["kind"])
        for docs in rendered.values()
        for d in docs
        if "." in d["apiVersion"].split("/")[0]
        and not d["apiVersion"].split("/")[0].endswith(".k8s.io")
    }
    assert custom, "no custom resources rendered"
    assert custom <= set(CRD_VALIDATORS), custom - set(CRD_VALIDATORS)


@pytest.mark.parametrize(
    "kind, name, path, value, error",
    [
        ("Deployment", "web", ("spec", "replicas"), "three", "'three' is not of type 'integer'"),
        ("Deployment", "web", ("spec", "template", "spec", "nodeSelectr"), {}, "nodeSelectr"),
        ("ScaledObject", "worker-stt", ("spec", "minReplicas"), 0, "'minReplicas' was unexpected"),
        ("ServiceMonitor", "parley", ("spec", "endpoints", 0, "port"), 8000, "not of type"),
    ],
)
def test_the_schemas_refuse_a_broken_document(rendered, kind, name, path, value, error):
    document = copy.deepcopy(rendered["production"].get(kind, name))
    node = document
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    errors = schema_errors(document)
    assert any(error in message for message in errors), errors


def test_a_karpenter_pool_with_a_typo_is_refused(rendered):
    pool = copy.deepcopy(rendered["karpenter"].get("NodePool", "gpu"))
    pool["spec"]["disruption"]["consolidationPolicy"] = "WhenIdle"
    assert any("WhenIdle" in e for e in schema_errors(pool))


# --- Policy: containers ---------------------------------------------------------------------


def pod_specs(documents: list[dict]) -> Iterator[tuple[str, dict]]:
    for d in documents:
        if d["kind"] in WORKLOADS:
            yield f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]


def container_problems(documents: list[dict]) -> list[str]:
    """Every container: requests and limits of cpu and memory, liveness and readiness
    probes (not a Job's), non-root, a read-only root, no privilege escalation, no
    capabilities, the runtime's seccomp profile."""
    problems = []
    for name, spec in pod_specs(documents):
        kind = name.split("/")[0]
        pod = spec.get("securityContext", {})
        if pod.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{name}: no seccompProfile RuntimeDefault")
        for container in spec.get("initContainers", []) + spec["containers"]:
            where = f"{name} container {container['name']}"
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in resources.get(bound, {}):
                        problems.append(f"{where}: no {bound}.{resource}")
            if kind != "Job":
                for probe in ("livenessProbe", "readinessProbe"):
                    if probe not in container:
                        problems.append(f"{where}: no {probe}")
            security = {**pod, **container.get("securityContext", {})}
            if security.get("runAsNonRoot") is not True:
                problems.append(f"{where}: not runAsNonRoot")
            if not isinstance(security.get("runAsUser"), int) or security["runAsUser"] == 0:
                problems.append(f"{where}: no non-zero runAsUser")
            if security.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: root filesystem not read-only")
            if security.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation not false")
            if security.get("capabilities", {}).get("drop") != ["ALL"]:
                problems.append(f"{where}: capabilities not dropped")
            if "/tmp" not in {m["mountPath"] for m in container.get("volumeMounts", [])}:
                problems.append(f"{where}: no writable /tmp on its read-only root")
    return problems


@pytest.mark.parametrize("target", ["staging", "production"])
def test_every_container_is_bounded_probed_and_locked_down(apps, target):
    assert container_problems(apps[target]) == []


def test_parley_containers_run_as_the_images_user(apps):
    for name, spec in pod_specs(apps["production"]):
        if spec["containers"][0]["image"].startswith("ghcr.io/parley/"):
            assert spec["securityContext"]["runAsUser"] == 10001, name


@pytest.mark.parametrize(
    "breakage, problem",
    [
        (lambda c: c["resources"].pop("limits"), "Deployment/web container web: no limits.cpu"),
        (lambda c: c.pop("readinessProbe"), "Deployment/web container web: no readinessProbe"),
        (
            lambda c: c["securityContext"].update(readOnlyRootFilesystem=False),
            "Deployment/web container web: root filesystem not read-only",
        ),
        (
            lambda c: c["securityContext"].pop("capabilities"),
            "Deployment/web container web: capabilities not dropped",
        ),
    ],
)
def test_the_container_policy_names_a_broken_container(apps, breakage, problem):
    documents = copy.deepcopy(apps["production"])
    web = documents.get("Deployment", "web")
    breakage(web["spec"]["template"]["spec"]["containers"][0])
    assert problem in container_problems(documents)


# --- Policy: GPU pods -----------------------------------------------------------------------


def gpu_problems(documents: list[dict]) -> list[str]:
    """A pod asking for a GPU tolerates the taint, selects the GPU pool and limits what
    it requests; a pod on the GPU pool asks for a GPU (no CPU work on GPU nodes)."""
    problems = []
    for name, spec in pod_specs(documents):
        wants = any(GPU in c.get("resources", {}).get("requests", {}) for c in spec["containers"])
        on_pool = spec.get("nodeSelector", {}) == GPU_POOL
        tolerates = any(
            t.get("key") == GPU and t.get("effect") == "NoSchedule"
            for t in spec.get("tolerations", [])
        )
        if wants and not (on_pool and tolerates):
            problems.append(f"{name}: requests a GPU but does not tolerate and select the pool")
        if (on_pool or tolerates) and not wants:
            problems.append(f"{name}: on the GPU pool without requesting a GPU")
        for c in spec["containers"]:
            res = c.get("resources", {})
            if res.get("requests", {}).get(GPU) != res.get("limits", {}).get(GPU):
                problems.append(f"{name}: GPU requests and limits differ")
    return problems


def test_gpu_pods_tolerate_the_taint_select_the_pool_and_request_a_gpu(apps, rendered):
    production = apps["production"]
    assert gpu_problems(production) == []
    assert gpu_problems(apps["staging"]) == []
    gpu_pods = {n for n, s in pod_specs(production) if s.get("nodeSelector") == GPU_POOL}
    assert gpu_pods == {"Deployment/worker-stt", "Deployment/vllm"}
    # and the pool's taint is the one they tolerate
    taints = rendered["karpenter"].get("NodePool", "gpu")["spec"]["template"]["spec"]["taints"]
    assert [(t["key"], t["effect"]) for t in taints] == [(GPU, "NoSchedule")]
    # staging runs STT on the CPU: no GPU anywhere
    assert not any(s.get("nodeSelector") == GPU_POOL for _, s in pod_specs(apps["staging"]))


def test_the_gpu_policy_names_a_pod_without_the_toleration(apps):
    documents = copy.deepcopy(apps["production"])
    documents.get("Deployment", "worker-stt")["spec"]["template"]["spec"].pop("tolerations")
    assert gpu_problems(documents) == [
        "Deployment/worker-stt: requests a GPU but does not tolerate and select the pool"
    ]


# --- Policy: targets and selectors ----------------------------------------------------------


def matches(selector: dict, labels: dict) -> bool:
    """A label selector (matchLabels, matchExpressions In/NotIn/Exists/DoesNotExist)."""
    if not selector:
        return True
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, op, values = expression["key"], expression["operator"], expression.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def reference_problems(documents: list[dict]) -> list[str]:
    """Every HPA and ScaledObject target, PDB, Service, NetworkPolicy, ServiceMonitor,
    PodMonitor and Ingress points at something rendered, with matching labels and ports."""
    problems = []
    pods = [  # (namespace, name, labels, containers) of every pod template
        (
            d["metadata"].get("namespace"),
            d["metadata"]["name"],
            d["spec"]["template"]["metadata"].get("labels", {}),
            d["spec"]["template"]["spec"]["containers"],
        )
        for d in documents
        if d["kind"] in WORKLOADS
    ]
    names = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in documents}

    def pods_of(namespace, selector):
        return [p for p in pods if p[0] == namespace and matches(selector, p[2])]

    for d in documents:
        kind, ns, name = d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]
        spec = d.get("spec", {})
        where = f"{kind}/{name}"
        if kind in ("HorizontalPodAutoscaler", "ScaledObject"):
            target = spec["scaleTargetRef"]
            if (target.get("kind", "Deployment"), ns, target["name"]) not in names:
                problems.append(f"{where}: scales {target['name']}, which does not exist")
        elif kind == "PodDisruptionBudget" or kind == "PodMonitor":
            if not pods_of(ns, spec["selector"]):
                problems.append(f"{where}: its selector matches no pod")
        elif kind == "Service":
            selected = pods_of(ns, {"matchLabels": spec["selector"]})
            if not selected:
                problems.append(f"{where}: its selector matches no pod")
            ports = {
                p.get("name") for _, _, _, cs in selected for c in cs for p in c.get("ports", [])
            }
            ports |= {
                p["containerPort"]
                for _, _, _, cs in selected
                for c in cs
                for p in c.get("ports", [])
            }
            for port in spec["ports"]:
                if port.get("targetPort", port["port"]) not in ports:
                    problems.append(f"{where}: targetPort {port.get('targetPort')} is no pod's")
        elif kind == "NetworkPolicy":
            if spec["podSelector"] and not pods_of(ns, spec["podSelector"]):
                problems.append(f"{where}: its podSelector matches no pod")
            for rule in spec.get("ingress", []) + spec.get("egress", []):
                for peer in rule.get("from", []) + rule.get("to", []):
                    if set(peer) == {"podSelector"} and not pods_of(ns, peer["podSelector"]):
                        problems.append(f"{where}: a peer matches no pod")
        elif kind == "ServiceMonitor":
            services = [
                s for s in documents
                if s["kind"] == "Service" and s["metadata"].get("namespace") == ns
                and matches(spec["selector"], s["metadata"].get("labels", {}))
            ]  # fmt: skip
            if not services:
                problems.append(f"{where}: its selector matches no Service")
            ports = {p.get("name") for s in services for p in s["spec"]["ports"]}
            for endpoint in spec["endpoints"]:
                if endpoint["port"] not in ports:
                    problems.append(f"{where}: port {endpoint['port']} is no Service's")
        elif kind == "Ingress":
            for rule in spec["rules"]:
                for path in rule["http"]["paths"]:
                    backend = path["backend"]["service"]
                    if ("Service", ns, backend["name"]) not in names:
                        problems.append(f"{where}: backend {backend['name']} does not exist")
    return problems


@pytest.mark.parametrize("target", ["staging", "production"])
def test_every_target_and_selector_points_at_something_rendered(apps, target):
    assert reference_problems(apps[target]) == []


@pytest.mark.parametrize(
    "kind, name, path, value, problem",
    [
        (
            "ScaledObject", "worker-tts", ("spec", "scaleTargetRef", "name"), "worker-speech",
            "ScaledObject/worker-tts: scales worker-speech, which does not exist",
        ),
        (
            "Service", "web", ("spec", "selector", "app.kubernetes.io/component"), "webs",
            "Service/web: its selector matches no pod",
        ),
        (
            "PodDisruptionBudget", "pgbouncer",
            ("spec", "selector", "matchLabels", "app.kubernetes.io/component"), "pgb",
            "PodDisruptionBudget/pgbouncer: its selector matches no pod",
        ),
        (
            "Service", "worker-stt", ("spec", "ports", 0, "targetPort"), "metric",
            "Service/worker-stt: targetPort metric is no pod's",
        ),
    ],
)  # fmt: skip
def test_the_reference_check_names_a_dangling_reference(apps, kind, name, path, value, problem):
    documents = copy.deepcopy(apps["production"])
    node = documents.get(kind, name)
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert problem in reference_problems(documents)


def test_karpenter_pools_use_the_node_class(rendered):
    karpenter = rendered["karpenter"]
    karpenter.get("EC2NodeClass", "default")
    for pool in karpenter.of("NodePool"):
        ref = pool["spec"]["template"]["spec"]["nodeClassRef"]
        assert (ref["kind"], ref["name"]) == ("EC2NodeClass", "default"), pool["metadata"]["name"]
    gpu = karpenter.get("NodePool", "gpu")["spec"]
    requirements = {r["key"]: r["values"] for r in gpu["template"]["spec"]["requirements"]}
    assert requirements["karpenter.k8s.aws/instance-family"] == ["g5", "g6", "g6e"]
    assert requirements["karpenter.sh/capacity-type"] == ["spot", "on-demand"]
    assert gpu["limits"][GPU] and gpu["template"]["spec"]["expireAfter"]
    general = karpenter.get("NodePool", "general")["spec"]
    assert general["disruption"]["consolidationPolicy"] == "WhenEmptyOrUnderutilized"
    # every pod's pool exists
    pools = {p["metadata"]["name"] for p in karpenter.of("NodePool")}
    for docs in (rendered["staging"], rendered["production"]):
        for name, spec in pod_specs(docs):
            assert spec["nodeSelector"]["karpenter.sh/nodepool"] in pools, name


# --- Policy: images -------------------------------------------------------------------------


def image_problems(documents: list[dict]) -> list[str]:
    problems = []
    for name, spec in pod_specs(documents):
        for c in spec.get("initContainers", []) + spec["containers"]:
            image = c["image"]
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            if "@sha256:" not in image and (not tag or tag == "latest"):
                problems.append(f"{name}: image {image} is not pinned")
    return problems


@pytest.mark.parametrize("target", ["staging", "production"])
def test_every_image_is_pinned(apps, target):
    assert image_problems(apps[target]) == []
    images = {c["image"] for _, s in pod_specs(apps[target]) for c in s["containers"]}
    assert "ghcr.io/parley/parley:0.10.0" in images


def test_the_image_check_names_latest_and_untagged(apps):
    documents = copy.deepcopy(apps["production"])
    documents.get("Deployment", "web")["spec"]["template"]["spec"]["containers"][0]["image"] = (
        "ghcr.io/parley/parley:latest"
    )
    documents.get("Deployment", "pgbouncer")["spec"]["template"]["spec"]["containers"][0][
        "image"
    ] = "edoburu/pgbouncer"
    assert set(image_problems(documents)) == {
        "Deployment/web: image ghcr.io/parley/parley:latest is not pinned",
        "Deployment/pgbouncer: image edoburu/pgbouncer is not pinned",
    }


# --- The deploy contract (the scaling simulation reads these) --------------------------------


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_the_production_overlay_keeps_the_contracts_names_and_numbers(apps):
    production = apps["production"]
    for d in production:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") in ("parley", "monitoring"), d["metadata"]
    config = production.get("ConfigMap", "parley-config")["data"]
    assert config["DRAIN_CLOSE_S"] == "45"
    assert config["READINESS_DRAIN_FILE"] == "/tmp/parley-draining"
    assert config["LLM_BASE_URL"] == "http://vllm:8000/v1"
    assert config["WORKER_METRICS_PORT"] == "9101"

    web = production.get("Deployment", "web")
    pod = web["spec"]["template"]["spec"]
    labels = web["spec"]["template"]["metadata"]["labels"]
    assert labels == {
        "app.kubernetes.io/name": "parley",
        "app.kubernetes.io/part-of": "parley",
        "app.kubernetes.io/component": "web",
    }
    (container,) = pod["containers"]
    assert pod["terminationGracePeriodSeconds"] == 75
    assert float(config["DRAIN_CLOSE_S"]) + 5 < pod["terminationGracePeriodSeconds"]
    assert container["lifecycle"]["preStop"]["exec"]["command"] == [
        "/app/deploy/docker-entrypoint.sh",
        "drain",
    ]
    assert container["ports"] == [{"name": "http", "containerPort": 8000}]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["requests"]["cpu"] == "1"  # density: one process a core
    zones = [c["topologyKey"] for c in pod["topologySpreadConstraints"]]
    assert "topology.kubernetes.io/zone" in zones

    for name in WORKERS:
        spec = production.get("Deployment", name)["spec"]["template"]["spec"]
        (worker,) = spec["containers"]
        assert spec["terminationGracePeriodSeconds"] == 60, name
        assert worker["args"] == [name]
        assert worker["ports"] == [{"name": "metrics", "containerPort": 9101}], name
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            assert worker[probe]["httpGet"] == {"path": path, "port": "metrics"}, name
    stt = production.get("Deployment", "worker-stt")["spec"]["template"]["spec"]
    assert "startupProbe" in stt["containers"][0]
    assert stt["containers"][0]["image"].startswith("ghcr.io/parley/parley-gpu:")
    stt_env = env_of(stt["containers"][0])
    assert (stt_env["STT_DEVICE"], stt_env["STT_COMPUTE_TYPE"]) == ("cuda", "float16")

    hpa = production.get("HorizontalPodAutoscaler", "web")["spec"]
    kinds = {m["type"]: m for m in hpa["metrics"]}
    assert kinds["Resource"]["resource"]["target"]["averageUtilization"] > 0
    assert kinds["Pods"]["pods"]["metric"]["name"] == "parley_sockets_open"
    assert int(kinds["Pods"]["pods"]["target"]["averageValue"]) <= 546 + 1273  # the plan's pod
    assert 3 <= hpa["minReplicas"] < hpa["maxReplicas"]

    for name, queue in (
        ("worker-stt", '=~"stt|stt_partial"'),  # drafts go to stt_partial (speech.py)
        ("worker-tts", '=~"tts"'),
        ("worker-default", '="default"'),
    ):
        scaled = production.get("ScaledObject", name)["spec"]
        assert scaled["scaleTargetRef"]["name"] == name
        queries = [t["metadata"]["query"] for t in scaled["triggers"]]
        assert all(t["type"] == "prometheus" for t in scaled["triggers"])
        assert any(f"parley_queue_depth{{queue{queue}}}" in q for q in queries), queries
        assert any(f"parley_queue_oldest_age_seconds{{queue{queue}}}" in q for q in queries)
    for name, threads in (("worker-stt", 16), ("worker-tts", 2)):
        # workers prefetch: depth is ~0 while they keep up, so the work in hand scales them
        (in_hand,) = [
            t
            for t in production.get("ScaledObject", name)["spec"]["triggers"]
            if "parley_worker_tasks_in_flight" in t["metadata"]["query"]
        ]
        assert "parley_queue_depth" in in_hand["metadata"]["query"]
        assert in_hand["metricType"] == "AverageValue"
        assert float(in_hand["metadata"]["threshold"]) <= 0.7 * threads + 0.5
        assert all(float(t["metadata"]["threshold"]) > 0 for t in scaled["triggers"])
        assert scaled["maxReplicaCount"] > scaled["minReplicaCount"]
        assert scaled["pollingInterval"] and scaled["cooldownPeriod"]
    assert production.get("ScaledObject", "worker-stt")["spec"]["minReplicaCount"] == 0
    assert production.get("ScaledObject", "vllm")["spec"]["scaleTargetRef"]["name"] == "vllm"
    assert production.get("Service", "vllm")["spec"]["ports"][0]["port"] == 8000
    assert production.get("Service", "pgbouncer")["spec"]["ports"][0]["port"] == 5432
    production.get("Job", "migrate")


def test_pgbouncer_pools_transactions_within_the_database_budget(apps):
    production = apps["production"]
    ini = production.get("ConfigMap", "pgbouncer")["data"]["pgbouncer.ini"]
    settings = dict(re.findall(r"^(\w+) = (.*)$", ini, re.MULTILINE))
    assert settings["pool_mode"] == "transaction"
    replicas = production.get("Deployment", "pgbouncer")["spec"]["replicas"]
    # docs/database.md: <= 25 Postgres server connections (the database benchmark's target)
    assert replicas * int(settings["max_db_connections"]) <= 25
    assert int(settings["default_pool_size"]) <= int(settings["max_db_connections"])


def test_no_secret_value_is_committed(rendered):
    for docs in rendered.values():
        assert not [d for d in docs if d["kind"] == "Secret"]
    # and the names pods read come from the operator's Secret (deploy/k8s/README.md)
    web = rendered["production"].get("Deployment", "web")["spec"]["template"]["spec"]
    secret_volumes = [v["secret"]["secretName"] for v in web["volumes"] if "secret" in v]
    assert secret_volumes == ["parley-secrets"]
    env = env_of(web["containers"][0])
    for name in ("SECRET_KEY", "DATABASE_URL", "CACHE_URL", "CHANNEL_LAYER_URL",
                 "CELERY_BROKER_URL", "METRICS_TOKEN"):  # fmt: skip
        assert env[f"{name}_FILE"] == f"/run/secrets/parley/{name}"
        assert name not in env


def test_the_staging_overlay_is_smaller(apps):
    staging, production = apps["staging"], apps["production"]
    for kind, name, field in (
        ("HorizontalPodAutoscaler", "web", "maxReplicas"),
        ("ScaledObject", "worker-stt", "maxReplicaCount"),
        ("ScaledObject", "worker-tts", "maxReplicaCount"),
    ):
        assert staging.get(kind, name)["spec"][field] < production.get(kind, name)["spec"][field]
    stt = staging.get("Deployment", "worker-stt")["spec"]["template"]["spec"]["containers"][0]
    assert env_of(stt)["STT_DEVICE"] == "cpu"
    assert "vllm" not in {d["metadata"]["name"] for d in staging.of("Deployment")}
    assert "LLM_BASE_URL" not in staging.get("ConfigMap", "parley-config")["data"]


# --- Metrics: every name an autoscaler, adapter rule or alert uses is exported ------------------


def named_metrics(documents: list[dict]) -> dict[str, set[str]]:
    """Where each metric name is used: HPA Pods metrics, ScaledObject queries, adapter
    rules and PrometheusRule expressions (parsed as test_monitoring parses PromQL)."""
    used: dict[str, set[str]] = {}

    def add(names: set[str], where: str) -> None:
        for name in names:
            used.setdefault(name, set()).add(where)

    for d in documents:
        where = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] == "HorizontalPodAutoscaler":
            for metric in d["spec"]["metrics"]:
                if metric["type"] == "Pods":
                    add({metric["pods"]["metric"]["name"]}, where)
        elif d["kind"] == "ScaledObject":
            for trigger in d["spec"]["triggers"]:
                add(metric_names(trigger["metadata"]["query"]), where)
        elif d["kind"] == "ConfigMap" and d["metadata"]["name"] == "prometheus-adapter-parley":
            for rule in yaml.safe_load(d["data"]["config.yaml"])["rules"]:
                add(metric_names(rule["seriesQuery"]), where)
                add({rule["name"]["as"]}, where)
        elif d["kind"] == "PrometheusRule":
            for group in d["spec"]["groups"]:
                for rule in group["rules"]:
                    add(metric_names(rule["expr"]), where)
    return used


def exposed_names(text: str) -> set[str]:
    """The series names a Prometheus text exposition offers: its samples, and each
    family's TYPE (a labelled family with no child yet has no sample, but is exported)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


@pytest.fixture(scope="module")
def live_exposition(django_db_setup, live_env, live_daphne) -> dict[str, str]:
    """/metrics of a real Daphne and of a real worker's exporter (services mode)."""
    if not live.services_mode():
        raise AssertionError("the manifest metric check needs services mode: `make test-deploy`")
    worker = live.start_worker(live_env, role="tts")
    try:
        return {
            "web": live.metrics_get(f"{live_daphne.url}/metrics"),
            "worker": live.metrics_get(f"{worker.metrics_url}/metrics"),
        }
    finally:
        worker.stop()


def test_every_metric_the_manifests_name_is_exported_by_a_live_process(apps, live_exposition):
    exported = exposed_names(live_exposition["web"]) | exposed_names(live_exposition["worker"])
    used = named_metrics(apps["production"])
    # the manifests' PrometheusRule is the one apps/observability checks against its catalogue
    assert set(rule_expressions(rules_load()).values()) <= {
        r["expr"] for d in apps["production"].of("PrometheusRule")
        for g in d["spec"]["groups"] for r in g["rules"]
    }  # fmt: skip
    for name in ("parley_sockets_open", "parley_queue_depth", "parley_queue_oldest_age_seconds"):
        assert name in used, name
    missing = {
        name: sorted(where)
        for name, where in used.items()
        if name not in exported and not FOREIGN_METRIC.match(name)
    }
    assert missing == {}
    # the worker-only alert (ParleyNoWorkers) sees a worker role on the worker's exporter
    assert re.search(
        r'^parley_process_info\{role="worker-tts"\} 1', live_exposition["worker"], re.M
    )


def test_the_metric_check_names_a_metric_nobody_exports(apps, live_exposition):
    documents = copy.deepcopy(apps["production"])
    scaled = documents.get("ScaledObject", "worker-tts")
    scaled["spec"]["triggers"][0]["metadata"]["query"] = 'max(parley_queue_length{queue="tts"})'
    exported = exposed_names(live_exposition["web"]) | exposed_names(live_exposition["worker"])
    used = named_metrics(documents)
    assert used["parley_queue_length"] == {"ScaledObject/worker-tts"}
    assert "parley_queue_length" not in exported
