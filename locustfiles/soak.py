"""`make soak` (python -m locustfiles.soak): a long Locust run with faults, and an
account of what was lost (docs/reliability.md, "Soak").

It starts the stack the load test starts (locustfiles/run.py): a Redis of its own
(append-only, as a production broker keeps it), Postgres through our PgBouncer on a
fresh `parley_soak` database, Daphne, and one Celery worker per AI stage. Locust
mixes HTTP, voice and text users for --duration. At 30 % of it the STT worker is
SIGKILLed and started again 2 s later (as its supervisor would); at 60 % the Redis
is stopped and started again on the same port and files, 2 s later.

When Locust ends and the stack has had --settle seconds, what the clients were
sent (their --sent-log) is counted against Postgres:
- every `transcript.final` and `reply.done`/`reply.interrupted` a client was sent
  is a stored row (lost: sent but not stored);
- every utterance a client heard end (`speech.end`) has a stored final, or was
  answered `transcript.empty` (lost: neither);
- every stored user turn has a stored reply, and none is left `streaming` (a turn
  stored in the run's last turn timeout is counted apart: its client stopped).

Prints a table, writes `<out>/soak.json` (and docs/benchmarks/soak.json with
--record), and exits 1 if anything was lost. Error rate: Locust's failed requests
over all requests; memory: each process's RSS, sampled every 10 s, as a least-
squares slope in MB per hour.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from locustfiles import run, summary  # noqa: E402

SOAK_DATABASE = "parley_soak"
RECORD = ROOT / "docs" / "benchmarks" / "soak.json"
SAMPLE_EVERY_S = 10.0
TURN_TIMEOUT_S = 60  # Locust's --turn-timeout default (common.py)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="python -m locustfiles.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--users", type=int, default=int(env("SOAK_USERS", "9")))
    parser.add_argument("--duration", default=env("SOAK_DURATION", "10m"), help="e.g. 10m")
    parser.add_argument("--mix", default=env("SOAK_MIX", "http=1,voice=1,text=1"))
    parser.add_argument(
        "--settle",
        type=float,
        default=float(env("SOAK_SETTLE_S", "45")),
        help="seconds the stack gets after Locust ends, before counting",
    )
    parser.add_argument("--out", default=env("SOAK_OUT", str(ROOT / "reports" / "soak")))
    parser.add_argument("--record", action="store_true", help=f"also write {RECORD}")
    args = parser.parse_args(argv)
    problems = []
    if args.users < 3:
        problems.append(
            f"--users (SOAK_USERS) must be at least 3 (one of each kind), not {args.users}"
        )
    if not run.DURATION.match(args.duration) or run.seconds(args.duration) < 60:
        problems.append(f"--duration (SOAK_DURATION) {args.duration!r}: at least 60s, e.g. 10m")
    if args.settle < 0:
        problems.append(f"--settle must be 0 or more, not {args.settle}")
    if problems:
        parser.error("; ".join(problems))
    return args


# --- The account: what clients were sent, against what Postgres holds ----------------

# The events each Locust user records with --sent-log (locustfile.py), and their id.
SENT_KINDS = {
    "speech.end": "utterance_id",
    "transcript.final": "message_id",
    "transcript.empty": "utterance_id",
    "reply.done": "reply_id",
    "reply.interrupted": "reply_id",
}


def sent_record(conversation_id: str, event: dict) -> dict:
    kind = event["type"]
    record = {"conversation": conversation_id, "type": kind, "id": event.get(SENT_KINDS[kind])}
    if kind == "transcript.final":
        record["utterance_id"] = event.get("utterance_id")
    elif kind.startswith("reply."):
        record["status"] = event.get("status")
    return record


@dataclass
class Stored:
    """What Postgres holds for the soak's conversations."""

    messages: dict[str, str]  # message id -> role ("user" or "assistant")
    utterances: set[str]  # utterance ids with a stored final segment
    unanswered: int  # user turns with no reply stored after them, stored before the cutoff
    streaming: int  # replies still `streaming`
    in_flight_at_end: int = 0  # the same, stored in the run's last turn timeout


@dataclass
class Account:
    finals_sent: int = 0
    finals_lost: list[str] = field(default_factory=list)
    replies_sent: int = 0
    replies_lost: list[str] = field(default_factory=list)
    utterances_ended: int = 0
    utterances_lost: list[str] = field(default_factory=list)
    empty: int = 0
    unanswered: int = 0
    streaming: int = 0
    in_flight_at_end: int = 0  # not a loss: its client stopped; a reconnect answers it

    @property
    def lost(self) -> int:
        return (len(self.finals_lost) + len(self.replies_lost) + len(self.utterances_lost)
                + self.unanswered + self.streaming)  # fmt: skip


def account(sent: list[dict], stored: Stored) -> Account:
    """Count what the clients were sent against what is stored (each id once:
    a socket that resumed is sent the turns it missed again)."""
    finals = {r["id"] for r in sent if r["type"] == "transcript.final"}
    replies = {r["id"] for r in sent if r["type"] in ("reply.done", "reply.interrupted")}
    ended = {r["id"] for r in sent if r["type"] == "speech.end"}
    answered = {r["utterance_id"] for r in sent if r["type"] == "transcript.final"}
    empty = {r["id"] for r in sent if r["type"] == "transcript.empty"}
    return Account(
        finals_sent=len(finals),
        finals_lost=sorted(f for f in finals if stored.messages.get(f) != "user"),
        replies_sent=len(replies),
        replies_lost=sorted(r for r in replies if stored.messages.get(r) != "assistant"),
        utterances_ended=len(ended),
        utterances_lost=sorted(u for u in ended - answered - empty if u not in stored.utterances),
        empty=len(ended & empty),
        unanswered=stored.unanswered,
        streaming=stored.streaming,
        in_flight_at_end=stored.in_flight_at_end,
    )


def sent_read(folder: Path) -> list[dict]:
    records: list[dict] = []
    for path in sorted(folder.glob("sent-*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line]
    return records


def stored_read(conversation_ids: set[str], cutoff: datetime) -> Stored:
    """Django is set up by the caller, on the soak's database. A user turn with no
    reply counts as lost when it was stored before `cutoff` (the run's end less a
    turn timeout); one stored later was in flight when its client stopped (the
    server answers it when the client reconnects, socket_resume)."""
    from apps.conversations.models import Message, TranscriptSegment

    rows = Message.objects.filter(conversation_id__in=conversation_ids)
    messages = {str(m_id): role for m_id, role in rows.values_list("id", "role")}
    utterances = set(
        TranscriptSegment.objects.filter(conversation_id__in=conversation_ids)
        .values_list("utterance_id", flat=True)
    )  # fmt: skip
    unanswered = in_flight = 0
    for conversation_id in conversation_ids:
        turns = list(
            Message.objects.filter(conversation_id=conversation_id)
            .order_by("seq").values_list("role", "created_at")
        )  # fmt: skip
        for n, (role, created_at) in enumerate(turns):
            if role != Message.Role.USER or any(
                later == Message.Role.ASSISTANT for later, _ in turns[n + 1 :]
            ):
                continue
            if created_at < cutoff:
                unanswered += 1
            else:
                in_flight += 1
    streaming = rows.filter(role=Message.Role.ASSISTANT, status=Message.Status.STREAMING).count()
    return Stored(messages, {u for u in utterances if u}, unanswered, streaming, in_flight)


# --- Memory ----------------------------------------------------------------------------


def slope_per_hour(samples: list[tuple[float, int]]) -> float | None:
    """Least-squares slope of (seconds, bytes) samples, in MB per hour."""
    if len(samples) < 3:
        return None
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_b = sum(b for _, b in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    if not var:
        return None
    cov = sum((t - mean_t) * (b - mean_b) for t, b in samples)
    return cov / var * 3600 / 1e6


class Sampler(threading.Thread):
    """RSS of each named process every SAMPLE_EVERY_S; a restarted one is a new series."""

    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__(name="soak-rss", daemon=True)
        self.pids = pids  # name -> pid, updated when a process is restarted
        self.samples: dict[str, list[tuple[float, int]]] = {}
        self.started = time.monotonic()
        self.done = threading.Event()

    def run(self) -> None:
        from benchmarks import stack

        while not self.done.wait(SAMPLE_EVERY_S):
            for name, pid in list(self.pids.items()):
                try:
                    rss = stack.rss_bytes(pid)
                except OSError:
                    continue
                if not rss:  # killed, not yet reaped: a zombie has no memory
                    continue
                key = f"{name} (pid {pid})"
                self.samples.setdefault(key, []).append((time.monotonic() - self.started, rss))


# --- The run ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    sent_dir = out / "sent"
    out.mkdir(parents=True, exist_ok=True)
    for old in sent_dir.glob("sent-*.jsonl"):
        old.unlink()
    procs: list = []
    try:
        report = soak(args, out, sent_dir, procs)
    finally:
        for proc in reversed(procs):
            proc.stop()
    print_report(report)
    (out / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.record:
        RECORD.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nreports: {out / 'soak.json'}, {out / 'loadtest_stats.csv'}, {out / 'locust.log'}")
    return 1 if report["account"]["lost"] or report["locust_exit"] not in (0, 1) else 0


@dataclass
class SoakStack:
    env: dict
    web: object
    workers: dict
    redis: object
    persist: Path
    pids: dict  # name -> pid, for the sampler (a restarted process replaces its pid)


def stack_start(args: argparse.Namespace, out: Path, procs: list) -> SoakStack:
    import subprocess

    from benchmarks import density, latency, stack

    persist = out / "redis"  # the append-only file of the last run's Redis goes
    shutil.rmtree(persist, ignore_errors=True)
    persist.mkdir()
    redis = stack.redis_start(persist_dir=persist)
    procs.append(redis.proc)
    stack.services_up()
    stack.database_recreate(SOAK_DATABASE)
    env = density.bench_env(redis)
    env.update(DATABASE_URL=stack.database_url(SOAK_DATABASE), CELERY_BROKER_URL=redis.url(3),
               LOG_LEVEL="WARNING")  # fmt: skip
    stack.migrate(env)
    users = ["--users", str(args.users), "--out", str(out / "users.json")]
    seeds = (["seed_demo"], ["loadtest_seed", *users])
    for command in seeds:
        subprocess.run([sys.executable, "manage.py", *command], cwd=ROOT, env=env, check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
    web = density.web_start("daphne", env, None, procs)
    density.web_wait(web)
    workers = {role: latency.worker_start(role, env, None, procs) for role in ("stt", "tts")}
    pids = {"daphne": web.pid, **{f"{role} worker": w.pid for role, w in workers.items()}}
    return SoakStack(env=env, web=web, workers=workers, redis=redis, persist=persist, pids=pids)


def faults_inject(soak: SoakStack, duration_s: float, procs: list, faults: list[dict]) -> None:
    """At 30 % of the run, SIGKILL the STT worker and start it again 2 s later; at
    60 %, stop the Redis and start it again on its port and files 2 s later."""
    from benchmarks import latency, stack

    started = time.monotonic()

    def note(what: str) -> None:
        faults.append({"at_s": round(time.monotonic() - started), "fault": what})

    time.sleep(duration_s * 0.3)
    victim = soak.workers["stt"]
    os.kill(victim.pid, signal.SIGKILL)
    note(f"SIGKILL the stt worker (pid {victim.pid})")
    time.sleep(2)
    soak.workers["stt"] = latency.worker_start("stt", soak.env, None, procs)
    soak.pids["stt worker"] = soak.workers["stt"].pid
    note(f"stt worker started again (pid {soak.workers['stt'].pid}) and ready")
    time.sleep(max(0.0, duration_s * 0.6 - (time.monotonic() - started)))
    down = time.monotonic()
    soak.redis.proc.stop()
    note("Redis stopped (SIGTERM)")
    time.sleep(2)
    again = stack.redis_start(port=soak.redis.port, persist_dir=soak.persist)
    procs.append(again.proc)
    soak.redis.proc = again.proc
    note(f"Redis answering again, {time.monotonic() - down:.1f} s after it was stopped")


def soak(args: argparse.Namespace, out: Path, sent_dir: Path, procs: list) -> dict:
    from benchmarks import stack

    built = stack_start(args, out, procs)
    sampler = Sampler(built.pids)
    sampler.start()
    duration_s = run.seconds(args.duration)
    faults: list[dict] = []
    injector = threading.Thread(target=faults_inject, args=(built, duration_s, procs, faults),
                                name="soak-faults", daemon=True)  # fmt: skip
    injector.start()
    locust = argparse.Namespace(
        users=args.users, spawn_rate=max(1.0, args.users / 10), duration=args.duration,
        mix=args.mix, audio_dir="", processes=0, locust_args=["--sent-log", str(sent_dir)],
    )  # fmt: skip
    users_file = str(out / "users.json")
    code = run.locust_run(run.locust_command(locust, built.web.origin, users_file, out), out)
    cutoff = datetime.now(UTC) - timedelta(seconds=TURN_TIMEOUT_S)
    injector.join(timeout=120)
    time.sleep(args.settle)
    sampler.done.set()

    os.environ.update(built.env)
    import django

    django.setup()
    sent = sent_read(sent_dir)
    conversations = {r["conversation"] for r in sent if r["conversation"]}
    tally = account(sent, stored_read(conversations, cutoff))
    stats = out / f"{run.PREFIX}_stats.csv"
    rows = summary.rows_read(stats) if stats.exists() else []
    total = next((r for r in rows if r.name == "Aggregated"), None)
    requests, failures = (total.count, total.failures) if total else (0, 0)
    return {
        "benchmark": "soak",
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python -m locustfiles.soak " + " ".join(sys.argv[1:]),
        "machine": stack.machine_info(),
        "git": stack.git_commit(),
        "users": args.users,
        "duration": args.duration,
        "mix": args.mix,
        "faults": faults,
        "locust_exit": code,
        "requests": requests,
        "failures": failures,
        "error_rate": round(failures / requests, 4) if requests else None,
        "failures_by_name": {
            f"{r.type} {r.name}": r.failures for r in rows if r.failures and r.name != "Aggregated"
        },
        "account": {**asdict(tally), "lost": tally.lost},
        "memory": {name: _memory(samples) for name, samples in sampler.samples.items()},
    }


def _memory(samples: list[tuple[float, int]]) -> dict:
    """RSS first and last, and its slope over the whole run and over its second half
    (the first minutes include warming up: model caches, pools, the allocator's arenas)."""
    return {
        "first_mb": round(samples[0][1] / 1e6, 1),
        "last_mb": round(samples[-1][1] / 1e6, 1),
        "samples": len(samples),
        "growth_mb_per_hour": _round(slope_per_hour(samples)),
        "second_half_growth_mb_per_hour": _round(slope_per_hour(samples[len(samples) // 2 :])),
    }


def _rate(mb_per_hour: float | None) -> str:
    return "n/a" if mb_per_hour is None else f"{mb_per_hour:+.1f} MB/h"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def print_report(report: dict) -> None:
    a = report["account"]
    print(f"\nSoak: {report['users']} users ({report['mix']}), {report['duration']}")
    for fault in report["faults"]:
        print(f"  at {fault['at_s']:>4} s  {fault['fault']}")
    print(f"\nrequests {report['requests']}, failed {report['failures']}"
          f" (error rate {report['error_rate']})")  # fmt: skip
    for name, n in report["failures_by_name"].items():
        print(f"  failed: {name}: {n}")
    print("\n what                      sent/stored   lost")
    print(f" final transcripts          {a['finals_sent']:>11}   {len(a['finals_lost'])}")
    print(f" replies                    {a['replies_sent']:>11}   {len(a['replies_lost'])}")
    print(f" utterances ended           {a['utterances_ended']:>11}   {len(a['utterances_lost'])}"
          f"   ({a['empty']} heard as silence)")  # fmt: skip
    print(f" user turns with no reply   {'':>11}   {a['unanswered']}")
    print(f" replies left streaming     {'':>11}   {a['streaming']}")
    print(f" (turns in flight at the end, answered on reconnect: {a['in_flight_at_end']})")
    print("\n process                         RSS first → last       growth  (second half)")
    for name, m in report["memory"].items():
        whole, half = (
            _rate(m[k]) for k in ("growth_mb_per_hour", "second_half_growth_mb_per_hour")
        )
        print(f" {name:<30} {m['first_mb']:>7.1f} → {m['last_mb']:>7.1f} MB  {whole}  ({half})")
    print(f"\n{'NOTHING LOST' if not a['lost'] else 'LOST: ' + str(a['lost'])}")


if __name__ == "__main__":
    sys.exit(main())
