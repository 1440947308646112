"""What the benchmarks share: the Postgres database behind our PgBouncer, a Redis
server of their own, processes started (and stopped) by pid, pinned to a core,
with room for many sockets, and what a report says about the machine.

Module level imports only the standard library, so that a benchmark's load
generator does not pay for Django.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.live import free_port, log_tail, wait_until  # noqa: E402, F401  (standard library only)

LOG_DIR = ROOT / "var" / "bench-logs"
BENCH_DATABASE = "parley_bench"
PGBOUNCER_PORT = os.environ.get("PGBOUNCER_PORT", "6432")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank percentile of `values` (q in 0..1), or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


# --- Postgres through PgBouncer ----------------------------------------------------


def services_up() -> None:
    """Postgres (and the machine's Redis) if they are down, and our PgBouncer."""
    subprocess.run(
        ["bash", "scripts/services.sh", "up"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL
    )


def database_recreate(name: str = BENCH_DATABASE) -> None:
    """Drop and create `name` on Postgres itself (not through PgBouncer)."""
    for sql in (f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", f"CREATE DATABASE {name}"):
        psql = ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-qc", sql]
        subprocess.run(psql, check=True)


def database_url(name: str = BENCH_DATABASE) -> str:
    """`name` through our PgBouncer."""
    return f"postgres://postgres@127.0.0.1:{PGBOUNCER_PORT}/{name}"


def migrate(env: Mapping[str, str]) -> None:
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=dict(env), check=True
    )


# --- Processes -------------------------------------------------------------------------


def raise_nofile(wanted: int = 65_536) -> int:
    """Raise this process's open-files limit towards `wanted` (the hard limit too,
    when allowed); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limits in ((wanted, max(wanted, hard)), (min(wanted, hard), hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def pinned(command: list[str], core: int | None) -> list[str]:
    """`command` run on one CPU core (taskset execs it: the pid stays the same)."""
    return command if core is None else ["taskset", "-c", str(core), *command]


@dataclass
class Proc:
    """A subprocess in its own session, logging to var/bench-logs."""

    name: str
    process: subprocess.Popen
    log_path: Path
    log_file: IO[bytes] = field(repr=False)
    stopped: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to its process group, then SIGKILL to what is left (once)."""
        if self.stopped:
            return
        self.stopped = True
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(grace_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)
        self.log_file.close()

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)


def spawn(command: list[str], env: Mapping[str, str], name: str, *, nofile: int = 65_536) -> Proc:
    """Start `command` in ROOT with `env`, its open-files limit raised."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"{name}.log"
    log_file = open(log_path, "wb")  # closed by Proc.stop
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=lambda: raise_nofile(nofile),
    )
    return Proc(name=name, process=process, log_path=log_path, log_file=log_file)


def pin(pid: int, core: int) -> None:
    """Move every thread of a running process to `core`."""
    subprocess.run(["taskset", "-a", "-cp", str(core), str(pid)], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of `pid`, in seconds (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of stat


def rss_bytes(pid: int) -> int:
    """VmRSS of `pid` (/proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# --- Redis of our own ------------------------------------------------------------------


@dataclass
class RedisServer:
    proc: Proc
    port: int

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        self.proc.stop()


def redis_start(
    core: int | None = None,
    timeout_s: float = 30.0,
    *,
    port: int | None = None,
    persist_dir: Path | None = None,
) -> RedisServer:
    """A throwaway `redis-server`, stopped by pid: on a free port (or `port`, to start
    one again), with no persistence (or an append-only file in `persist_dir`, as a
    production broker keeps, so that a restart keeps its queues)."""
    port = port or free_port()
    persistence = ["--appendonly", "no"] if persist_dir is None else [
        "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(persist_dir)]  # fmt: skip
    command = [
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        *persistence, "--maxclients", "60000", "--daemonize", "no",
    ]  # fmt: skip
    proc = spawn(pinned(command, core), os.environ, f"redis-{port}")

    def answers() -> bool:
        reply = subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(port), "ping"],
            capture_output=True,
            text=True,
        )
        return reply.stdout.strip() == "PONG"

    wait_until(answers, proc, f"redis-server on port {port}", timeout_s)
    return RedisServer(proc=proc, port=port)


# --- What a report says about where it ran ---------------------------------------------


def machine_info() -> dict:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory_mb = None
    with contextlib.suppress(OSError), open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                memory_mb = int(line.split()[1]) // 1024
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model or platform.processor(),
        "memory_mb": memory_mb,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def git_commit() -> dict:
    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def run_and_write(args, run, table) -> None:
    """Run a benchmark (`run(args, procs)` appends each process it starts to procs,
    all stopped here by pid, whatever happens), print its table, write its JSON
    to `args.out`."""
    import json

    procs: list = []
    try:
        report = run(args, procs)
    finally:
        for proc in reversed(procs):
            proc.stop()
    print(table(report))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
