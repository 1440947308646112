"""The measured figures a capacity plan rests on, read from the latest benchmark
results (docs/benchmarks/*.json), each with the file and key it came from. A
missing file or key, or a value that is not a positive number, is a
CapacityError that names it and the `make bench` command that writes it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SERVER = "daphne"  # the web server the product runs, and density measures first


class CapacityError(ValueError):
    """A bad input, or a benchmark figure that is missing or malformed: the message
    names it and the command that measures it."""


@dataclass(frozen=True)
class Assumption:
    name: str
    value: float
    source: str


@dataclass(frozen=True)
class Benchmarks:
    """The measured figures the plan uses, each with where it was read."""

    streaming_per_pod: Assumption
    streaming_cpu_percent: Assumption  # of one core, per streaming session, at that level
    streaming_rss_kb: Assumption
    rss_base_mb: Assumption
    idle_per_pod: Assumption
    idle_cpu_percent: Assumption
    idle_rss_kb: Assumption
    redis_cpu_percent: Assumption  # per streaming session
    stt_per_core: Assumption  # raw model throughput on whole clips
    stt_cores: Assumption
    stt_cpu_per_streamed_s: Assumption  # the live STT stage's whole cost, per streamed second
    stt_per_gpu: Assumption | None
    tts_per_core: Assumption
    reply_audio_s: Assumption
    turns_per_minute: Assumption
    db_sessions: Assumption
    db_server_connections: Assumption
    queries_per_turn: Assumption


class _Results:
    """One benchmark's JSON file, read with errors that say how to fix them."""

    def __init__(self, bench_dir: Path, name: str) -> None:
        self.name = name
        self.path = bench_dir / f"{name}.json"
        self.shown = _shown(self.path)
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            raise CapacityError(self._fix(f"{self.shown} is missing")) from None
        except OSError as exc:
            raise CapacityError(self._fix(f"{self.shown} cannot be read ({exc})")) from None
        try:
            self.data = json.loads(text)
        except json.JSONDecodeError as exc:
            message = f"{self.shown} is not valid JSON ({exc.msg} at line {exc.lineno})"
            raise CapacityError(self._fix(message)) from None
        if not isinstance(self.data, dict):
            raise CapacityError(self._fix(f"{self.shown} does not hold a JSON object"))

    def _fix(self, problem: str) -> str:
        return f"{problem}: run `make bench BENCH={self.name}` to write it"

    def get(self, key: str) -> Any:
        """The value at a dotted key (`a.b[2].c`); CapacityError when it is absent."""
        value: Any = self.data
        for part in key.replace("[", ".[").split("."):
            try:
                if part.startswith("["):
                    value = value[int(part[1:-1])]
                else:
                    value = value[part]
            except (KeyError, IndexError, TypeError, ValueError):
                raise CapacityError(self._fix(f"{self.shown} has no `{key}`")) from None
        return value

    def number(self, name: str, key: str, *, why: str = "") -> Assumption:
        value = self.get(key)
        positive = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
        if not positive or not math.isfinite(value):
            problem = f"{self.shown}: `{key}` is {value!r}, not a positive number"
            raise CapacityError(self._fix(problem))
        return Assumption(name, float(value), f"{self.shown}: {key}{why}")


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def bench_read(bench_dir: Path, *, p99_ms: float) -> Benchmarks:
    """The figures from density.json, stt.json, latency.json and database.json."""
    density = _Results(bench_dir, "density")
    server = f"servers.{SERVER}"
    level = _density_level(density, server, p99_ms)
    at = f" (the largest streaming level with ping p99 <= {p99_ms:g} ms and no socket error)"
    idle = f"{server}.idle"
    _meets(density, idle, p99_ms)
    stt = _Results(bench_dir, "stt")
    gpu = "summary.gpu_audio_seconds_per_second"
    latency = _Results(bench_dir, "latency")
    database = _Results(bench_dir, "database")
    return Benchmarks(
        streaming_per_pod=density.number(
            "streaming sessions a web pod", f"{level}.sessions", why=at
        ),
        streaming_cpu_percent=density.number(
            "web CPU % a streaming session", f"{level}.cpu_percent_per_session"
        ),
        streaming_rss_kb=density.number(
            "web memory KB a streaming session", f"{level}.rss_per_session_kb"
        ),
        rss_base_mb=density.number("web pod memory MB with no session", f"{server}.rss_base_mb"),
        idle_per_pod=density.number("idle sockets a web pod (the most measured)", f"{idle}.opened"),
        idle_cpu_percent=density.number(
            "web CPU % an idle socket", f"{idle}.cpu_percent_per_session"
        ),
        idle_rss_kb=density.number(
            "web memory KB an idle socket (upper bound)", f"{idle}.rss_per_session_kb"
        ),
        redis_cpu_percent=_redis_cpu(density, level),
        stt_per_core=stt.number(
            "STT audio seconds a CPU second (raw model, whole clips)",
            "summary.audio_seconds_per_cpu_second",
        ),
        stt_cores=stt.number("cores of one STT worker (as measured)", "summary.cores"),
        stt_per_gpu=(
            stt.number("STT audio seconds a second on one GPU", gpu) if _has(stt, gpu) else None
        ),
        stt_cpu_per_streamed_s=latency.number(
            "STT worker CPU seconds a second of streamed audio (drafts, candidates and "
            "finals, at the most speakers)",
            "summary.stt_cpu_seconds_per_streamed_second",
        ),
        tts_per_core=latency.number(
            "TTS audio seconds a CPU second", "summary.tts_audio_seconds_per_cpu_second"
        ),
        reply_audio_s=latency.number(
            "reply audio seconds a turn", "summary.reply_audio_seconds_per_turn"
        ),
        turns_per_minute=latency.number(
            "turns a speaking minute", "summary.turns_per_speaking_minute"
        ),
        db_sessions=database.number("sessions in the database benchmark", "summary.sessions"),
        db_server_connections=database.number(
            "Postgres server connections at those sessions", "summary.postgres_server_connections"
        ),
        queries_per_turn=database.number("queries a turn", "summary.queries_per_turn"),
    )


def _has(results: _Results, key: str) -> bool:
    try:
        results.get(key)
    except CapacityError:
        return False
    return True


def _meets(density: _Results, key: str, p99_ms: float) -> None:
    p99, errors = density.get(f"{key}.ping_ms.p99"), density.get(f"{key}.socket_errors")
    if not isinstance(p99, int | float) or not isinstance(errors, int):
        raise CapacityError(density._fix(f"{density.shown}: `{key}` has no ping p99 or errors"))
    if p99 > p99_ms or errors:
        raise CapacityError(
            f"{density.shown}: `{key}` missed the target (ping p99 {p99} ms, "
            f"{errors} socket errors; the plan needs p99 <= {p99_ms:g} ms and none): "
            f"run `make bench BENCH=density` on a quieter machine or raise --p99-ms"
        )


def _density_level(density: _Results, server: str, p99_ms: float) -> str:
    levels = density.get(f"{server}.levels")
    if not isinstance(levels, list):
        raise CapacityError(density._fix(f"{density.shown}: `{server}.levels` is not a list"))
    best, best_sessions = "", 0.0
    for i, level in enumerate(levels):
        key = f"{server}.levels[{i}]"
        if not isinstance(level, dict) or level.get("mode") != "stream":
            continue
        try:
            _meets(density, key, p99_ms)
        except CapacityError:
            continue
        sessions = density.number("sessions", f"{key}.sessions").value
        if sessions > best_sessions:
            best, best_sessions = key, sessions
    if not best:
        raise CapacityError(
            f"{density.shown}: no streaming level holds ping p99 <= {p99_ms:g} ms with no "
            f"socket error: run `make bench BENCH=density` (or raise --p99-ms)"
        )
    return best


def _redis_cpu(density: _Results, level: str) -> Assumption:
    total = density.number("Redis CPU %", f"{level}.redis_cpu_percent")
    sessions = density.number("sessions", f"{level}.sessions")
    return Assumption(
        "Redis CPU % a streaming session (web tier's traffic)",
        total.value / sessions.value,
        f"{density.shown}: {level}.redis_cpu_percent / sessions",
    )
