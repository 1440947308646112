"""Capacity plan: the web pods, STT and TTS workers, PgBouncer and Postgres
connections, Redis instances and nodes that a number of users needs, and what
they cost an hour, from the latest benchmark results (docs/benchmarks/*.json).

Plain arithmetic on measured figures. Every number the plan rests on is an
`Assumption` that says where it comes from (a file and key, or an option and
why its default is what it is), and the plan prints them all.

The load model: every user holds one socket on a web pod; a speaking user (the
speaking ratio of them at any moment) streams audio all the time, which the STT
stage transcribes (more than once: drafts, candidates, finals; the latency
benchmark measures its CPU cost a streamed second), and takes turns, which the
LLM answers and the TTS stage speaks. A benchmark core is taken to be a node core."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .capacity_inputs import Assumption, Benchmarks, CapacityError, bench_read

PGBOUNCER_MEMORY_MB = 100
REDIS_BASE_MEMORY_MB = 256


def option(default: float, help_: str) -> Any:
    """A field a command offers as `--name-with-dashes` (`options_add`)."""
    return field(default=default, metadata={"help": help_})


def options_add(parser: Any, *shapes: Any) -> None:
    """Each field of the dataclasses `shapes` as a command-line option, with its help."""
    for shape in shapes:
        for spec in fields(shape):
            parser.add_argument(
                f"--{spec.name.replace('_', '-')}",
                type=type(spec.default),
                default=spec.default,
                help=f"{spec.metadata['help']} (default {spec.default})",
            )


def options_of(shape: Any, given: dict) -> Any:
    """An instance of the dataclass `shape` from a command's parsed options."""
    return shape(**{spec.name: given[spec.name] for spec in fields(shape)})


@dataclass(frozen=True)
class Options:
    """Prices, node shapes, and the few figures that no benchmark measures. The
    command offers each as `--name-with-dashes`; `help` says why the default."""

    cpu_node_price: float = option(
        0.768, "$ an hour for a CPU node (default: AWS m6i.4xlarge on demand, us-east-1)"
    )
    gpu_node_price: float = option(
        1.006, "$ an hour for a GPU node (default: AWS g5.xlarge, one A10G, on demand)"
    )
    node_cores: int = option(16, "cores of a CPU node")
    node_memory_gb: float = option(64.0, "memory of a CPU node, GB")
    gpus_per_node: int = option(1, "GPUs of a GPU node")
    node_usable: float = option(
        0.8, "share of a node's cores and memory given to pods (the rest: system, headroom)"
    )
    worker_utilisation: float = option(
        0.7,
        "STT and TTS workers run at this share of their measured throughput, so that "
        "bursts wait briefly in the queue (waits grow without bound near 1)",
    )
    gpu_speedup: float = option(
        30.0,
        "ASSUMED, used with --gpu when stt.json has no GPU figure: one GPU's STT "
        "throughput as a multiple of one CPU core's",
    )
    p99_ms: float = option(50.0, "ping p99 a web pod must hold (the density target)")
    stt_worker_memory_mb: float = option(1024.0, "ASSUMED: memory of one STT worker")
    tts_worker_memory_mb: float = option(512.0, "ASSUMED: memory of one TTS worker")
    redis_core_share: float = option(
        0.5, "keep each (single-threaded) Redis below this share of its core"
    )
    pgbouncer_qps: float = option(
        10_000.0, "ASSUMED: queries a second one (single-threaded) PgBouncer carries"
    )
    utterance_buffer_kb: float = option(
        640.0,
        "Redis memory an open utterance holds at most: VAD_MAX_UTTERANCE_MS 20 s of "
        "16 kHz PCM16 (32 KB/s)",
    )


@dataclass(frozen=True)
class Line:
    component: str
    count: int
    sizing: str


@dataclass(frozen=True)
class Plan:
    headline: str
    lines: list[Line]
    cost_per_hour: float
    cost_detail: str
    assumptions: list[Assumption]


def _check(users: int, speaking_ratio: float, options: Options) -> None:
    if isinstance(users, bool) or not isinstance(users, int) or users < 1:
        raise CapacityError(f"--users must be a whole number of at least 1, not {users!r}")
    if not 0 <= speaking_ratio <= 1:
        raise CapacityError(f"--speaking-ratio must be between 0 and 1, not {speaking_ratio!r}")
    for name in ("cpu_node_price", "gpu_node_price"):
        if not getattr(options, name) >= 0:
            raise CapacityError(f"--{name.replace('_', '-')} must be 0 or more")
    for name in ("node_usable", "worker_utilisation", "redis_core_share"):
        if not 0 < getattr(options, name) <= 1:
            raise CapacityError(f"--{name.replace('_', '-')} must be above 0 and at most 1")
    for name in Options.__dataclass_fields__:
        value = getattr(options, name)
        if not math.isfinite(value) or (not name.endswith("price") and not value > 0):
            raise CapacityError(f"--{name.replace('_', '-')} must be a positive number")


def _up(value: float) -> int:
    """Whole units that carry `value` (a tiny float error never adds one)."""
    return math.ceil(round(value, 6))


def capacity_plan(
    *, users: int, speaking_ratio: float, gpu: bool, options: Options, bench_dir: Path
) -> Plan:
    """The plan for `users`, from the benchmark results in `bench_dir`."""
    _check(users, speaking_ratio, options)
    bench = bench_read(bench_dir, p99_ms=options.p99_ms)
    return plan_from(
        users=users, speaking_ratio=speaking_ratio, gpu=gpu, bench=bench, options=options
    )


def plan_from(
    *, users: int, speaking_ratio: float, gpu: bool, bench: Benchmarks, options: Options
) -> Plan:
    _check(users, speaking_ratio, options)
    o, b = options, bench
    speaking = _up(users * speaking_ratio)
    idle = users - speaking
    notes: list[Assumption] = []

    def given(name: str, value: float, source: str) -> float:
        notes.append(Assumption(name, value, source))
        return value

    # Web pods: one Daphne process on one core each. An idle socket costs what its
    # CPU share is of a streaming session's; no pod holds more idle sockets than measured.
    idle_weight = given(
        "web load of an idle socket, in streaming sessions",
        b.idle_cpu_percent.value / b.streaming_cpu_percent.value,
        "web CPU % an idle socket / web CPU % a streaming session (both above)",
    )
    given("cores of a web pod", 1, "density ran one Daphne process pinned to one core")
    web = max(
        1,
        _up((speaking + idle * idle_weight) / b.streaming_per_pod.value),
        _up(idle / b.idle_per_pod.value),
    )
    streaming_each, idle_each = _up(speaking / web), _up(idle / web)
    web_mb = (
        b.rss_base_mb.value
        + streaming_each * b.streaming_rss_kb.value / 1024
        + idle_each * b.idle_rss_kb.value / 1024
    )

    # STT: the live worker transcribes streamed speech more than once (a draft every
    # 700 ms re-transcribes the utterance so far, a candidate at each pause, sometimes a
    # final), so the plan uses the latency run's CPU cost a streamed second, not the
    # raw model's throughput on whole clips.
    given(
        "audio seconds a second a speaking user streams",
        1,
        "load model: a speaking user streams all the time, as the latency benchmark's "
        "speakers do (what STT spends on it: the CPU seconds a streamed second above)",
    )
    cost_s = b.stt_cpu_per_streamed_s.value
    at = f"at {o.worker_utilisation:.0%} of measured throughput"
    if gpu:
        per_gpu = b.stt_per_gpu.value if b.stt_per_gpu else b.stt_per_core.value * o.gpu_speedup
        if b.stt_per_gpu is None:
            given(
                "ASSUMED: STT audio seconds a second on one GPU",
                per_gpu,
                f"stt.json has no GPU figure: {b.stt_per_core.value:g} a CPU core "
                f"x --gpu-speedup {o.gpu_speedup:g} (an assumption, not a measurement)",
            )
        load = given(
            "STT load a speaking user, in whole-clip audio seconds a second",
            cost_s * b.stt_per_core.value,
            f"{b.stt_cpu_per_streamed_s.source} x {b.stt_per_core.source}",
        )
        stt = _up(speaking * load / (per_gpu * o.worker_utilisation))
        stt_cores, stt_mb = 0, 0.0
        stt_line = Line(
            "STT workers (GPU)",
            stt,
            f"1 GPU each, {per_gpu:,.0f} audio s/s; {speaking:,} speaking x {load:.3g} "
            f"audio s/s ({cost_s:g} CPU s a streamed s, measured in latency.json) {at}",
        )
    else:
        needed = speaking * cost_s / o.worker_utilisation
        stt = _up(needed / b.stt_cores.value)
        stt_cores, stt_mb = stt * _up(b.stt_cores.value), stt * o.stt_worker_memory_mb
        stt_line = Line(
            "STT workers (CPU)",
            stt,
            f"{b.stt_cores.value:g} core{'' if b.stt_cores.value == 1 else 's'}, "
            f"{o.stt_worker_memory_mb:,.0f} MB each; {speaking:,} "
            f"speaking x {cost_s:g} CPU s a streamed s (measured in latency.json) = "
            f"{needed:,.0f} cores {at}",
        )

    # TTS: one Piper process (one synthesis at a time) on one core each.
    given("cores of a TTS worker", 1, "Piper makes one sentence at a time a process")
    turns_s = speaking * b.turns_per_minute.value / 60
    tts_demand = turns_s * b.reply_audio_s.value
    tts = _up(tts_demand / (b.tts_per_core.value * o.worker_utilisation))

    # Database: server connections grow with the turns, so with speaking users.
    given(
        "Postgres server connections a speaking user",
        b.db_server_connections.value / b.db_sessions.value,
        "connections / sessions of the database benchmark (transaction pooling: "
        "server connections follow concurrent transactions, so turns)",
    )
    queries_s = turns_s * b.queries_per_turn.value
    pg = _up(speaking * b.db_server_connections.value / b.db_sessions.value)
    bouncers = max(1, _up(queries_s / o.pgbouncer_qps))

    # Redis: the web tier's commands (density), and every open utterance's audio.
    redis_cores = speaking * b.redis_cpu_percent.value / 100
    redis = max(1, _up(redis_cores / o.redis_core_share))
    redis_mb = REDIS_BASE_MEMORY_MB * redis + speaking * o.utterance_buffer_kb / 1024

    # Nodes: cores and memory of every CPU pod, packed onto usable node capacity.
    usable_cores, usable_mb = o.node_cores * o.node_usable, o.node_memory_gb * 1024 * o.node_usable
    if not gpu and b.stt_cores.value > usable_cores:
        raise CapacityError(
            f"an STT worker needs {b.stt_cores.value:g} cores, more than a node's "
            f"{usable_cores:g} usable: raise --node-cores"
        )
    cores = web + stt_cores + tts + redis + bouncers
    memory_mb = (
        web * web_mb
        + stt_mb
        + tts * o.tts_worker_memory_mb
        + redis_mb
        + bouncers * PGBOUNCER_MEMORY_MB
    )
    cpu_nodes = max(_up(cores / usable_cores), _up(memory_mb / usable_mb))
    gpu_nodes = _up(stt / o.gpus_per_node) if gpu else 0
    cost = cpu_nodes * o.cpu_node_price + gpu_nodes * o.gpu_node_price

    given("ASSUMED: PgBouncer memory MB", PGBOUNCER_MEMORY_MB, "estimate (capacity.py)")
    given("ASSUMED: Redis memory MB an instance, before audio", REDIS_BASE_MEMORY_MB, "estimate")
    for name, spec in Options.__dataclass_fields__.items():
        value = getattr(o, name)
        origin = "default" if value == spec.default else "given"
        given(f"--{name.replace('_', '-')}", value, f"option ({origin}): {spec.metadata['help']}")
    measured = [a for a in vars(b).values() if isinstance(a, Assumption)]
    lines = [
        Line(
            "web pods",
            web,
            f"1 core, {web_mb:,.0f} MB each; up to {streaming_each:,} streaming + "
            f"{idle_each:,} idle sockets a pod",
        ),
        stt_line,
        Line(
            "TTS workers (CPU)",
            tts,
            f"1 core, {o.tts_worker_memory_mb:,.0f} MB each; {tts_demand:,.0f} audio s/s of "
            f"replies ({turns_s:,.0f} turns/s) at {o.worker_utilisation:.0%} of measured",
        ),
        Line(
            "PgBouncer",
            bouncers,
            f"transaction pooling, {queries_s:,.0f} queries/s; default_pool_size "
            f"{_up(pg / bouncers):,} each",
        ),
        Line(
            "Postgres server connections",
            pg,
            "max_connections above this plus a reserve; Postgres runs on its own "
            "instance, not on the nodes below",
        ),
        Line(
            "Redis",
            redis,
            f"{redis_cores:,.2f} cores of commands in all, {redis_mb / 1024:,.1f} GB in all "
            f"(open utterances' audio included)",
        ),
        Line(
            "CPU nodes",
            cpu_nodes,
            f"{o.node_cores} cores, {o.node_memory_gb:g} GB, {o.node_usable:.0%} usable; pods "
            f"need {cores:,} cores, {memory_mb / 1024:,.1f} GB",
        ),
        Line("GPU nodes", gpu_nodes, f"{o.gpus_per_node} GPU each" if gpu else "none (--gpu)"),
    ]
    headline = (
        f"{users:,} users, {speaking_ratio:.0%} speaking: {speaking:,} streaming audio "
        f"and {idle:,} idle sockets; STT on {'GPU' if gpu else 'CPU'}"
    )
    cost_detail = (
        f"{cpu_nodes:,} CPU nodes x ${o.cpu_node_price:g} + "
        f"{gpu_nodes:,} GPU nodes x ${o.gpu_node_price:g}"
    )
    return Plan(headline, lines, cost, cost_detail, measured + notes)


def plan_text(plan: Plan) -> str:
    width = max(len(line.component) for line in plan.lines)
    out = [f"Capacity plan: {plan.headline}", ""]
    out += [f"  {ln.component:<{width}}  {ln.count:>9,}  {ln.sizing}" for ln in plan.lines]
    cost = f"${plan.cost_per_hour:,.2f}"
    out += [f"  {'cost per hour':<{width}}  {cost:>9}  {plan.cost_detail}", ""]
    out.append("Assumptions (value: where it comes from)")
    out += [f"  {a.name}: {_number(a.value)}  <- {a.source}" for a in plan.assumptions]
    return "\n".join(out)


def _number(value: float) -> str:
    if value == int(value):
        return f"{int(value):,}"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
