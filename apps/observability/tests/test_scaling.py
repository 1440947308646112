"""The scaling wave: the HPA and KEDA formulas, the queue model, a wave on a
fixture overlay (YAML of the rendered shape) and on the real production overlay,
and the command's errors for bad inputs."""

import json
from io import StringIO
from pathlib import Path

import pytest
import yaml
from django.conf import settings
from django.core.management import CommandError, call_command

from apps.observability.capacity import Options
from apps.observability.capacity_inputs import CapacityError, bench_read
from apps.observability.scaling import Wave, simulate_wave
from apps.observability.scaling_controllers import (
    Memory,
    Queue,
    Workload,
    hpa_desired,
    hpa_proposal,
    keda_proposal,
    keda_step,
    trigger_value,
)
from apps.observability.scaling_manifests import (
    DEFAULT_DOWN,
    DEFAULT_UP,
    Policy,
    Requests,
    Rules,
    Scaled,
    Trigger,
    cluster_read,
)
from apps.observability.tests.test_capacity import FILES

PRODUCTION = settings.BASE_DIR / "deploy/k8s/overlays/production"
KARPENTER = settings.BASE_DIR / "deploy/karpenter"


def _deployment(name, cpu="1", memory="1Gi", gpu=None):
    requests = {"cpu": cpu, "memory": memory} | ({"nvidia.com/gpu": gpu} if gpu else {})
    container = {"name": name, "resources": {"requests": requests}}
    return {"kind": "Deployment", "metadata": {"name": name},
            "spec": {"template": {"spec": {"containers": [container]}}}}  # fmt: skip


def _scaled(name, queue, *, low, high, threshold="1"):
    query = (
        f'sum(parley_queue_depth{{queue=~"{queue}"}}) + '
        f'sum(parley_worker_tasks_in_flight{{queue=~"{queue}"}})'
    )
    if queue == "vllm":
        query = "sum(vllm:num_requests_waiting)"
    return {"kind": "ScaledObject", "metadata": {"name": name},
            "spec": {"minReplicaCount": low, "maxReplicaCount": high, "pollingInterval": 15,
                     "cooldownPeriod": 120,
                     "triggers": [{"type": "prometheus", "metadata": {
                         "query": query, "threshold": threshold}}]}}  # fmt: skip


def overlay(*, web_min=1, worker_min=0, cpu_limit="4000", gpu_limit="400", drop=()):
    docs = [
        {"kind": "HorizontalPodAutoscaler", "metadata": {"name": "web"},
         "spec": {"minReplicas": web_min, "maxReplicas": 100, "metrics": [
             {"type": "Resource", "resource": {"name": "cpu", "target": {
                 "type": "Utilization", "averageUtilization": 70}}},
             {"type": "Pods", "pods": {"metric": {"name": "parley_sockets_open"},
                                       "target": {"type": "AverageValue", "averageValue": "1500"}}},
         ]}},
        _deployment("web"), _deployment("worker-stt", gpu=1), _deployment("worker-tts"),
        _deployment("worker-default", cpu="500m", memory="512Mi"), _deployment("vllm", gpu=1),
        _scaled("worker-stt", "stt|stt_partial", low=worker_min, high=200),
        _scaled("worker-tts", "tts", low=max(1, worker_min), high=2000),
        _scaled("worker-default", "default", low=max(1, worker_min), high=200),
        _scaled("vllm", "vllm", low=max(1, worker_min), high=200, threshold="4"),
        {"kind": "NodePool", "metadata": {"name": "general"},
         "spec": {"limits": {"cpu": cpu_limit}}},
        {"kind": "NodePool", "metadata": {"name": "gpu"},
         "spec": {"limits": {"nvidia.com/gpu": gpu_limit}}},
    ]  # fmt: skip
    return [d for d in docs if (d["kind"], d["metadata"]["name"]) not in drop]


@pytest.fixture
def files(tmp_path):
    for name, content in FILES.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(content))

    def write(docs):
        path = tmp_path / "rendered.yaml"
        path.write_text(yaml.safe_dump_all(docs))
        return path

    return tmp_path, write


def run(files, docs, **wave):
    bench_dir, write = files
    path = write(docs)
    cluster = cluster_read(manifests=path, karpenter=path)
    bench = bench_read(bench_dir, p99_ms=50)
    wave = Wave(**{"peak_users": 20_000, **wave})
    return simulate_wave(cluster=cluster, bench=bench, options=Options(), wave=wave, gpu=True)


def test_the_hpa_keeps_its_replicas_inside_the_tolerance_band():
    assert hpa_proposal(current=10, ready=10, ratios=[1.09]) == 10
    assert hpa_proposal(current=10, ready=10, ratios=[0.91]) == 10
    assert hpa_proposal(current=10, ready=10, ratios=[1.11]) == 12
    assert hpa_proposal(current=10, ready=10, ratios=[0.5, 1.5]) == 15  # max over metrics


def test_the_stabilization_window_holds_a_scale_down_and_the_policy_limits_a_scale_up():
    memory = Memory()
    step = dict(low=1, high=100, up=DEFAULT_UP, down=DEFAULT_DOWN, memory=memory)
    assert hpa_desired(now=0, current=10, proposal=10, **step) == 10
    assert hpa_desired(now=15, current=10, proposal=2, **step) == 10
    assert hpa_desired(now=285, current=10, proposal=2, **step) == 10
    assert hpa_desired(now=301, current=10, proposal=2, **step) == 2  # window passed
    # scale up: at most max(+100%, +4 pods) a 15 s period
    assert hpa_desired(now=400, current=2, proposal=50, **step) == 6
    assert hpa_desired(now=405, current=6, proposal=50, **step) == 6  # same period
    assert hpa_desired(now=420, current=6, proposal=50, **step) == 12


def test_keda_scales_to_zero_after_the_cooldown_and_back_on_activation():
    scaled = Scaled("worker-stt", 0, 10, 15, 120,
                    (Trigger('max(parley_queue_depth{queue="stt"})', 5, 0),),
                    DEFAULT_UP, DEFAULT_DOWN)  # fmt: skip
    worker = Workload("worker-stt", Requests(1, 1024, 1), 60, 0)
    queues = {"stt": Queue(depth=12), "tts": Queue(), "default": Queue(), "vllm": Queue()}
    queues["stt_partial"] = Queue()
    keda_step(worker, scaled, queues, now=0)
    assert worker.desired == 1  # activated from zero
    keda_step(worker, scaled, queues, now=15)
    assert worker.desired == 3  # ceil(12 / 5)
    queues["stt"] = Queue()
    keda_step(worker, scaled, queues, now=105)
    assert worker.desired == 3  # inactive, but not for the cooldown yet
    keda_step(worker, scaled, queues, now=135)
    assert worker.desired == 0


def test_the_queue_grows_while_workers_lag_and_drains_after():
    queue = Queue()
    for _ in range(4):
        queue.step(arrivals_s=10, served_s=6, dt=15, per_job_s=0.5)
    assert queue.depth == pytest.approx(240) and queue.age_s == pytest.approx(24)
    queue.step(arrivals_s=10, served_s=20, dt=15, per_job_s=0.5)
    assert queue.depth == pytest.approx(90)
    queue.step(arrivals_s=10, served_s=20, dt=15, per_job_s=0.5)
    assert queue.depth == 0 and queue.age_s == 0 and queue.in_flight == pytest.approx(8)
    queue.step(arrivals_s=10, served_s=20, dt=15, per_job_s=0.5)
    assert queue.in_flight == pytest.approx(5)  # 10 jobs/s of 0.5 s: 5 running


def test_pods_follow_the_wave_up_and_down(files):
    result = run(files, overlay())
    web = [row.web_desired for row in result.rows]
    assert web[0] < max(web) and web[-1] < max(web)
    stt = [row.ready["worker-stt"] for row in result.rows]
    assert max(stt) > 10 and stt[-1] < max(stt)
    assert result.peak_cost > result.average_cost > 0


def test_slow_provisioning_is_reported_as_lag(files):
    result = run(files, overlay(), gpu_node_s=600, cpu_node_s=600)
    assert result.lag_by_workload["worker-stt"][0] >= 5
    assert result.rows[3].shortfall  # minute 4 of the ramp


def test_generous_minimums_never_lag(files):
    result = run(files, overlay(web_min=40, worker_min=150))
    assert result.lag_minutes == []


def test_a_node_pool_limit_caps_the_nodes_and_shows_as_lag(files):
    result = run(files, overlay(gpu_limit="10"))
    assert max(row.gpu_nodes for row in result.rows) == 10
    assert result.lag_by_workload["worker-stt"][0] >= 10


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--peak-users", "100"], "--peak-users (100) is below --from-users (600)"),
        (["--ramp-minutes", "-1"], "--ramp-minutes must be 0 or more"),
        (["--step-seconds", "7"], "--step-seconds must divide 60"),
        (["--sentences-per-reply", "0"], "--sentences-per-reply must be above 0"),
        (["--manifests", "/nonexistent/overlay"], "/nonexistent/overlay is missing"),
    ],
)
def test_bad_inputs_are_clear_errors(files, args, message):
    bench_dir, write = files
    path = write(overlay())
    argv = ["--manifests", str(path), "--karpenter", str(path), "--bench-dir", str(bench_dir)]
    with pytest.raises(CommandError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call_command("simulate_wave", *argv, *args, stdout=StringIO())


def test_a_minimum_above_the_maximum_is_a_clear_error(files):
    bench_dir, write = files
    path = write(overlay(worker_min=500))
    with pytest.raises(CommandError, match="ScaledObject worker-stt: its minimum 500 is above"):
        call_command("simulate_wave", "--manifests", str(path), "--karpenter", str(path),
                     "--bench-dir", str(bench_dir), stdout=StringIO())  # fmt: skip


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        (("HorizontalPodAutoscaler", "web"), "has no HorizontalPodAutoscaler `web`"),
        (("ScaledObject", "worker-tts"), "has no ScaledObject worker-tts"),
        (("NodePool", "gpu"), "has no Karpenter NodePool `gpu`"),
    ],
)
def test_a_missing_autoscaler_is_a_clear_error(files, drop, message):
    bench_dir, write = files
    path = write(overlay(drop=(drop,)))
    with pytest.raises(CommandError, match=message):
        call_command("simulate_wave", "--manifests", str(path), "--karpenter", str(path),
                     "--bench-dir", str(bench_dir), stdout=StringIO())  # fmt: skip


def test_the_command_prints_the_table_and_writes_json(files, tmp_path):
    bench_dir, write = files
    path = write(overlay())
    out, target = StringIO(), tmp_path / "wave.json"
    call_command("simulate_wave", "--manifests", str(path), "--karpenter", str(path),
                 "--bench-dir", str(bench_dir), "--peak-users", "6000", "--json", str(target),
                 stdout=out)  # fmt: skip
    assert "cost per hour: peak $" in out.getvalue()
    saved = json.loads(target.read_text())
    assert len(saved["rows"]) == 40 and saved["wave"]["peak_users"] == 6000  # with the tail


def test_the_production_overlay_carries_the_peak():
    """The configured maxReplicas and NodePool limits carry 60,000 users (30%
    speaking) on the measured figures, and the web tier lags at most 3 minutes:
    a CPU node's 60 s, a pod's 15 s start and the HPA's 15 s sync and 30 s scale-up
    period, twice while the ramp outruns one doubling, and one more where the HPA's
    10% tolerance holds the count a pod under the plan on the ramp."""
    cluster = cluster_read(manifests=PRODUCTION, karpenter=KARPENTER)
    bench = bench_read(Path(settings.BASE_DIR / "docs/benchmarks"), p99_ms=50)
    result = simulate_wave(cluster=cluster, bench=bench, options=Options(), wave=Wave(), gpu=True)
    peak = result.rows[15]
    assert peak.users == 60_000
    assert cluster.hpa.max_replicas >= peak.ready["web"] and "web" not in peak.shortfall
    assert result.lag_by_workload.get("web", (0, 0))[0] <= 3
    gpu_pods = cluster.scaled["worker-stt"].max_replicas + cluster.scaled["vllm"].max_replicas
    assert cluster.gpu_limit is not None and cluster.gpu_limit >= gpu_pods


def test_on_the_real_production_overlay_every_workload_lags_only_on_the_ramp():
    """The production overlay as rendered (work-in-hand triggers included): every
    workload is short only during the ramp up (minutes 1-10) and at most 5 minutes.
    The bound: a GPU node's 120 s and a model's 60 s load, after KEDA's 5 s poll and
    the HPA's 15 s sync, put the first new STT capacity ~3.3 minutes into the ramp;
    from there the scale-up policy doubles each 15 s and the backlog of those minutes
    drains within the next ~1.5."""
    cluster = cluster_read(manifests=PRODUCTION, karpenter=KARPENTER)
    bench = bench_read(Path(settings.BASE_DIR / "docs/benchmarks"), p99_ms=50)
    wave = Wave()
    result = simulate_wave(cluster=cluster, bench=bench, options=Options(), wave=wave, gpu=True)
    for name in ("web", "worker-stt", "worker-tts", "worker-default", "vllm"):
        short = [row.minute for row in result.rows if name in row.shortfall]
        assert len(short) <= 5 and all(m <= wave.ramp_minutes for m in short), (name, short)
    # the final scale-down shows in the tail: back near the minimum
    last = result.rows[-1]
    assert last.ready["worker-tts"] < 20 and last.gpu_nodes <= 5


def test_a_value_trigger_scales_with_the_current_count_and_average_value_without():
    value = Trigger('max(parley_queue_oldest_age_seconds{queue="stt"})', 0.5, 0, "Value")
    average = Trigger('max(parley_queue_depth{queue=~"stt|stt_partial"})', 8, 0)
    queues = {"stt": Queue(depth=40, age_s=1.0), "stt_partial": Queue(depth=40)}
    for trigger, current, expected in [(value, 4, 8), (average, 4, 10), (average, 1, 10)]:
        scaled = Scaled("worker-stt", 0, 100, 5, 300, (trigger,), DEFAULT_UP, DEFAULT_DOWN)
        assert keda_proposal(scaled=scaled, queues=queues, current=current) == (expected, True)


def test_a_percent_scale_down_truncates():
    down = Rules(0, (Policy("Percent", 50, 60),), "Max")
    step = dict(low=1, high=100, up=DEFAULT_UP, down=down, memory=Memory())
    assert hpa_desired(now=0, current=5, proposal=1, **step) == 2  # floor(5 x 0.5)


def test_an_unknown_metric_type_or_queue_is_a_clear_error(files):
    docs = overlay()
    docs[6]["spec"]["triggers"][0]["metricType"] = "Utilisation"
    with pytest.raises(CapacityError, match="metricType 'Utilisation' is not AverageValue"):
        run(files, docs)
    with pytest.raises(CapacityError, match="names no known queue"):
        trigger_value('max(parley_queue_depth{queue="sst"})', queues={"stt": Queue()}, name="x")


def test_empty_nodes_stay_until_the_node_pool_consolidate_after(files):
    docs = overlay()
    docs[-1]["spec"]["disruption"] = {"consolidateAfter": "10m"}
    slow = run(files, docs, tail_minutes=20)
    fast = run(files, overlay(), tail_minutes=20)
    gpu = [r.gpu_nodes for r in slow.rows]
    assert [r.gpu_nodes for r in fast.rows][-1] < gpu[31]  # consolidateAfter 0: gone sooner
    assert gpu[-1] < max(gpu)
