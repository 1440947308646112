"""Voice pipeline latency: `make bench BENCH=latency` (python -m benchmarks.latency).

Starts the real stack (its own Redis; Postgres through PgBouncer; Daphne; one
Celery worker per AI stage, `python -m config.worker stt` and `... tts`, or one
shared worker with `--workers shared`), then 1, 4 and 8 concurrent speakers each
stream the English test clips at real-time pace over real sockets, each clip
followed by 2 s of silence, and wait for the persona's reply (the echo stand-in
and Piper) before the next.

Times are taken on the client's clock from where speech ends in the audio
itself (found offline by the same endpointer on the same frames), so they
include the 500 ms of silence the endpointer waits for:

  speech end → final          → `transcript.final`
  speech end → first token    → the reply's first `reply.delta`
  speech end → first audio    → the reply's first `reply.audio.start`
  speech onset → first draft  → the utterance's first `transcript.partial`

plus the server's own `speech_end_to_final_ms`, and the WER of the streamed
finals against the same model run offline on the whole files. Interrupted
replies never count. Prints a table, writes docs/benchmarks/latency.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import density, stack  # noqa: E402

SILENCE = bytes(32_000 * 2)  # after each clip, so the endpointer closes it
FRAME_BYTES = 3_200
OUT = ROOT / "docs" / "benchmarks" / "latency.json"
STAGES = (
    "speech_end_to_final_ms",
    "server_speech_end_to_final_ms",
    "speech_end_to_first_token_ms",
    "speech_end_to_first_audio_ms",
    "first_token_to_first_audio_ms",
    "onset_to_first_partial_ms",
)
TARGETS = [  # (stage, statistic, speakers, at most ms)
    ("server_speech_end_to_final_ms", "p50", 4, 400),
    ("server_speech_end_to_final_ms", "p95", 4, 800),
    ("onset_to_first_partial_ms", "p50", 4, 700),
    ("speech_end_to_first_audio_ms", "p50", 4, 1500),
]


def say(message: str) -> None:
    print(f"latency: {message}", file=sys.stderr, flush=True)


def speech_marks(pcm: bytes) -> list[tuple[int, int]]:
    """(onset byte, end-of-speech byte) of each utterance the endpointer finds
    in `pcm` + silence, fed in the frames the client sends."""
    from django.conf import settings

    from apps.pipeline.vad import BYTES_PER_MS, Endpointer

    endpointer = Endpointer(
        end_silence_ms=settings.VAD_END_SILENCE_MS,
        pause_ms=settings.VAD_PAUSE_MS,
        min_speech_ms=settings.VAD_MIN_SPEECH_MS,
        max_utterance_ms=settings.VAD_MAX_UTTERANCE_MS,
    )
    marks, onset, data = [], 0, pcm + SILENCE
    for offset in range(0, len(data), FRAME_BYTES):
        sent = offset + len(data[offset : offset + FRAME_BYTES])
        for happened in endpointer.feed(data[offset : offset + FRAME_BYTES]):
            if happened.kind == "start":
                onset = max(0, sent - settings.VAD_MIN_SPEECH_MS * BYTES_PER_MS)
            elif happened.kind == "end":
                silence = settings.VAD_END_SILENCE_MS if happened.reason == "silence" else 0
                marks.append((onset, sent - silence * BYTES_PER_MS))
    return marks


def speaker(url_of, user: tuple[str, str], clips: list[str], origin: str) -> list[dict]:
    """One speaker's turns: the clips in order, each answered before the next."""
    from apps.pipeline.talk_client import TalkClient
    from tests.audio import pcm_of

    conversation_id, session_key = user
    client = TalkClient(url_of(conversation_id), session_cookie=session_key, origin=origin)
    client.connect()
    turns = []
    for clip in clips:
        pcm = pcm_of(clip)
        after = len(client.received)
        started = client.now()
        client.stream(pcm + SILENCE)
        turns.extend(turn_times(client, after, started, speech_marks(pcm), clip))
    client.close()
    return turns


def turn_times(client, after: int, started: float, marks, clip: str, timeout=60) -> list[dict]:
    """Wait until the clip's utterances are answered; time each on the client clock."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items = [r.event for r in client.received[after:]]
        ends = sum(e["type"] == "speech.end" for e in items)
        settled = sum(e["type"] in ("transcript.final", "transcript.empty") for e in items)
        finals = sum(e["type"] == "transcript.final" for e in items)
        replies = sum(e["type"] in ("reply.done", "reply.interrupted") for e in items)
        if ends and ends == settled and replies >= finals:
            break
        time.sleep(0.05)
    client.wait_quiet(quiet=0.5, timeout=10)
    items = client.received[after:]
    starts = [r for r in items if r.event["type"] == "speech.start"]
    turns = []
    for (onset, end), start in zip(marks, starts, strict=False):
        uid = start.event["utterance_id"]
        speech_end = started + end / 32_000
        final = _first(items, "transcript.final", utterance_id=uid)
        partial = _first(items, "transcript.partial", utterance_id=uid)
        turn = {
            "clip": clip,
            "text": final.event["text"] if final else "",
            "speech_end_to_final_ms": _ms(speech_end, final),
            "server_speech_end_to_final_ms": final.event.get("speech_end_to_final_ms")
            if final
            else None,
            "onset_to_first_partial_ms": _ms(started + onset / 32_000, partial),
            "speech_end_to_first_token_ms": None,
            "speech_end_to_first_audio_ms": None,
            "first_token_to_first_audio_ms": None,
            "reply_audio_s": 0.0,
        }
        later = [r for r in items if final and r.t >= final.t]
        delta = next((r for r in later if r.event["type"] == "reply.delta"), None)
        reply_id = delta.event["reply_id"] if delta else None
        interrupted = any(
            r.event["type"] == "reply.interrupted" and r.event["reply_id"] == reply_id
            for r in later
        )
        if delta and not interrupted:
            audio = [
                r
                for r in later
                if r.event["type"] == "reply.audio.start" and r.event["reply_id"] == reply_id
            ]
            turn["speech_end_to_first_token_ms"] = _ms(speech_end, delta)
            turn["speech_end_to_first_audio_ms"] = _ms(speech_end, audio[0] if audio else None)
            turn["first_token_to_first_audio_ms"] = _ms(delta.t, audio[0] if audio else None)
            turn["reply_audio_s"] = sum(
                r.event["bytes"] / 2 / r.event["sample_rate"] for r in audio
            )
            done = _first(later, "reply.done", reply_id=reply_id)
            turn["server_final_to_first_token_ms"] = (
                done.event.get("final_to_first_token_ms") if done else None
            )
            turn["final_to_first_token_ms"] = _ms(final.t, delta)
        turns.append(turn)
    return turns


def _first(items, kind: str, **match):
    return next(
        (
            r
            for r in items
            if r.event["type"] == kind and all(r.event.get(k) == v for k, v in match.items())
        ),
        None,
    )


def _ms(since: float, received) -> float | None:
    return None if received is None else round((received.t - since) * 1000, 1)


def summarize(turns: list[dict]) -> dict:
    out = {}
    for stage in STAGES:
        values = [t[stage] for t in turns if t[stage] is not None]
        out[stage] = {
            "p50": stack.percentile(values, 0.5),
            "p95": stack.percentile(values, 0.95),
            "n": len(values),
        }
    return out


def offline_wer(clips: list[str], levels: dict) -> dict:
    """The streamed finals' WER at each level, and the same model offline."""
    from apps.pipeline.providers.registry import stt_get
    from tests.audio import manifest, pcm_of, word_error_rate

    stt = stt_get("faster_whisper")
    references = [manifest()[clip]["reference_transcript"] for clip in clips]
    offline = [stt.transcribe(pcm_of(clip)).text for clip in clips]
    out = {"offline": round(word_error_rate(references, offline), 4)}
    for speakers, level in levels.items():
        by_clip: dict[str, list[str]] = {}
        for turn in level["turns"]:
            by_clip.setdefault(f"{turn['speaker']}:{turn['clip']}", []).append(turn["text"])
        pairs = [
            (manifest()[key.split(":", 1)[1]]["reference_transcript"], " ".join(texts))
            for key, texts in by_clip.items()
        ]
        out[f"streamed_{speakers}"] = round(
            word_error_rate([p[0] for p in pairs], [p[1] for p in pairs]), 4
        )
    return out


def worker_start(role: str, env: dict, core: int | None, procs: list) -> stack.Proc:
    command = [sys.executable, "-m", "config.worker", role, "-n", f"bench-{role}@%h",
               "--without-gossip", "--without-mingle", "--loglevel", "INFO"]  # fmt: skip
    env = {**env, "LOG_LEVEL": "INFO"}  # the worker says " ready." at INFO
    proc = stack.spawn(stack.pinned(command, core), env, f"latency-worker-{role}")
    procs.append(proc)
    stack.wait_until(lambda: " ready." in proc.log_tail(200), proc, f"{role} worker", 120)
    return proc


def run(args, procs: list) -> dict:
    redis = stack.redis_start()
    procs.append(redis.proc)
    stack.services_up()
    stack.database_recreate(stack.BENCH_DATABASE)
    env = density.bench_env(redis)
    env.update(STT_CPU_THREADS=str(args.stt_threads), CELERY_BROKER_URL=redis.url(3))
    stack.migrate(env)
    os.environ.update(env)
    import django

    django.setup()
    from apps.personas.demo import demo_seed
    from tests.audio import english_clips

    demo_seed()
    clips = sorted(english_clips())[: args.clips]
    levels_wanted = sorted(set(args.speakers))
    users = density.users_create(env, sum(levels_wanted) + (8 if args.spike else 0), "ada")
    llm = None
    if "local" in args.llm:  # the offline model: its own process, on the same two cores
        llm = llm_start(env, procs)
        # Ada stays on echo (the deployment default); Ada (local) asks the model
        env.update(LLM_LOCAL_URL=f"http://127.0.0.1:{llm.port}/v1", LLM_KIND="echo")
        local_users = density.users_create(env, sum(levels_wanted), local_persona())
    web = density.web_start("daphne", env, None, procs)
    density.web_wait(web)
    roles = ["stt", "tts"] if args.workers == "split" else ["all"]
    workers = {role: worker_start(role, env, None, procs) for role in roles}
    say(f"stack up: web {web.pid}, workers {', '.join(f'{r} {p.pid}' for r, p in workers.items())}")
    levels: dict[str, dict] = {}
    if "echo" in args.llm:
        for count in levels_wanted:
            mine, users = users[:count], users[count:]
            levels[str(count)] = level_run(count, mine, clips, web, workers)
    if llm is not None:  # side by side: the same speakers and clips, replies from the model
        for count in levels_wanted:
            mine, local_users = local_users[:count], local_users[count:]
            before = llm_counters(llm)
            level = level_run(count, mine, clips, web, {**workers, "llm": llm})
            after = llm_counters(llm)
            made = {name: after[name] - before[name] for name in after}
            levels[f"{count} llm local"] = level | {"llm": "local", "llm_counters": made}
    if args.spike and args.workers == "split":
        # The AI stages apart: STT on core 1, TTS (and the web process) on core 0; then
        # the same 4 speakers again while a burst of STT work floods the stt queue.
        for pid, core in ((workers["stt"].pid, 1), (workers["tts"].pid, 0), (web.pid, 0)):
            stack.pin(pid, core)
        for spike in (0, args.spike):
            mine, users = users[:4], users[4:]
            levels[f"4 pinned, stt spike {spike}"] = level_run(4, mine, clips, web, workers, spike)
    wer = offline_wer(clips, levels)
    return report_of(args, levels, wer)


def local_persona() -> str:
    """Ada on the `local` kind (the offline model): its slug."""
    from apps.personas.models import Persona

    ada = Persona.objects.get(slug="ada")
    Persona.objects.update_or_create(
        slug="ada-local",
        defaults={"name": "Ada (local)", "system_prompt": ada.system_prompt,
                  "greeting": ada.greeting, "tts_kind": ada.tts_kind, "llm_kind": "local",
                  "temperature": ada.temperature, "is_published": True},
    )  # fmt: skip
    return "ada-local"


def llm_start(env: dict, procs: list) -> stack.Proc:
    """`manage.py serve_llm` on a free port (.port), once it answers."""
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, str(ROOT / "manage.py"), "serve_llm", "--port", str(port)]
    proc = stack.spawn(command, env, "latency-serve-llm")
    procs.append(proc)
    proc.port = port  # type: ignore[attr-defined]

    def answers() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    stack.wait_until(answers, proc, "serve_llm", 60)
    return proc


def llm_counters(llm) -> dict[str, float]:
    """The offline model's counters from its /metrics: completion tokens, seconds spent
    generating (first token to last, queueing excluded), first-token seconds."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{llm.port}/metrics", timeout=5) as r:
        text = r.read().decode()
    wanted = {
        "tokens": 'parley_local_llm_tokens_total{kind="completion"}',
        "generating_s": "parley_local_llm_generating_seconds_total",
        "first_token_s_sum": "parley_local_llm_first_token_seconds_sum",
        "first_token_count": "parley_local_llm_first_token_seconds_count",
    }
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line[:1] != "#")
    return {name: float(values.get(metric, 0.0)) for name, metric in wanted.items()}


def level_run(count: int, users, clips: list[str], web, workers: dict, spike: int = 0) -> dict:
    """`count` speakers at once (each starting at another clip, so that not every
    pause falls together), with `spike` extra STT streams running meanwhile."""
    from benchmarks import stt

    orders = [clips[i % len(clips) :] + clips[: i % len(clips)] for i in range(count)]
    cpu_before = {role: stack.cpu_seconds(p.pid) for role, p in workers.items()}
    stop = threading.Event()
    flood = threading.Thread(
        target=lambda: asyncio.run(stt.streams_run(spike, 1, stop=stop)), daemon=True
    )
    if spike:
        flood.start()
    began = time.monotonic()
    with ThreadPoolExecutor(count) as pool:
        runs = list(
            pool.map(
                lambda pair: speaker(web.ws_url, pair[0], pair[1], web.origin),
                zip(users, orders, strict=True),
            )
        )
    wall = time.monotonic() - began
    stop.set()
    if spike:
        flood.join(timeout=120)
    turns = [dict(turn, speaker=i) for i, run_ in enumerate(runs) for turn in run_]
    cpu = {role: stack.cpu_seconds(p.pid) - cpu_before[role] for role, p in workers.items()}
    from tests.audio import pcm_of

    streamed = count * sum(len(pcm_of(clip)) + len(SILENCE) for clip in clips) / 32_000
    say(f"{count} speakers (stt spike {spike}): {len(turns)} turns in {wall:.0f} s")
    return {
        "speakers": count,
        "stt_spike_streams": spike,
        "turns": turns,
        "wall_s": round(wall, 1),
        "streamed_s": round(streamed, 1),
        "worker_cpu_s": {role: round(s, 2) for role, s in cpu.items()},
        "stages": summarize(turns),
    }


def report_of(args, levels: dict, wer: dict) -> dict:
    plain = {
        lv["speakers"]: lv
        for lv in levels.values()
        if "pinned" not in key_of(levels, lv) and "llm" not in lv
    } or {lv["speakers"]: lv for lv in levels.values()}
    top = plain[max(plain)]
    reply_audio = [t["reply_audio_s"] for lv in levels.values() for t in lv["turns"]]
    tts_cpu = sum(lv["worker_cpu_s"].get("tts", 0.0) for lv in levels.values())
    turns = sum(len(lv["turns"]) for lv in levels.values())
    spoken_s = sum(
        lv["speakers"] * lv["wall_s"] for lv in levels.values()
    )  # speaker-seconds in session
    report = {
        "benchmark": "latency",
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python -m benchmarks.latency " + " ".join(sys.argv[1:]),
        "machine": stack.machine_info(),
        "git": stack.git_commit(),
        "workers": args.workers,
        "stt_threads": args.stt_threads,
        "clips": args.clips,
        "levels": levels,
        "wer": wer,
    }
    report["summary"] = {
        "speakers": sorted(levels),
        "reply_audio_seconds_per_turn": round(sum(reply_audio) / max(1, len(reply_audio)), 2),
        "tts_audio_seconds_per_cpu_second": round(sum(reply_audio) / tts_cpu, 2)
        if tts_cpu
        else None,
        "turns_per_speaking_minute": round(turns / (spoken_s / 60), 2) if spoken_s else None,
        "stages_at_max": top["stages"],
        # the STT stage's whole cost of a speaking user (drafts, candidates, finals), at
        # the most speakers: worker CPU seconds for each second of audio streamed
        "stt_cpu_seconds_per_streamed_second": round(
            top["worker_cpu_s"].get("stt", top["worker_cpu_s"].get("all", 0.0)) / top["streamed_s"],
            3,
        ),
    }
    local = {lv["speakers"]: lv for lv in levels.values() if lv.get("llm") == "local"}
    if local:  # the offline model beside echo: what a real model costs on the same cores
        report["summary"]["llm_local"] = {
            str(n): local_versus_echo(lv, levels.get(str(n))) for n, lv in sorted(local.items())
        }
    spiked = [lv for key, lv in levels.items() if "pinned" in key]
    if len(spiked) == 2:
        calm, flooded = (lv["stages"]["first_token_to_first_audio_ms"]["p50"] for lv in spiked)
        finals = [lv["stages"]["server_speech_end_to_final_ms"]["p50"] for lv in spiked]
        report["summary"]["stt_spike"] = {
            "streams": spiked[1]["stt_spike_streams"],
            "first_token_to_first_audio_p50_ms": [calm, flooded],
            "server_speech_end_to_final_p50_ms": finals,
        }
    report["targets"] = [
        _target(levels, stage, stat, speakers, limit) for stage, stat, speakers, limit in TARGETS
    ] + [
        {
            "target": "streamed WER ≤ offline WER + 2 points",
            "measured": wer,
            "met": all(v <= wer["offline"] + 0.02 for k, v in wer.items() if k != "offline"),
        }
    ]
    return report


def local_versus_echo(local: dict, echo: dict | None) -> dict:
    """At one speaker count: first token and first audio p50 (local, echo, ratio), the
    model's CPU seconds a turn, and its tokens a second of CPU."""
    out: dict = {}
    for stage in ("speech_end_to_first_token_ms", "speech_end_to_first_audio_ms"):
        mine = local["stages"][stage]["p50"]
        theirs = echo["stages"][stage]["p50"] if echo else None
        out[stage] = {"local_p50": mine, "echo_p50": theirs,
                      "ratio": round(mine / theirs, 2) if mine and theirs else None}  # fmt: skip
    turns = max(1, len(local["turns"]))
    out["llm_cpu_s_per_turn"] = round(local["worker_cpu_s"].get("llm", 0.0) / turns, 3)
    made = local.get("llm_counters", {})
    if made.get("generating_s"):  # while STT and TTS ran beside it on the same cores
        out["tokens_per_s"] = round(made["tokens"] / made["generating_s"], 1)
        out["tokens_per_turn"] = round(made["tokens"] / turns, 1)
    if made.get("first_token_count"):
        out["server_first_token_ms"] = round(
            1000 * made["first_token_s_sum"] / made["first_token_count"]
        )
    return out


def key_of(levels: dict, level: dict) -> str:
    return next(key for key, value in levels.items() if value is level)


def _target(levels, stage, stat, speakers, limit) -> dict:
    level = levels.get(str(speakers))
    value = level["stages"][stage][stat] if level else None
    return {
        "target": f"{stage} {stat} ≤ {limit} ms at {speakers} speakers",
        "measured": value,
        "met": value is not None and value <= limit,
        "ratio": round(value / limit, 2) if value else None,
    }


def table(report: dict) -> str:
    levels = report["levels"]
    counts = list(levels)
    lines = [
        "| stage (ms) | " + " | ".join(f"{n} spk p50 | {n} spk p95" for n in counts) + " |",
        "|---|" + "---:|" * (2 * len(counts)),
    ]
    for stage in STAGES:
        cells = []
        for n in counts:
            cell = levels[n]["stages"][stage]
            cells += ["-" if v is None else str(round(v)) for v in (cell["p50"], cell["p95"])]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines.append("| turns | " + " | ".join(f"{len(levels[n]['turns'])} | " for n in counts) + " |")
    wer = report["wer"]
    lines += [
        "",
        "WER: offline " + f"{wer['offline']:.1%}, "
        + ", ".join(f"{k.split('_')[1]} spk {v:.1%}" for k, v in wer.items() if k != "offline"),
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]  # fmt: skip
    for target in report["targets"]:
        measured = target["measured"]
        shown = measured if not isinstance(measured, float) else round(measured)
        lines.append(f"| {target['target']} | {shown} | {'yes' if target['met'] else 'NO'} |")
    summary = report["summary"]
    if "stt_spike" in summary:
        spike = summary["stt_spike"]
        calm, flooded = spike["first_token_to_first_audio_p50_ms"]
        finals = spike["server_speech_end_to_final_p50_ms"]
        lines += [
            "",
            f"STT spike of {spike['streams']} streams, stages pinned apart: TTS first token → "
            f"first audio p50 {calm:.0f} ms before, {flooded:.0f} ms during; server speech "
            f"end → final p50 {finals}",
        ]
    for n, cost in summary.get("llm_local", {}).items():
        token, audio = cost["speech_end_to_first_token_ms"], cost["speech_end_to_first_audio_ms"]
        lines += [
            "",
            f"offline model at {n} spk: speech end → first token p50 {token['local_p50']} ms "
            f"(echo {token['echo_p50']}, ×{token['ratio']}); → first audio p50 "
            f"{audio['local_p50']} ms (echo {audio['echo_p50']}, ×{audio['ratio']}); "
            f"model CPU {cost['llm_cpu_s_per_turn']} s a turn, "
            f"{cost.get('tokens_per_s')} tokens/s ({cost.get('tokens_per_turn')} a turn), "
            f"its own first token {cost.get('server_first_token_ms')} ms (mean)",
        ]
    lines += [
        "",
        f"reply audio {summary['reply_audio_seconds_per_turn']} s a turn; TTS "
        f"{summary['tts_audio_seconds_per_cpu_second']} audio s per CPU s; "
        f"{summary['turns_per_speaking_minute']} turns a speaking minute",
    ]
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--speakers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8]
    )
    parser.add_argument("--clips", type=int, default=8, help="clips per speaker")
    parser.add_argument("--workers", choices=["split", "shared"], default="split")
    parser.add_argument("--stt-threads", type=int, default=2, help="CPU threads of the model")
    parser.add_argument("--spike", type=int, default=16,
                        help="STT streams of the spike phase (0: none)")  # fmt: skip
    parser.add_argument("--llm", type=lambda s: s.split(","), default=["echo"],
                        help="reply engines side by side: echo, local (the offline model) "
                             "or echo,local")  # fmt: skip
    parser.add_argument("--out", default=str(OUT))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    stack.run_and_write(args, run, table)


if __name__ == "__main__":
    main()
