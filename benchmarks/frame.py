"""The per-frame work of the web process, measured in CPU microseconds a frame
(`make bench BENCH=frame`, python -m benchmarks.frame).

Each stage of what a socket's audio frame costs before any transport: the
frame checks, the rate limit, the endpointer (on speech and on silence), the
buffer append, the whole of Session.frame for speech (STT jobs recorded, not
sent), for 100 ms and 200 ms frames; and what queueing one STT job costs the
caller: `enqueue` (a put on the publisher thread's queue) against Celery's
synchronous `apply_async` to a real Redis broker, as the old code did on the
event loop. Prints a table, writes docs/benchmarks/frame.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from unittest import mock

from benchmarks.stack import ROOT, git_commit, machine_info, redis_start

OUT = ROOT / "docs" / "benchmarks" / "frame.json"


def _setup(broker: str) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["CELERY_BROKER_URL"] = broker
    for name in ("DATABASE_URL", "REDIS_URL", "AUDIO_STORE_URL", "CHANNEL_LAYER_URL"):
        os.environ.pop(name, None)
    import django

    django.setup()


def _per_call_us(run, calls: int) -> float:
    started = time.thread_time()
    for _ in range(calls):
        run()
    return (time.thread_time() - started) / calls * 1e6


def _speech_frames(frame_bytes: int) -> list[bytes]:
    from tests.audio import english_clips, pcm_of

    pcm = b"".join(pcm_of(name) + bytes(32_000) for name in english_clips()[:4])
    pcm += bytes(-len(pcm) % frame_bytes)
    return [pcm[i : i + frame_bytes] for i in range(0, len(pcm), frame_bytes)]


def stage_costs(frame_ms: int, repeat: int) -> dict[str, float]:
    from apps.pipeline.vad import Endpointer
    from apps.realtime.limits import AudioRateLimiter
    from apps.realtime.live import LiveWriter, OpenAudio
    from apps.realtime.protocol import check_audio_frame

    frame_bytes = frame_ms * 32
    speech = _speech_frames(frame_bytes)
    silence = bytes(frame_bytes)
    rate = AudioRateLimiter(factor=1e9, burst_ms=1e12)
    costs = {
        "frame checks": _per_call_us(lambda: check_audio_frame(speech[7]), repeat * 20),
        "rate limit": _per_call_us(lambda: rate.allow(frame_ms, 0.0), repeat * 20),
    }
    endpointer = Endpointer()
    frames = iter(speech * (repeat // len(speech) + 2))
    costs["endpointer, speech"] = _per_call_us(lambda: endpointer.feed(next(frames)), repeat)
    quiet = Endpointer()
    costs["endpointer, silence"] = _per_call_us(lambda: quiet.feed(silence), repeat)
    audio = OpenAudio(key="k", record_key="r", on_error=lambda exc: None)
    writer = LiveWriter.__new__(LiveWriter)  # no loop needed for an append
    writer.dirty = {}
    costs["buffer append"] = _per_call_us(lambda: writer.audio_append(audio, speech[7]), repeat)
    # A user with quotas against an unlimited one, interleaved 5 times (the machine is
    # noisy): the median of each.
    runs: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(5):
        for limited in runs:
            runs[limited].append(asyncio.run(_session_cost(speech, repeat, limited=limited)))
    costs["Session.frame, speech"] = statistics.median(runs[True])
    costs["Session.frame, speech, unlimited user"] = statistics.median(runs[False])
    return {name: round(us, 2) for name, us in costs.items()}


async def _session_cost(frames: list[bytes], repeat: int, *, limited: bool = True) -> float:
    """The whole per-frame path after the transport, STT jobs recorded, not sent; for a
    user with daily quotas (each frame counts its speech) or an unlimited one."""
    from apps.pipeline.values import PersonaEngines
    from apps.realtime.services import SocketContext
    from apps.realtime.session import Session

    async def nothing(*args, **kwargs):
        return None

    context = SocketContext(
        conversation_id="00000000-0000-0000-0000-000000000000",  # type: ignore[arg-type]
        user_id=1,
        persona={},
        engines=PersonaEngines(stt="faster_whisper", llm="echo", tts="espeak"),
        audio_seconds_per_day=600 if limited else 0,
        tokens_per_day=50_000 if limited else 0,
    )
    session = Session(
        context,
        send_event=nothing,
        send_bytes=nothing,
        send_error=nothing,
        spawn=asyncio.ensure_future,  # the quota's reservations (the process's own ledger)
    )
    session.resume.greeted = True
    session.limits.audio_ms.bucket.burst = session.limits.audio_ms.bucket.tokens = 1e12
    session.speech.started = nothing
    with (
        mock.patch("apps.realtime.speech.enqueue"),
        mock.patch.object(session.speech.live, "when_stored", lambda audio, then: None),
    ):
        stream = iter(frames * (repeat // len(frames) + 2))
        started = time.thread_time()
        for _ in range(repeat):
            await session.frame(next(stream))
        return (time.thread_time() - started) / repeat * 1e6


def enqueue_costs(repeat: int) -> dict[str, float]:
    """Caller's CPU for one STT job: the non-blocking enqueue against apply_async."""
    from apps.pipeline import dispatch
    from apps.pipeline.tasks import transcribe_window_task

    kwargs = dict(conversation_id="c", utterance_id="u", end_byte=3200, purpose="partial")
    transcribe_window_task.apply_async(kwargs=kwargs, queue="bench-frame")  # connect first
    started = time.perf_counter()
    for _ in range(repeat):
        transcribe_window_task.apply_async(kwargs=kwargs, queue="bench-frame", ignore_result=True)
    apply_async_us = (time.perf_counter() - started) / repeat * 1e6
    started = time.perf_counter()
    for _ in range(repeat):
        dispatch.enqueue(transcribe_window_task, queue="bench-frame", **kwargs)
    enqueue_us = (time.perf_counter() - started) / repeat * 1e6

    async def on_the_loop() -> float:
        begun = time.perf_counter()
        for _ in range(repeat):
            dispatch.enqueue(transcribe_window_task, queue="bench-frame", **kwargs)
        spent = (time.perf_counter() - begun) / repeat * 1e6
        await asyncio.sleep(0.5)  # let the producer write them
        return spent

    native_us = asyncio.run(on_the_loop())
    return {
        "apply_async on the caller (wall µs)": round(apply_async_us, 1),
        "enqueue off a loop: a put for the publisher thread (wall µs)": round(enqueue_us, 2),
        "enqueue on the event loop: Celery's message built, batched LPUSH (wall µs)": round(
            native_us, 2
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    redis = redis_start()
    try:
        _setup(f"redis://127.0.0.1:{redis.port}/0")
        by_frame = {ms: stage_costs(ms, args.repeat) for ms in (100, 200)}
        enqueue = enqueue_costs(min(args.repeat, 2000))
    finally:
        redis.stop()
    print("\n## Per-frame CPU on the web process (µs a frame; thread CPU time)\n")
    print("| stage | 100 ms frames | 200 ms frames | 200 ms, per 100 ms of audio |")
    print("|---|---:|---:|---:|")
    for stage in by_frame[100]:
        a, b = by_frame[100][stage], by_frame[200][stage]
        print(f"| {stage} | {a} | {b} | {round(b / 2, 2)} |")
    print("\n## Queueing one STT job, as the caller sees it\n")
    for name, us in enqueue.items():
        print(f"- {name}: {us}")
    result = {
        "machine": machine_info(),
        "commit": git_commit(),
        "command": "python -m benchmarks.frame",
        "per_frame_cpu_us": {str(ms): costs for ms, costs in by_frame.items()},
        "enqueue": enqueue,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
