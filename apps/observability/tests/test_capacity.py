"""The capacity plan's arithmetic on fixture benchmark results (written to a tmp
dir), its errors for bad inputs and bad files, and the thin command around it."""

import copy
import json
import math
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from apps.observability.capacity import Options, capacity_plan, plan_text
from apps.observability.capacity_inputs import CapacityError

DENSITY = {
    "benchmark": "density",
    "servers": {
        "daphne": {
            "rss_base_mb": 100.0,
            "levels": [
                {"sessions": 100, "mode": "stream", "ping_ms": {"p99": 5.0}, "socket_errors": 0,
                 "cpu_percent_per_session": 0.5, "rss_per_session_kb": 512.0,
                 "redis_cpu_percent": 1.0},
                {"sessions": 500, "mode": "stream", "ping_ms": {"p99": 40.0}, "socket_errors": 0,
                 "cpu_percent_per_session": 0.2, "rss_per_session_kb": 1024.0,
                 "redis_cpu_percent": 5.0},
                {"sessions": 800, "mode": "stream", "ping_ms": {"p99": 45.0}, "socket_errors": 3,
                 "cpu_percent_per_session": 0.12, "rss_per_session_kb": 900.0,
                 "redis_cpu_percent": 6.0},
            ],
            "idle": {"opened": 2000, "mode": "idle", "ping_ms": {"p99": 2.0}, "socket_errors": 0,
                     "cpu_percent_per_session": 0.01, "rss_per_session_kb": 256.0},
        }
    },
}  # fmt: skip
STT = {"summary": {"audio_seconds_per_cpu_second": 5.0, "cores": 2}}
LATENCY = {
    "summary": {
        "tts_audio_seconds_per_cpu_second": 20.0,
        "reply_audio_seconds_per_turn": 6.0,
        "turns_per_speaking_minute": 2.0,
        # twice the raw model's 1/5 CPU s an audio second: drafts re-transcribe speech
        "stt_cpu_seconds_per_streamed_second": 0.4,
    }
}
DATABASE = {
    "summary": {"sessions": 1000, "postgres_server_connections": 20, "queries_per_turn": 10}
}
FILES = {"density": DENSITY, "stt": STT, "latency": LATENCY, "database": DATABASE}


@pytest.fixture
def bench(tmp_path):
    """Writes fixture results; `bench(stt=...)` replaces one file's content."""

    def write(**overrides):
        for name, content in {**FILES, **overrides}.items():
            path = tmp_path / f"{name}.json"
            if content is None:
                path.unlink(missing_ok=True)
            else:
                path.write_text(content if isinstance(content, str) else json.dumps(content))
        return tmp_path

    write()
    return write


def plan(bench_dir, *, users=10_000, ratio=0.25, gpu=False, **options):
    return capacity_plan(
        users=users,
        speaking_ratio=ratio,
        gpu=gpu,
        options=Options(**options),
        bench_dir=bench_dir,
    )


def counts(result) -> dict[str, int]:
    return {line.component: line.count for line in result.lines}


def test_a_cpu_plan_from_the_measured_figures(bench):
    # given 10,000 users, a quarter of them speaking: 2,500 streaming, 7,500 idle
    result = plan(bench())

    assert counts(result) == {
        # (2,500 + 7,500 x 0.01/0.2) / 500 a pod = 5.75; 7,500 idle / 2,000 = 3.75
        "web pods": 6,
        # 2,500 speaking x 0.4 CPU s a streamed s / 0.7 = 1,428.6 cores / 2 a worker
        "STT workers (CPU)": 715,
        # 2,500 x 2 turns/min / 60 x 6 s = 500 audio s/s / (20 x 0.7)
        "TTS workers (CPU)": 36,
        "PgBouncer": 1,  # 833 queries/s
        "Postgres server connections": 50,  # 2,500 x 20 / 1,000
        "Redis": 1,  # 2,500 x 5%/500 = 0.25 of a core, below half a core
        # 6 + 1,430 + 36 + 1 + 1 = 1,474 cores on 12.8 usable cores a node
        "CPU nodes": 116,
        "GPU nodes": 0,
    }
    assert result.cost_per_hour == pytest.approx(116 * 0.768)
    stt = next(line for line in result.lines if line.component == "STT workers (CPU)")
    assert "0.4 CPU s a streamed s (measured in latency.json)" in stt.sizing
    assert "1,429 cores at 70%" in stt.sizing
    web = next(line for line in result.lines if line.component == "web pods")
    assert "830 MB each" in web.sizing  # 100 + 417 x 1 MB + 1,250 x 0.25 MB
    assert "417 streaming + 1,250 idle" in web.sizing


def test_every_measured_figure_names_its_file_and_key(bench):
    text = plan_text(plan(bench()))

    for key in [
        "density.json: servers.daphne.levels[1].sessions",
        "density.json: servers.daphne.levels[1].cpu_percent_per_session",
        "density.json: servers.daphne.idle.opened",
        "density.json: servers.daphne.rss_base_mb",
        "stt.json: summary.audio_seconds_per_cpu_second",
        "stt.json: summary.cores",
        "latency.json: summary.tts_audio_seconds_per_cpu_second",
        "latency.json: summary.reply_audio_seconds_per_turn",
        "latency.json: summary.turns_per_speaking_minute",
        "latency.json: summary.stt_cpu_seconds_per_streamed_second",
        "database.json: summary.sessions",
        "database.json: summary.postgres_server_connections",
        "database.json: summary.queries_per_turn",
    ]:
        assert key in text, key
    for option in ["--cpu-node-price", "--gpu-speedup", "--worker-utilisation", "--p99-ms"]:
        assert f"{option}: " in text
    assert "cost per hour" in text and "$89.09" in text  # 116 nodes x $0.768
    assert "audio seconds a second a speaking user streams: 1" in text
    assert "sends to STT" not in text  # STT transcribes a streamed second more than once


def test_cpu_stt_workers_follow_the_measured_cost_a_streamed_second(bench):
    latency = copy.deepcopy(LATENCY)
    latency["summary"]["stt_cpu_seconds_per_streamed_second"] = 0.8
    stt = copy.deepcopy(STT)
    stt["summary"]["cores"] = 4

    # 2,500 x 0.8 / 0.7 = 2,857.1 cores / 2 a worker
    assert counts(plan(bench(latency=latency)))["STT workers (CPU)"] == 1429
    # 2,500 x 0.4 / 0.7 = 1,428.6 cores / 4 a worker
    assert counts(plan(bench(stt=stt)))["STT workers (CPU)"] == 358
    # 2,500 x 0.4 / 0.5 = 2,000 cores / 2 a worker
    assert counts(plan(bench(), worker_utilisation=0.5))["STT workers (CPU)"] == 1000


def test_the_web_tier_uses_the_largest_level_that_meets_the_p99_target(bench):
    # the 800 level had socket errors, so 500 is the largest that met 50 ms
    assert counts(plan(bench()))["web pods"] == 6
    # with a 10 ms target only the 100 level counts: 2,500 + 7,500 x 0.01/0.5 = 2,650
    assert counts(plan(bench(), p99_ms=10.0))["web pods"] == 27


def test_gpu_without_a_measured_figure_uses_the_assumed_speedup_and_says_so(bench):
    result = plan(bench(), gpu=True)

    # 0.4 CPU s a streamed s x 5 audio s a CPU s = 2 audio s/s a speaker;
    # 2,500 x 2 = 5,000 audio s/s / (5 x 30 a GPU x 0.7) = 47.6
    assert counts(result)["STT workers (GPU)"] == 48
    assert counts(result)["GPU nodes"] == 48
    assert counts(result)["CPU nodes"] == 4  # 6 + 36 + 1 + 1 cores, STT off the CPU nodes
    assert result.cost_per_hour == pytest.approx(4 * 0.768 + 48 * 1.006)
    [load] = [a for a in result.assumptions if a.name.startswith("STT load a speaking user")]
    assert load.value == pytest.approx(2.0)
    assert "latency.json: summary.stt_cpu_seconds_per_streamed_second" in load.source
    assert "stt.json: summary.audio_seconds_per_cpu_second" in load.source
    [assumed] = [a for a in result.assumptions if "GPU" in a.name and "ASSUMED" in a.name]
    assert assumed.value == 150 and "--gpu-speedup 30" in assumed.source
    # 5,000 / (5 x 60 x 0.7) = 23.8
    assert counts(plan(bench(), gpu=True, gpu_speedup=60.0))["STT workers (GPU)"] == 24


def test_gpu_with_a_measured_figure_uses_it(bench):
    stt = copy.deepcopy(STT)
    stt["summary"]["gpu_audio_seconds_per_second"] = 700.0

    result = plan(bench(stt=stt), gpu=True, gpus_per_node=4)

    assert counts(result)["STT workers (GPU)"] == 11  # 2,500 x 2 / (700 x 0.7) = 10.2
    assert counts(result)["GPU nodes"] == 3  # 4 GPUs a node
    assert not any("ASSUMED" in a.name and "GPU" in a.name for a in result.assumptions)
    assert any("summary.gpu_audio_seconds_per_second" in a.source for a in result.assumptions)


def test_nobody_speaking_needs_no_speech_workers(bench):
    result = plan(bench(), users=5_000, ratio=0.0)

    assert counts(result)["STT workers (CPU)"] == counts(result)["TTS workers (CPU)"] == 0
    assert counts(result)["web pods"] == 3  # 5,000 idle sockets, at most 2,000 a pod
    assert counts(result)["Postgres server connections"] == 0


def test_prices_and_node_shapes_come_from_the_options(bench):
    small = plan(bench(), node_cores=8, cpu_node_price=0.5)

    assert counts(small)["CPU nodes"] == math.ceil(1474 / (8 * 0.8))
    assert small.cost_per_hour == pytest.approx(counts(small)["CPU nodes"] * 0.5)


@pytest.mark.parametrize(
    ("users", "ratio", "message"),
    [
        (-5, 0.3, "--users must be a whole number of at least 1"),
        (0, 0.3, "--users must be a whole number of at least 1"),
        (100, -0.1, "--speaking-ratio must be between 0 and 1"),
        (100, 1.5, "--speaking-ratio must be between 0 and 1"),
        (100, float("nan"), "--speaking-ratio must be between 0 and 1"),
    ],
)
def test_bad_load_is_a_clear_error_before_any_file_is_read(tmp_path, users, ratio, message):
    with pytest.raises(CapacityError, match=message):
        plan(tmp_path / "nothing-here", users=users, ratio=ratio)


@pytest.mark.parametrize(
    ("option", "value"),
    [("node_cores", 0), ("worker_utilisation", 1.5), ("cpu_node_price", -1.0), ("p99_ms", 0.0)],
)
def test_bad_options_are_clear_errors(bench, option, value):
    with pytest.raises(CapacityError, match=f"--{option.replace('_', '-')} must"):
        plan(bench(), **{option: value})


@pytest.mark.parametrize("name", ["density", "stt", "latency", "database"])
def test_a_missing_file_names_itself_and_the_benchmark_that_writes_it(bench, name):
    with pytest.raises(CapacityError) as error:
        plan(bench(**{name: None}))

    assert f"{name}.json is missing" in str(error.value)
    assert f"make bench BENCH={name}" in str(error.value)


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("stt", "audio_seconds_per_cpu_second"),
        ("stt", "cores"),
        ("latency", "tts_audio_seconds_per_cpu_second"),
        ("latency", "reply_audio_seconds_per_turn"),
        ("latency", "turns_per_speaking_minute"),
        ("latency", "stt_cpu_seconds_per_streamed_second"),
        ("database", "sessions"),
        ("database", "postgres_server_connections"),
        ("database", "queries_per_turn"),
    ],
)
def test_a_missing_key_names_the_file_the_key_and_the_benchmark(bench, name, key):
    content = copy.deepcopy(FILES[name])
    del content["summary"][key]

    with pytest.raises(CapacityError) as error:
        plan(bench(**{name: content}))

    assert f"{name}.json has no `summary.{key}`" in str(error.value)
    assert f"make bench BENCH={name}" in str(error.value)


def test_a_missing_density_figure_names_its_key(bench):
    density = copy.deepcopy(DENSITY)
    del density["servers"]["daphne"]["idle"]

    with pytest.raises(CapacityError, match=r"density.json has no `servers.daphne.idle.ping_ms"):
        plan(bench(density=density))


@pytest.mark.parametrize("text", ["{not json", "", '["a", "list"]'])
def test_malformed_json_is_a_clear_error(bench, text):
    with pytest.raises(CapacityError) as error:
        plan(bench(latency=text))

    assert "latency.json" in str(error.value) and "make bench BENCH=latency" in str(error.value)


@pytest.mark.parametrize("value", [0, -2.0, "fast", True, None])
def test_a_figure_that_is_not_a_positive_number_is_refused(bench, value):
    stt = copy.deepcopy(STT)
    stt["summary"]["audio_seconds_per_cpu_second"] = value

    with pytest.raises(CapacityError, match="not a positive number"):
        plan(bench(stt=stt))


def test_no_density_level_meeting_the_target_is_a_clear_error(bench):
    with pytest.raises(CapacityError, match="no streaming level holds ping p99 <= 1 ms"):
        plan(bench(), p99_ms=1.0)


def test_an_stt_worker_larger_than_a_node_is_a_clear_error(bench):
    stt = copy.deepcopy(STT)
    stt["summary"]["cores"] = 32

    with pytest.raises(CapacityError, match="raise --node-cores"):
        plan(bench(stt=stt))
    assert counts(plan(bench(stt=stt), gpu=True))["STT workers (GPU)"] >= 1  # not on a CPU node


def test_the_command_prints_the_plan_with_its_assumptions(bench):
    out = StringIO()

    call_command(
        "capacity_plan",
        "--users=10000",
        "--speaking-ratio=0.25",
        f"--bench-dir={bench()}",
        "--cpu-node-price=1.5",
        stdout=out,
    )

    text = out.getvalue()
    assert text.startswith("Capacity plan: 10,000 users, 25% speaking")
    assert "STT workers (CPU)" in text and "$174.00" in text  # 116 nodes x $1.5
    assert "--cpu-node-price: 1.5  <- option (given)" in text
    assert "--gpu-speedup: 30  <- option (default)" in text


def test_the_command_turns_errors_into_command_errors(bench):
    with pytest.raises(CommandError, match="make bench BENCH=database"):
        call_command(
            "capacity_plan",
            "--users=100",
            "--speaking-ratio=0.3",
            f"--bench-dir={bench(database=None)}",
        )
    with pytest.raises(CommandError, match="--users must be"):
        call_command("capacity_plan", "--users=-1", "--speaking-ratio=0.3")
