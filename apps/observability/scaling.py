"""Scaling wave: a traffic wave replayed through the autoscalers the production
overlay configures, to check the manifests' numbers against the benchmarks.

Every step (15 s by default) the load model (the one `capacity.plan_from` sizes
with) turns the users of that moment into web CPU and open sockets a pod, and
into jobs arriving on each queue; the HPA algorithm scales `web`, KEDA's scales
each ScaledObject on its queue's depth and oldest age; new pods wait for room
on a node, Karpenter launches nodes for the pods that do not fit (after its
provisioning delay, within the NodePool limits), and a pod is ready its start
delay after it lands. Ready workers drain their queue at the measured
per-worker throughput. A step lags when fewer pods are ready than carry its
demand at 100% of measured throughput."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from .capacity import Options, option, plan_from
from .capacity_inputs import Benchmarks, CapacityError
from .scaling_controllers import (
    HPA_SYNC_S,
    Pool,
    Queue,
    Workload,
    hpa_desired,
    hpa_proposal,
    keda_step,
    pods_place,
    queues_drain,
)
from .scaling_manifests import Cluster, Hpa, Requests

# the queues each workload reads (worker-stt: finals on stt, drafts on stt_partial)
QUEUES = {
    "worker-stt": ("stt", "stt_partial"),
    "worker-tts": ("tts",),
    "worker-default": ("default",),
    "vllm": ("vllm",),
}
MODEL_WORKLOADS = ("worker-stt", "vllm")


@dataclass(frozen=True)
class Wave:
    """The wave and the delays and rates no benchmark measures; the command offers
    each as `--name-with-dashes`."""

    from_users: int = option(600, "users at the start and the end")
    peak_users: int = option(60_000, "users at the peak")
    ramp_minutes: float = option(10.0, "minutes from the start to the peak, and back")
    hold_minutes: float = option(10.0, "minutes held at the peak")
    tail_minutes: float = option(10.0, "minutes at --from-users after the ramp down")
    speaking_ratio: float = option(0.3, "share of users streaming speech at any moment")
    step_seconds: int = option(15, "simulation step (divides 60)")
    web_start_s: float = option(15.0, "seconds from a web pod landing to ready")
    worker_start_s: float = option(20.0, "seconds from a TTS/default worker landing to ready")
    model_start_s: float = option(60.0, "seconds an STT worker or vLLM pod loads its model")
    cpu_node_s: float = option(60.0, "seconds Karpenter takes to make a CPU node ready")
    gpu_node_s: float = option(120.0, "seconds Karpenter takes to make a GPU node ready")
    stt_window_ms: float = option(
        700.0, "audio a draft carries (STT_PARTIAL_EVERY_MS: a speaking user sends one a window)"
    )
    sentences_per_reply: float = option(
        3.0, "ASSUMED: sentences a reply (a TTS job each); no benchmark counts them"
    )
    vllm_replies_per_s: float = option(
        30.0,
        "ASSUMED: replies a second one vLLM pod (one A10G, a 7-8B model, 64 sequences of "
        "~2 s) serves (one a turn)",
    )


@dataclass(frozen=True)
class Rates:
    """Per-step demand from the load model, with the figures it came from."""

    idle_weight: float  # web load of an idle socket, in streaming sessions
    arrivals_per_user: dict[str, float]  # jobs a second a speaking user adds, by queue
    served_per_pod: dict[str, float]  # jobs a second a ready pod takes, by workload


def rates_from(*, bench: Benchmarks, options: Options, wave: Wave, gpu: bool) -> Rates:
    """The same figures and formulas `capacity.plan_from` sizes with, as rates. STT:
    a speaking user sends a draft (stt_partial) a window and a final (stt) a turn;
    a worker's measured throughput, in speaking users, shared over both. TTS: a
    job a sentence. default: only ping_task (no load arrives there)."""
    b, window_s = bench, wave.stt_window_ms / 1000
    cost_s = b.stt_cpu_per_streamed_s.value
    if gpu:
        per_gpu = (
            b.stt_per_gpu.value if b.stt_per_gpu else b.stt_per_core.value * options.gpu_speedup
        )
        stt_users = per_gpu / (cost_s * b.stt_per_core.value)
    else:
        stt_users = b.stt_cores.value / cost_s
    turns = b.turns_per_minute.value / 60
    stt_jobs = 1 / window_s + turns
    sentences = turns * wave.sentences_per_reply
    return Rates(
        idle_weight=b.idle_cpu_percent.value / b.streaming_cpu_percent.value,
        arrivals_per_user={
            "stt": turns,
            "stt_partial": 1 / window_s,
            "tts": sentences,
            "default": 0.0,
            "vllm": turns,
        },
        served_per_pod={
            "worker-stt": stt_users * stt_jobs,
            "worker-tts": b.tts_per_core.value / b.reply_audio_s.value * wave.sentences_per_reply,
            "worker-default": 1.0,  # ping_task: no load arrives, the rate is never used
            "vllm": wave.vllm_replies_per_s,
        },
    )


def users_at(wave: Wave, t: float) -> float:
    ramp, hold = wave.ramp_minutes * 60, wave.hold_minutes * 60
    rise = wave.peak_users - wave.from_users
    if t <= ramp:
        return wave.from_users + rise * (t / ramp if ramp else 1)
    if t <= ramp + hold:
        return wave.peak_users
    return wave.from_users + rise * max(0.0, 1 - (t - ramp - hold) / ramp if ramp else 0)


def wave_check(wave: Wave) -> None:
    for name in Wave.__dataclass_fields__:
        value = getattr(wave, name)
        if not math.isfinite(value) or value < 0:
            raise CapacityError(f"--{name.replace('_', '-')} must be 0 or more, not {value!r}")
    if wave.from_users < 1:
        raise CapacityError(f"--from-users must be at least 1, not {wave.from_users}")
    if wave.peak_users < wave.from_users:
        raise CapacityError(
            f"--peak-users ({wave.peak_users}) is below --from-users ({wave.from_users})"
        )
    if not 0 <= wave.speaking_ratio <= 1:
        raise CapacityError(f"--speaking-ratio must be between 0 and 1, not {wave.speaking_ratio}")
    if not 1 <= wave.step_seconds <= 60 or 60 % wave.step_seconds:
        raise CapacityError(f"--step-seconds must divide 60, not {wave.step_seconds}")
    if wave.ramp_minutes + wave.hold_minutes <= 0:
        raise CapacityError("--ramp-minutes and --hold-minutes are both 0: no wave to replay")
    for name in ("stt_window_ms", "sentences_per_reply", "vllm_replies_per_s"):
        if not getattr(wave, name) > 0:
            raise CapacityError(f"--{name.replace('_', '-')} must be above 0")


@dataclass(frozen=True)
class Row:
    minute: int
    users: int
    web_desired: int
    ready: dict[str, int]
    cpu_nodes: int
    gpu_nodes: int
    queues: dict[str, tuple[float, float]]  # depth, oldest age s
    shortfall: dict[str, int]  # pods short of the minute's demand, at its worst step
    cost_per_hour: float


@dataclass(frozen=True)
class Result:
    rows: list[Row]
    lag_minutes: list[int]
    lag_by_workload: dict[str, tuple[int, int]]  # minutes short, most pods short
    peak_pods: int
    average_pods: float
    peak_cost: float
    average_cost: float
    source: str


def _autoscaled(cluster: Cluster, wave: Wave, gpu: bool) -> list[Workload]:
    starts = {"web": wave.web_start_s} | {n: wave.model_start_s for n in MODEL_WORKLOADS}
    out = []
    for name, requests in cluster.requests.items():
        low = cluster.hpa.min_replicas if name == "web" else None
        if name in cluster.scaled:
            low = cluster.scaled[name].min_replicas
        if name == "worker-stt" and not gpu:
            requests = Requests(requests.cores, requests.memory_mb, 0)
        desired = cluster.replicas[name] if low is None else low
        out.append(Workload(name, requests, starts.get(name, wave.worker_start_s), desired))
    return out


def simulate_wave(
    *, cluster: Cluster, bench: Benchmarks, options: Options, wave: Wave, gpu: bool
) -> Result:
    """Replays the wave through the cluster's autoscalers (see the module docstring)."""
    wave_check(wave)
    rates = rates_from(bench=bench, options=options, wave=wave, gpu=gpu)
    hpa: Hpa = cluster.hpa
    o, dt = options, wave.step_seconds
    pools = {
        "cpu": Pool(
            "general",
            o.node_cores * o.node_usable,
            o.node_memory_gb * 1024 * o.node_usable,
            0,
            math.inf if cluster.cpu_limit is None else cluster.cpu_limit // o.node_cores,
            wave.cpu_node_s,
            cluster.consolidate_s.get("general", 0.0),
        ),
        "gpu": Pool(
            "gpu",
            0,
            0,
            o.gpus_per_node,
            math.inf if cluster.gpu_limit is None else cluster.gpu_limit // o.gpus_per_node,
            wave.gpu_node_s,
            cluster.consolidate_s.get("gpu", 0.0),
        ),
    }
    workloads = _autoscaled(cluster, wave, gpu)
    by_name = {w.name: w for w in workloads}
    queues = {queue: Queue() for names in QUEUES.values() for queue in names}
    web_cores = by_name["web"].requests.cores or 1.0
    rows: list[Row] = []
    pods_seen: list[int] = []
    costs: list[float] = []
    shortfall: dict[str, int] = {}
    # the wave starts on a settled cluster: the pods its first users need (at least
    # the minimum) ready on their nodes
    for w in workloads:
        if w.name in QUEUES:
            speaking = users_at(wave, 0) * wave.speaking_ratio
            jobs = sum(speaking * rates.arrivals_per_user[q] for q in QUEUES[w.name])
            settled = math.ceil(round(jobs / rates.served_per_pod[w.name], 6))
            w.desired = min(max(w.desired, settled), cluster.scaled[w.name].max_replicas)
        w.resize()
    pods_place(workloads, pools, now=-3600.0)
    pods_place(workloads, pools, now=-1800.0)
    end = (2 * wave.ramp_minutes + wave.hold_minutes + wave.tail_minutes) * 60
    now = 0.0
    while now <= end + 1e-9:
        users = users_at(wave, now)
        speaking = users * wave.speaking_ratio
        # demand, and the pods that carry it at 100% of measured throughput
        web = by_name["web"]
        ready_web = web.ready(now)
        load = speaking + (users - speaking) * rates.idle_weight
        plan = plan_from(
            users=max(1, round(users)),
            speaking_ratio=wave.speaking_ratio,
            gpu=gpu,
            bench=bench,
            options=o,
        )
        needed = {"web": plan.lines[0].count}
        arrivals = {q: speaking * r for q, r in rates.arrivals_per_user.items()}
        for name, names in QUEUES.items():
            jobs = sum(arrivals[q] for q in names)
            needed[name] = math.ceil(round(jobs / rates.served_per_pod[name], 6))
            per_pod = rates.served_per_pod[name]
            queues_drain(
                by_name[name].ready(now) * per_pod,
                names,
                queues,
                arrivals,
                dt=dt,
                per_job_s=cluster.threads.get(name, 1) / per_pod,
            )
        # controllers
        if now % HPA_SYNC_S < 1e-9 or dt > HPA_SYNC_S:
            ratios = []
            if ready_web and hpa.cpu_percent:
                cpu = load / ready_web * bench.streaming_cpu_percent.value / web_cores
                ratios.append(cpu / hpa.cpu_percent)
            if ready_web and hpa.sockets_per_pod:
                ratios.append(users / ready_web / hpa.sockets_per_pod)
            web.desired = hpa_desired(
                now=now,
                current=web.desired,
                proposal=hpa_proposal(current=web.desired, ready=ready_web, ratios=ratios),
                low=hpa.min_replicas,
                high=hpa.max_replicas,
                up=hpa.up,
                down=hpa.down,
                memory=web.memory,
            )
        for name, scaled in cluster.scaled.items():
            keda_step(by_name[name], scaled, queues, now)
        # pods, then nodes
        for w in workloads:
            w.resize()
        pods_place(workloads, pools, now)
        for name, need in needed.items():
            short = max(0, need - by_name[name].ready(now))
            shortfall[name] = max(shortfall.get(name, 0), short)
        cost = len(pools["cpu"].nodes) * o.cpu_node_price + len(pools["gpu"].nodes) * (
            o.gpu_node_price
        )
        costs.append(cost)
        pods_seen.append(sum(len(w.pods) for w in workloads))
        if now % 60 < 1e-9 and now > 0 or now >= end - 1e-9:
            rows.append(
                Row(
                    minute=round(now / 60),
                    users=round(users),
                    web_desired=web.desired,
                    ready={w.name: w.ready(now) for w in workloads if w.name in needed},
                    cpu_nodes=len(pools["cpu"].nodes),
                    gpu_nodes=len(pools["gpu"].nodes),
                    queues={q: (round(v.depth, 1), round(v.age_s, 1)) for q, v in queues.items()},
                    shortfall={k: v for k, v in shortfall.items() if v},
                    cost_per_hour=round(cost, 2),
                )
            )
            shortfall = {}
        now += dt
    return Result(
        rows=rows,
        lag_minutes=[r.minute for r in rows if r.shortfall],
        lag_by_workload={
            name: (
                sum(1 for r in rows if name in r.shortfall),
                max(r.shortfall.get(name, 0) for r in rows),
            )
            for name in sorted({n for r in rows for n in r.shortfall})
        },
        peak_pods=max(pods_seen),
        average_pods=sum(pods_seen) / len(pods_seen),
        peak_cost=max(costs),
        average_cost=sum(costs) / len(costs),
        source=cluster.source,
    )


def result_text(result: Result) -> str:
    head = (
        f"{'min':>3} {'users':>7} {'web d/r':>9} {'stt':>5} {'tts':>5} {'dflt':>4} {'vllm':>4} "
        f"{'cpuN':>5} {'gpuN':>4}  queue depth/age s (stt stt_partial tts default vllm)  lag"
    )
    out = [f"Scaling wave on {result.source}", head]
    for r in result.rows:
        queues = " ".join(f"{d:,.0f}/{a:.0f}" for d, a in r.queues.values())
        lag = ", ".join(f"{k} -{v}" for k, v in r.shortfall.items()) or "-"
        out.append(
            f"{r.minute:>3} {r.users:>7,} {r.web_desired:>4}/{r.ready['web']:<4} "
            f"{r.ready['worker-stt']:>5} {r.ready['worker-tts']:>5} "
            f"{r.ready['worker-default']:>4} {r.ready['vllm']:>4} {r.cpu_nodes:>5} "
            f"{r.gpu_nodes:>4}  {queues:<40}  {lag}"
        )
    lagged = ", ".join(str(m) for m in result.lag_minutes) or "none"
    out += [
        "",
        f"minutes where ready pods lagged demand: {lagged}",
        *(
            f"  {name}: {minutes} minutes short, at most {most:,} pods"
            for name, (minutes, most) in result.lag_by_workload.items()
        ),
        f"pods: peak {result.peak_pods:,}, average {result.average_pods:,.0f}",
        f"cost per hour: peak ${result.peak_cost:,.2f}, average ${result.average_cost:,.2f}",
    ]
    return "\n".join(out)


def result_json(result: Result, wave: Wave) -> dict[str, Any]:
    return {"benchmark": "wave", "wave": asdict(wave), **asdict(result)}
