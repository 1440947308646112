"""`make loadtest` (python -m locustfiles.run): a bounded, headless Locust run.

Without --host it starts the stack itself, the way the latency benchmark does
(benchmarks/stack.py): a Redis of its own, Postgres through our PgBouncer on a
fresh `parley_loadtest` database, Daphne, and one Celery worker per AI stage
(`python -m config.worker stt` and `... tts`); it seeds the demo personas and
the load-test users, runs Locust against Daphne, and stops, by pid, only what
it started. With --host it runs Locust against that server and its --users-file.

Writes `<out>/loadtest_stats.csv` (and Locust's other CSVs), `<out>/loadtest.html`
and `<out>/locust.log`, prints the summary table (locustfiles/summary.py), and
exits 1 when any request failed or Locust did.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from locustfiles import summary  # noqa: E402

LOADTEST_DATABASE = "parley_loadtest"
PREFIX = "loadtest"
DURATION = re.compile(r"^\d+[smh]?$|^(\d+h)?(\d+m)?(\d+s)?$")
# Locust stops itself at --run-time; past that plus this, it is stopped and the run fails.
STOP_GRACE_S = 60
KILL_GRACE_S = 10  # from SIGTERM to SIGKILL


def say(message: str) -> None:
    print(f"loadtest: {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m locustfiles.run", description=__doc__)
    parser.add_argument("--users", type=int, default=int(env("LOADTEST_USERS", "8")))
    parser.add_argument("--spawn-rate", type=float, default=float(env("LOADTEST_SPAWN_RATE", "2")))
    parser.add_argument("--duration", default=env("LOADTEST_DURATION", "2m"), help="e.g. 90s, 2m")
    parser.add_argument("--mix", default=env("LOADTEST_MIX", "http=2,voice=1,text=1"))
    parser.add_argument("--out", default=env("LOADTEST_OUT", str(ROOT / "reports" / "loadtest")))
    parser.add_argument(
        "--host", default=env("LOADTEST_HOST", ""), help="a running server: start no stack"
    )
    parser.add_argument(
        "--users-file",
        default=env("LOADTEST_USERS_FILE", ""),
        help="accounts of `manage.py loadtest_seed` (with --host; else seeded here)",
    )
    parser.add_argument("--audio-dir", default=env("LOADTEST_AUDIO_DIR", ""))
    parser.add_argument(
        "--processes",
        type=int,
        default=int(env("LOADTEST_PROCESSES", "0")),
        help="Locust worker processes (its --processes); 0: one process",
    )
    parser.add_argument(
        "locust_args", nargs=argparse.REMAINDER, help="after --: more arguments for Locust"
    )
    args = parser.parse_args(argv)
    problems = []
    if args.users < 1:
        problems.append(f"--users (LOADTEST_USERS) must be at least 1, not {args.users}")
    if args.spawn_rate <= 0:
        problems.append(f"--spawn-rate (LOADTEST_SPAWN_RATE) must be positive: {args.spawn_rate}")
    if not DURATION.match(args.duration) or not re.search(r"\d", args.duration):
        problems.append(f"--duration (LOADTEST_DURATION) {args.duration!r}: expected 90s or 2m")
    if args.processes < 0:
        problems.append(f"--processes must be 0 or more, not {args.processes}")
    if args.host and not args.users_file:
        problems.append("--host needs --users-file: run `manage.py loadtest_seed` on its database")
    if problems:
        parser.error("; ".join(problems))
    if args.locust_args[:1] == ["--"]:
        args.locust_args = args.locust_args[1:]
    return args


def locust_command(args: argparse.Namespace, host: str, users_file: str, out: Path) -> list[str]:
    command = [
        sys.executable, "-m", "locust", "-f", str(ROOT / "locustfiles" / "locustfile.py"),
        "--headless", "--host", host, "--users", str(args.users),
        "--spawn-rate", str(args.spawn_rate), "--run-time", args.duration,
        "--users-file", users_file, "--mix", args.mix,
        "--csv", str(out / PREFIX), "--html", str(out / f"{PREFIX}.html"),
        "--logfile", str(out / "locust.log"), "--only-summary",
    ]  # fmt: skip
    if args.audio_dir:
        command += ["--audio-dir", args.audio_dir]
    if args.processes:
        command += ["--processes", str(args.processes)]
    return command + args.locust_args


def locust_run(command: list[str], out: Path) -> int:
    """Run Locust (its own summary goes to out/locust-summary.txt); its exit code."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{PREFIX}*"):  # no stale CSV may pass for this run's
        old.unlink()
    say(" ".join(command[2:]))
    with open(out / "locust-summary.txt", "wb") as printed:
        locust = subprocess.Popen(
            command, cwd=ROOT, stdout=printed, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            return locust.wait(timeout=seconds(duration_of(command)) + STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            stop_group(locust)
    say(f"Locust did not stop within {STOP_GRACE_S} s of its run time: stopped; the run fails")
    return 1


def duration_of(command: list[str]) -> str:
    return command[command.index("--run-time") + 1]


def seconds(duration: str) -> int:
    """A --duration (90s, 2m, 1h30m, or bare seconds) in seconds."""
    if duration.isdigit():
        return int(duration)
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(int(n) * units[unit] for n, unit in re.findall(r"(\d+)([hms])", duration))


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM Locust's process group (its --processes workers too), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=KILL_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def spawned(out: Path) -> dict[str, int]:
    """How many users of each kind Locust started, from its log."""
    found: dict[str, int] = {}
    log = out / "locust.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    for match in re.finditer(r"All users spawned: (\{.*?\})", text):
        found = json.loads(match.group(1))
    return found


def stack_run(args: argparse.Namespace, out: Path, procs: list) -> int:
    """Start the stack, seed it, run Locust against it; Locust's exit code."""
    from benchmarks import density, latency, stack

    redis = stack.redis_start()
    procs.append(redis.proc)
    stack.services_up()
    stack.database_recreate(LOADTEST_DATABASE)
    env = density.bench_env(redis)
    env.update(
        DATABASE_URL=stack.database_url(LOADTEST_DATABASE),
        CELERY_BROKER_URL=redis.url(3),
        LOG_LEVEL="WARNING",
    )
    stack.migrate(env)
    users_file = str(out / "users.json")
    seeds = (["seed_demo"], ["loadtest_seed", "--users", str(args.users), "--out", users_file])
    for command in seeds:
        subprocess.run(
            [sys.executable, "manage.py", *command], cwd=ROOT, env=env, check=True,
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
    web = density.web_start("daphne", env, None, procs)
    density.web_wait(web)
    workers = {role: latency.worker_start(role, env, None, procs) for role in ("stt", "tts")}
    say(
        f"stack up: Daphne {web.origin} (pid {web.pid}), "
        + ", ".join(f"{role} worker pid {w.pid}" for role, w in workers.items())
        + f"; logs in {stack.LOG_DIR}"
    )
    return locust_run(locust_command(args, web.origin, users_file, out), out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.host:
        code = locust_run(locust_command(args, args.host, args.users_file, out), out)
    else:
        procs: list = []
        try:
            code = stack_run(args, out, procs)
        finally:
            for proc in reversed(procs):
                proc.stop()
    stats = out / f"{PREFIX}_stats.csv"
    if not stats.exists():
        say(f"Locust wrote no stats (exit code {code}); its output:")
        print(summary_tail(out / "locust-summary.txt"), file=sys.stderr)
        return code or 1
    kinds = ", ".join(f"{n} {name}" for name, n in spawned(out).items()) or "unknown"
    print(f"\nLocust run: {args.users} users ({kinds}), {args.duration}, mix {args.mix}\n")
    verdict = summary.main([str(stats)])
    print(f"\nreports: {stats}, {out / (PREFIX + '.html')}, {out / 'locust.log'}")
    return verdict or code


def summary_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(nothing at {path})"


if __name__ == "__main__":
    sys.exit(main())
