"""Overload at the door: `make bench BENCH=overload` (python -m benchmarks.overload).

One STT worker pinned to core 1 (one model thread) and Daphne pinned to core 0,
with the load generator, on the stack the latency benchmark starts. Speakers
arrive one every --every seconds, up to --speakers; each that is admitted speaks
--clips clips at real-time pace (each followed by 2 s of silence), waiting for
each reply before the next. A speaker refused at the door (close 1013,
`overloaded`) is counted and does not retry.

The run is made three times, side by side, with the same arrivals: admission
against capacity (STT_SESSIONS_PER_WORKER=--per-worker, the backlog bound too),
against the backlog only (STT_BACKLOG_REFUSE=--bound), and none. The `stt`
queue depth is read every 250 ms. Reported for each: the speakers admitted and
refused, the maximum and p95 queue depth, and the admitted speakers' onset →
first partial and speech end → final (p50, p95). Prints a table, writes
docs/benchmarks/overload.json.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import density, latency, stack  # noqa: E402

OUT = ROOT / "docs" / "benchmarks" / "overload.json"
SAMPLE_S = 0.25


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speakers", type=int, default=12, help="arrivals in all")
    parser.add_argument("--every", type=float, default=2.0, help="seconds between arrivals")
    parser.add_argument("--clips", type=int, default=3, help="clips per admitted speaker")
    parser.add_argument("--bound", type=int, default=6, help="STT_BACKLOG_REFUSE of the run")
    parser.add_argument(
        "--per-worker",
        type=int,
        default=4,
        help="STT_SESSIONS_PER_WORKER of the capacity run (the latency benchmark meets "
        "its targets at 4 speakers on one worker)",
    )
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    if min(args.speakers, args.clips, args.bound, args.per_worker) < 1 or args.every <= 0:
        parser.error(
            "--speakers, --clips, --bound and --per-worker must be at least 1; --every positive"
        )
    return args


def speaker(web, user, clips: list[str], admitted: list, refused: list) -> list[dict]:
    """Connect; when refused, note it and stop; else speak the clips."""
    from apps.pipeline.talk_client import TalkClient
    from tests.audio import pcm_of

    conversation_id, session_key = user
    client = TalkClient(web.ws_url(conversation_id), session_cookie=session_key, origin=web.origin)
    first = client.connect()
    if first.get("type") != "ready":
        client.closed.wait(5)
        refused.append({"code": first.get("code"), "close": client.close_code})
        client.close()
        return []
    admitted.append(conversation_id)
    turns = []
    for clip in clips:
        pcm = pcm_of(clip)
        after = len(client.received)
        started = client.now()
        client.stream(pcm + latency.SILENCE)
        turns.extend(latency.turn_times(client, after, started, latency.speech_marks(pcm), clip))
    client.close()
    return turns


def variant_run(
    bound: int, per_worker: int, args, env: dict, users, clips: list[str], procs: list
) -> dict:
    """A fresh Daphne and STT worker with STT_BACKLOG_REFUSE=bound and
    STT_SESSIONS_PER_WORKER=per_worker; the arrivals."""
    import redis

    env = {**env, "STT_BACKLOG_REFUSE": str(bound), "STT_SESSIONS_PER_WORKER": str(per_worker),
           "STT_CPU_THREADS": "1"}  # fmt: skip
    store = redis.Redis.from_url(env["AUDIO_STORE_URL"])
    for key in store.scan_iter("stt:worker:*"):
        store.delete(key)  # an earlier run's worker, if it did not say goodbye
    web = density.web_start("daphne", env, 0, procs)
    density.web_wait(web)
    workers = {"stt": latency.worker_start("stt", env, 1, procs),
               "tts": latency.worker_start("tts", env, 0, procs)}  # fmt: skip
    broker = redis.Redis.from_url(env["CELERY_BROKER_URL"])
    broker.delete("stt")
    while not list(store.scan_iter("stt:worker:*")):  # the worker is ready: it registered
        time.sleep(0.2)
    depths: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(SAMPLE_S):
            depths.append(int(broker.llen("stt")))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    admitted: list = []
    refused: list = []
    began = time.monotonic()
    with ThreadPoolExecutor(args.speakers) as pool:
        futures = []
        for n, user in enumerate(users):
            time.sleep(max(0.0, began + n * args.every - time.monotonic()))
            order = clips[n % len(clips) :] + clips[: n % len(clips)]
            futures.append(pool.submit(speaker, web, user, order, admitted, refused))
        runs = [f.result() for f in futures]
    stop.set()
    sampler.join()
    for proc in (*workers.values(), web.proc):
        proc.stop()
    turns = [turn for run_ in runs for turn in run_]
    label = (
        f"capacity {per_worker}/worker" if per_worker else f"backlog {bound}" if bound else "none"
    )
    latency.say(f"{label}: {len(admitted)} admitted, {len(refused)} refused, "
                f"{len(turns)} turns, max depth {max(depths, default=0)}")  # fmt: skip
    return {
        "bound": bound,
        "per_worker": per_worker,
        "admitted": len(admitted),
        "refused": len(refused),
        "refusals": refused,
        "turns": len(turns),
        "wall_s": round(time.monotonic() - began, 1),
        "depth_max": max(depths, default=0),
        "depth_p95": stack.percentile([float(d) for d in depths], 0.95),
        "stages": latency.summarize(turns),
    }


def run(args, procs: list) -> dict:
    import os

    redis = stack.redis_start(core=0)
    procs.append(redis.proc)
    stack.services_up()
    stack.database_recreate(stack.BENCH_DATABASE)
    env = density.bench_env(redis)
    env["CELERY_BROKER_URL"] = redis.url(3)
    env["AUDIO_STORE_URL"] = redis.url(4)
    stack.migrate(env)
    os.environ.update(env)
    import django

    django.setup()
    from apps.personas.demo import demo_seed
    from tests.audio import english_clips

    demo_seed()
    clips = sorted(english_clips())[: args.clips]
    runs = {"capacity": (args.bound, args.per_worker), "backlog": (args.bound, 0), "none": (0, 0)}
    users = density.users_create(env, len(runs) * args.speakers, "ada")  # a set for each
    variants = {}
    for n, (name, (bound, per_worker)) in enumerate(runs.items()):
        own = users[n * args.speakers : (n + 1) * args.speakers]
        variants[name] = variant_run(bound, per_worker, args, env, own, clips, procs)
    return {
        "benchmark": "overload",
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python -m benchmarks.overload " + " ".join(sys.argv[1:]),
        "machine": stack.machine_info(),
        "git": stack.git_commit(),
        "speakers": args.speakers, "every_s": args.every, "clips": args.clips,
        "bound": args.bound, "per_worker": args.per_worker,
        "variants": variants,
    }  # fmt: skip


def table(report: dict) -> str:
    lines = [
        f"Overload: {report['speakers']} speakers arriving every {report['every_s']} s,"
        f" {report['clips']} clips each; one STT worker (1 thread) on core 1",
        "",
        f"{'':28}" + "".join(f"{name:>14}" for name in report["variants"]),
    ]
    variants = list(report["variants"].values())

    def row(name: str, get) -> None:
        cells = [get(v) for v in variants]
        lines.append(f"{name:28}" + "".join(f"{'-' if c is None else c:>14}" for c in cells))

    row("sessions per STT worker", lambda v: v.get("per_worker") or "off")
    row("bound (STT_BACKLOG_REFUSE)", lambda v: v["bound"] or "off")
    row("admitted", lambda v: v["admitted"])
    row("refused (1013)", lambda v: v["refused"])
    row("stt queue depth, max", lambda v: v["depth_max"])
    row("stt queue depth, p95", lambda v: v["depth_p95"])
    for stage in ("onset_to_first_partial_ms", "speech_end_to_final_ms"):
        for stat in ("p50", "p95"):
            row(f"{stage.removesuffix('_ms')} {stat}",
                lambda v, s=stage, q=stat: (v["stages"].get(s) or {}).get(q))  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    stack.run_and_write(parse_args(argv), run, table)


if __name__ == "__main__":
    main()
