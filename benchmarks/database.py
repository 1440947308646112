"""The database at 1,000 open sessions: `make bench BENCH=database`
(python -m benchmarks.database).

Starts its own stack, as benchmarks.density does: a Redis server of its own
(channel layer, Celery broker, audio store) and a second one for the cache only
(so that its keyspace hits and misses are the cache's), Postgres through our
PgBouncer (transaction pooling; a fresh database, migrated and seeded), ONE
Daphne web process (--web-processes for more) pinned to core 0, and real Celery
workers (unpinned unless --worker-core): `python -m config.worker tts` and, for
the voice turns, `python -m config.worker stt`. Replies come from the echo stand-in (no LLM
endpoint) and are spoken by Piper.

This process is the client (one asyncio loop, the `websockets` package, density's
sessions): it opens --sessions sockets (session cookie, `hello`, then a ping every
5 s), then runs four phases one after the other, each measured on its own:

  open   the sockets opening (handshake, `hello`, the greeting's replay);
  idle   every socket open, nothing said (--idle-seconds);
  text   --speakers sessions each send a `text` turn, wait for its `reply.done` and
         all its audio, pause --pause s, and again, for --duration s;
  voice  --voice-speakers sessions each stream a short English test clip at
         real-time pace (100 ms frames) and 1.5 s of silence, and wait the same
         way, for --voice-duration s (0 speakers skips it).

A phase that says turns ends when every turn begun has settled, so each query is
counted in the phase whose turn ran it. Measured:

- Postgres server connections to the benchmark's database: pg_stat_activity on
  Postgres itself (127.0.0.1:5432, not through PgBouncer), every 0.5 s: max, p50.
- PgBouncer's admin console: SHOW POOLS every 0.5 s (clients active and waiting,
  server connections, maxwait) and SHOW STATS at each phase's edges:
  total_query_count and total_xact_count deltas for the database (every process:
  web and workers), divided by the turns the phase completed.
- The cache: the web process's /metrics (django-prometheus): the product's own
  `parley_context_cache_reads_total` (persona, conversation and history reads, hit
  or miss) and `django_cache_get_total` / `django_cache_get_hits_total` (the
  `context` alias's single-key gets); and the cache Redis's keyspace_hits and
  keyspace_misses (INFO stats: every process and every cache, sessions too).

Prints a table and writes docs/benchmarks/database.json with the targets: <= 25
Postgres server connections at 1,000 sessions, <= 10 queries per voice turn, and
a cache hit ratio >= 95% on persona and context reads. Everything it starts is
stopped by pid at the end, on Ctrl-C and on errors too, and a deadline
(--deadline-minutes) stops a run that hangs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import redis.asyncio as aioredis
from psycopg.rows import dict_row
from websockets.exceptions import ConnectionClosed

from benchmarks import density, stack
from tests.live import METRICS_TOKEN, _ping_through, http_get

ROOT = stack.ROOT
OUT = ROOT / "docs" / "benchmarks" / "database.json"

SAMPLE_S = 0.5  # pg_stat_activity and SHOW POOLS
TURN_TIMEOUT_S = 60.0  # a turn not settled by then counts as timed out
SETTLE_S = 1.0  # after a phase's last turn, for queries that come late (first-audio timing)
VOICE_CLIP_MAX_S = 6.0  # short clips: one utterance each
VOICE_TAIL = bytes(48_000)  # 1.5 s of silence after a clip (the endpointer waits 0.5 s)
CACHE_DB = 1  # on the cache's own Redis
BROKER_DB = 3  # the Celery broker on our Redis (what REDIS_URL gives)
CONTEXT_READS = "parley_context_cache_reads_total"
DJANGO_GETS, DJANGO_HITS = "django_cache_get_total", "django_cache_get_hits_total"

TARGET_SESSIONS = 1000
TARGET_CONNECTIONS = 25
TARGET_QUERIES_PER_TURN = 10.0
TARGET_CACHE_HIT_RATIO = 0.95


def say(message: str) -> None:
    print(f"database: {message}", file=sys.stderr, flush=True)


# --- The stack ---------------------------------------------------------------------------


def bench_env(redis: stack.RedisServer, cache: stack.RedisServer, database: str) -> dict:
    """density's environment, with a broker the workers read and the cache on its own Redis."""
    env = density.bench_env(redis)
    env.update(
        DATABASE_URL=stack.database_url(database),
        CELERY_BROKER_URL=redis.url(BROKER_DB),
        CACHE_URL=cache.url(CACHE_DB),
    )
    env.setdefault("METRICS_TOKEN", METRICS_TOKEN)  # the web processes' /metrics
    return env


def worker_start(role: str, env: dict, core: int | None, procs: list) -> tuple[stack.Proc, str]:
    """`python -m config.worker ROLE` (config/worker.py), pinned to `core`."""
    nodename = f"bench-database-{role}-{os.getpid()}@{socket.gethostname()}"
    command = [
        sys.executable, "-m", "config.worker", role, "-n", nodename,
        "--without-gossip", "--without-mingle",
    ]  # fmt: skip
    proc = stack.spawn(stack.pinned(command, core), env, f"database-worker-{role}")
    procs.append(proc)
    return proc, nodename


def worker_wait(proc: stack.Proc, nodename: str, broker_url: str, timeout_s: float = 180) -> None:
    def answers() -> bool:
        try:
            return _ping_through(broker_url, nodename)
        except Exception:  # noqa: BLE001  (the broker may refuse while starting)
            return False

    stack.wait_until(answers, proc, f"worker {nodename}", timeout_s)


# --- What is measured ----------------------------------------------------------------------


METRIC_LINE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metrics_parse(text: str, names: tuple[str, ...]) -> dict[tuple, float]:
    """{(name, ((label, value), ...)): value} for the samples named `names`."""
    out: dict[tuple, float] = {}
    for line in text.splitlines():
        match = METRIC_LINE.match(line)
        if match and match.group(1) in names:
            labels = tuple(sorted(LABEL.findall(match.group(2) or "")))
            key = (match.group(1), labels)
            out[key] = out.get(key, 0.0) + float(match.group(3))
    return out


class Monitor:
    """Postgres (directly) and PgBouncer's admin console, sampled every SAMPLE_S;
    counters read at the edges of each phase."""

    def __init__(self, database: str, webs: list, cache: stack.RedisServer, pids: dict) -> None:
        self.database = database
        self.webs = webs
        self.pids = pids  # name -> pid, for CPU
        self.cache = aioredis.Redis(host="127.0.0.1", port=cache.port)
        self.phase = "setup"
        self.samples: list[dict] = []
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        self.postgres = await psycopg.AsyncConnection.connect(
            "host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True
        )
        self.pgbouncer = await psycopg.AsyncConnection.connect(
            f"host=127.0.0.1 port={stack.PGBOUNCER_PORT} user=postgres dbname=pgbouncer",
            autocommit=True,
            row_factory=dict_row,
            prepare_threshold=None,  # the admin console takes simple queries only
        )
        self.started = time.monotonic()
        self.task = asyncio.create_task(self._sample_loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        for closing in (self.postgres.close(), self.pgbouncer.close(), self.cache.aclose()):
            with contextlib.suppress(Exception):
                await closing

    async def _sample_loop(self) -> None:
        while True:
            started = time.monotonic()
            try:
                sample = await self.sample()
                t = round(started - self.started, 2)
                self.samples.append({"t": t, "phase": self.phase, **sample})
            except psycopg.Error as exc:  # counted as a gap: the run goes on
                say(f"sample failed: {exc!r}")
            await asyncio.sleep(max(0.0, SAMPLE_S - (time.monotonic() - started)))

    async def sample(self) -> dict:
        cursor = await self.postgres.execute(
            "SELECT state, count(*) FROM pg_stat_activity "
            "WHERE datname = %s AND backend_type = 'client backend' GROUP BY state",
            (self.database,),
        )
        states = {state or "unknown": n for state, n in await cursor.fetchall()}
        pool = await self._pgbouncer_row("SHOW POOLS")
        return {
            "server_connections": sum(states.values()),
            "states": states,
            "cl_active": int(pool.get("cl_active", 0)),
            "cl_waiting": int(pool.get("cl_waiting", 0)),
            "sv_all": sum(
                int(pool.get(k, 0))
                for k in ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login")
            ),
            "sv_active": int(pool.get("sv_active", 0)),
            "maxwait_ms": int(pool.get("maxwait", 0)) * 1000
            + int(pool.get("maxwait_us", 0)) / 1000,
        }

    async def _pgbouncer_row(self, command: str) -> dict:
        cursor = await self.pgbouncer.execute(command)
        for row in await cursor.fetchall():
            if row.get("database") == self.database:
                return row
        return {}

    async def counters(self) -> dict:
        """PgBouncer's totals for the database, the web processes' cache metrics,
        the cache Redis's keyspace figures, CPU seconds, and the time."""
        stats = await self._pgbouncer_row("SHOW STATS")
        metrics: dict[tuple, float] = {}
        for web in self.webs:
            bearer = {"Authorization": f"Bearer {os.environ.get('METRICS_TOKEN') or METRICS_TOKEN}"}
            status, _, body = await asyncio.to_thread(
                http_get, f"{web.origin}/metrics", headers=bearer
            )
            if status != 200:
                say(f"/metrics of {web.origin} answered {status}")
                continue
            for key, value in metrics_parse(
                body.decode(), (CONTEXT_READS, DJANGO_GETS, DJANGO_HITS)
            ).items():
                metrics[key] = metrics.get(key, 0.0) + value
        info = await self.cache.info("stats")
        return {
            "t": time.monotonic(),
            "queries": int(stats.get("total_query_count", 0)),
            "transactions": int(stats.get("total_xact_count", 0)),
            "wait_us": int(stats.get("total_wait_time", 0)),
            "metrics": metrics,
            "keyspace_hits": int(info["keyspace_hits"]),
            "keyspace_misses": int(info["keyspace_misses"]),
            "cpu_s": {name: stack.cpu_seconds(pid) for name, pid in self.pids.items()},
        }


def _ratio(hits: float, total: float) -> float | None:
    return round(hits / total, 4) if total else None


def cache_figures(before: dict, after: dict) -> dict:
    """The cache's reads between two counters() readings."""
    delta = {
        key: after["metrics"].get(key, 0.0) - before["metrics"].get(key, 0.0)
        for key in after["metrics"]
    }
    context: dict[str, dict[str, int]] = {}
    for (name, labels), value in delta.items():
        if name == CONTEXT_READS:
            label = dict(labels)
            context.setdefault(label.get("kind", "?"), {})[label.get("result", "?")] = int(value)
    reads = sum(sum(results.values()) for results in context.values())
    hits = sum(results.get("hit", 0) for results in context.values())
    gets = sum(v for (name, _), v in delta.items() if name == DJANGO_GETS)
    get_hits = sum(v for (name, _), v in delta.items() if name == DJANGO_HITS)
    keyspace_hits = after["keyspace_hits"] - before["keyspace_hits"]
    keyspace_misses = after["keyspace_misses"] - before["keyspace_misses"]
    present = {name for name, _ in after["metrics"]}
    figures = {
        "context_reads": context,
        "context_reads_total": reads,
        "context_hit_ratio": _ratio(hits, reads),
        "django_cache_gets": int(gets),
        "django_cache_hits": int(get_hits),
        "django_cache_hit_ratio": _ratio(get_hits, gets),
        "redis_keyspace_hits": keyspace_hits,
        "redis_keyspace_misses": keyspace_misses,
        "redis_keyspace_hit_ratio": _ratio(keyspace_hits, keyspace_hits + keyspace_misses),
    }
    # The headline figure: the product's own count of persona and context reads, else
    # django-prometheus's cache gets, else the cache Redis.
    if CONTEXT_READS in present:
        source, ratio = f"web /metrics {CONTEXT_READS}", figures["context_hit_ratio"]
    elif DJANGO_GETS in present:
        source, ratio = (
            f"web /metrics {DJANGO_HITS} / {DJANGO_GETS}",
            figures["django_cache_hit_ratio"],
        )
    else:
        source, ratio = (
            "cache Redis INFO stats keyspace_hits / (hits + misses)",
            figures["redis_keyspace_hit_ratio"],
        )
    figures.update(hit_ratio=ratio, hit_ratio_source=source)
    return figures


def _spread(values: list[float]) -> dict:
    return {
        "max": max(values, default=None),
        "p50": stack.percentile(values, 0.5),
        "n": len(values),
    }


def phase_figures(name: str, before: dict, after: dict, samples: list[dict], turns: dict) -> dict:
    seconds = after["t"] - before["t"]
    queries = after["queries"] - before["queries"]
    transactions = after["transactions"] - before["transactions"]
    completed = turns.get("turns", 0)
    mine = [s for s in samples if s["phase"] == name]
    cpu = {
        proc: round(100 * (after["cpu_s"][proc] - before["cpu_s"][proc]) / seconds, 1)
        for proc in after["cpu_s"]
    }
    return {
        "phase": name,
        "seconds": round(seconds, 1),
        "queries": queries,
        "transactions": transactions,
        "queries_per_s": round(queries / seconds, 2) if seconds else None,
        "queries_per_turn": round(queries / completed, 2) if completed else None,
        "transactions_per_turn": round(transactions / completed, 2) if completed else None,
        "pgbouncer_wait_ms": round((after["wait_us"] - before["wait_us"]) / 1000, 1),
        "postgres_server_connections": _spread([s["server_connections"] for s in mine]),
        "pgbouncer_server_connections": _spread([s["sv_all"] for s in mine]),
        "pgbouncer_clients_active_max": max((s["cl_active"] for s in mine), default=None),
        "pgbouncer_clients_waiting_max": max((s["cl_waiting"] for s in mine), default=None),
        "pgbouncer_maxwait_ms_max": max((s["maxwait_ms"] for s in mine), default=None),
        "cache": cache_figures(before, after),
        "cpu_percent": cpu,
        **turns,
    }


# --- The client ----------------------------------------------------------------------------


TURN_EVENTS = {
    "speech.end", "transcript.final", "transcript.empty", "reply.done", "reply.interrupted",
    "reply.audio.start", "error",
}  # fmt: skip


class Speaker(density.Session):
    """A density session that also takes turns: typed (`text`) or spoken (audio)."""

    def __init__(self, target: density.Target, stats: density.Stats) -> None:
        super().__init__(target, stats)
        self.log: list[tuple[float, dict]] = []  # (arrival, event) since the turn began
        self.arrived = asyncio.Event()

    def on_event(self, event: dict) -> None:
        if event.get("type") in TURN_EVENTS and not event.get("replayed"):
            self.log.append((time.monotonic(), event))
            self.arrived.set()

    def _settled(self, voice: bool) -> bool:
        """Every utterance has its outcome, every final its reply, every finished
        reply all of its audio (the pieces with `last`, one per part)."""
        events = [event for _, event in self.log]
        kinds = [event["type"] for event in events]
        finals, ends = kinds.count("transcript.final"), kinds.count("speech.end")
        if voice and (not ends or ends > finals + kinds.count("transcript.empty")):
            return False
        if not voice and not finals:
            return False
        ended = ("reply.done", "reply.interrupted")
        replies = [e for e in events if e["type"] in ended and not e.get("audio_only")]
        if len(replies) < finals:
            return False
        parts: dict[str, int] = {}
        for e in events:
            if e["type"] == "reply.audio.start" and e.get("last"):
                parts[e["reply_id"]] = parts.get(e["reply_id"], 0) + 1
        return all(
            parts.get(r["reply_id"], 0) >= r.get("audio_parts", 0)
            for r in replies
            if r["type"] == "reply.done"
        )

    async def turn(self, *, text: str = "", frames: list[bytes] | None = None) -> dict:
        self.log.clear()
        voice = frames is not None
        started = time.monotonic()
        if voice:
            for k, frame in enumerate(frames):
                await asyncio.sleep(max(0.0, started + k * density.FRAME_S - time.monotonic()))
                await self.ws.send(frame)
        else:
            await self.ws.send(json.dumps({"type": "text", "text": text}))
        deadline = time.monotonic() + TURN_TIMEOUT_S
        outcome = "ok"
        while not self._settled(voice):
            if any(e["type"] == "error" for _, e in self.log) and not voice:
                outcome = "error"
                break
            left = deadline - time.monotonic()
            if left <= 0:
                outcome = "timeout"
                break
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), left)
        return self._summary(started, voice, outcome)

    def _summary(self, started: float, voice: bool, outcome: str) -> dict:
        def first(kind: str) -> float | None:
            return next((t for t, e in self.log if e["type"] == kind), None)

        origin = first("speech.end") if voice else started
        final, done = first("transcript.final"), first("reply.done")
        audio = [t for t, e in self.log if e["type"] == "reply.audio.start" and e.get("last")]

        def ms(t: float | None) -> float | None:
            return None if t is None or origin is None else round((t - origin) * 1000, 1)

        waiting = {}
        if outcome == "timeout":  # what had come: events by type, and the replies' audio
            kinds = [e["type"] for _, e in self.log]
            waiting = {"seen": {kind: kinds.count(kind) for kind in sorted(set(kinds))}}
            waiting["audio_parts"] = [
                e.get("audio_parts") for _, e in self.log if e["type"] == "reply.done"
            ]
        return {
            **waiting,
            "outcome": outcome,
            "finals": sum(e["type"] == "transcript.final" for _, e in self.log),
            "empties": sum(e["type"] == "transcript.empty" for _, e in self.log),
            "interrupted": sum(e["type"] == "reply.interrupted" for _, e in self.log),
            "errors": [e.get("code") for _, e in self.log if e["type"] == "error"],
            "to_final_ms": ms(final),
            "to_reply_done_ms": ms(done),
            "to_last_audio_ms": ms(max(audio, default=None)),
        }

    async def speak(self, stop_at: float, pause_s: float, make_turn, results: list) -> None:
        await asyncio.sleep(random.random() * max(pause_s, 1.0))
        with contextlib.suppress(ConnectionClosed):
            while time.monotonic() < stop_at:
                results.append(await self.turn(**make_turn()))
                await asyncio.sleep(pause_s)


def voice_clips() -> list[list[bytes]]:
    """The short English test clips, each with 1.5 s of silence, in 100 ms frames."""
    from tests.audio import english_clips, manifest, pcm_of

    clips = []
    for name in english_clips():
        if float(manifest()[name]["duration_s"]) <= VOICE_CLIP_MAX_S:
            pcm = pcm_of(name) + VOICE_TAIL
            pcm += bytes(-len(pcm) % density.FRAME_BYTES)
            step = density.FRAME_BYTES
            clips.append([pcm[i : i + step] for i in range(0, len(pcm), step)])
    return clips


def typed_texts() -> list[str]:
    """What text speakers type: the English clips' reference transcripts."""
    from tests.audio import english_clips, manifest

    return [manifest()[name]["reference_transcript"].capitalize() for name in english_clips()]


def turns_figures(results: list[dict]) -> dict:
    ok = [r for r in results if r["outcome"] == "ok"]

    def spread(key: str) -> dict:
        values = [r[key] for r in ok if r[key] is not None]
        return {"p50": stack.percentile(values, 0.5), "p95": stack.percentile(values, 0.95)}

    outcomes: dict[str, int] = {}
    errors: dict[str, int] = {}
    for r in results:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
        for code in r["errors"]:
            errors[str(code)] = errors.get(str(code), 0) + 1
    return {
        # A turn: a stored user turn (transcript.final) whose reply ended.
        "turns": sum(r["finals"] for r in ok),
        "attempts": len(results),
        "outcomes": outcomes,
        "timed_out": [
            {"seen": r["seen"], "audio_parts": r["audio_parts"]}
            for r in results
            if r["outcome"] == "timeout"
        ],
        "empty_utterances": sum(r["empties"] for r in results),
        "interrupted_replies": sum(r["interrupted"] for r in results),
        "errors_by_code": errors,
        "to_final_ms": spread("to_final_ms"),
        "to_reply_done_ms": spread("to_reply_done_ms"),
        "to_last_audio_ms": spread("to_last_audio_ms"),
    }


async def sockets_open(sessions: list[density.Session], ramp: float) -> None:
    """Open every socket at `ramp` a second, at most density's handshakes in flight."""
    gate = asyncio.Semaphore(density.HANDSHAKES_IN_FLIGHT)
    started = time.monotonic()

    async def one(index: int, session: density.Session) -> None:
        await asyncio.sleep(max(0.0, started + index / ramp - time.monotonic()))
        async with gate:
            if await session.open():
                session.stats.opened += 1

    await asyncio.gather(*(one(i, s) for i, s in enumerate(sessions)))


async def measure(args, users, webs: list, cache: stack.RedisServer, pids: dict) -> dict:
    stats = density.Stats(window=True)
    sessions: list[density.Session] = []
    for index, (conversation, key) in enumerate(users[: args.sessions]):
        web = webs[index % len(webs)]
        target = density.Target(web.ws_url(conversation), web.origin, key)
        kind = Speaker if index < args.speakers + args.voice_speakers else density.Session
        sessions.append(kind(target, stats))
    texters = sessions[: args.speakers]
    talkers = sessions[args.speakers : args.speakers + args.voice_speakers]

    monitor = Monitor(args.database, webs, cache, pids)
    await monitor.start()
    phases: list[dict] = []
    edges: dict[str, tuple[dict, dict]] = {}
    pingers: list[asyncio.Task] = []

    async def phase(name: str, body) -> dict:
        monitor.phase = name
        before = await monitor.counters()
        turns = await body()
        await asyncio.sleep(SETTLE_S)
        after = await monitor.counters()
        figures = phase_figures(name, before, after, monitor.samples, turns or {})
        phases.append(figures)
        edges[name] = (before, after)
        conns = figures["postgres_server_connections"]
        say(
            f"{name}: {figures['seconds']} s, {figures['queries']} queries, "
            f"{figures.get('turns', '-')} turns, {figures['queries_per_turn']} a turn; "
            f"Postgres connections max {conns['max']} p50 {conns['p50']}; "
            f"cache hit ratio {figures['cache']['hit_ratio']}"
        )
        return figures

    async def open_all() -> dict:
        await sockets_open(sessions, args.ramp)
        for session in sessions:
            if session.opened and not isinstance(session, Speaker):
                pingers.append(asyncio.create_task(session.idle()))
        return {"sockets_opened": stats.opened, "handshake_failures": dict(stats.handshakes)}

    async def idle() -> dict:
        await asyncio.sleep(args.idle_seconds)
        return {}

    def talking(speakers, seconds: float, make_turn):
        async def body() -> dict:
            results: list[dict] = []
            stop_at = time.monotonic() + seconds
            live = [s for s in speakers if s.opened]
            await asyncio.gather(*(s.speak(stop_at, args.pause, make_turn, results) for s in live))
            return {"speakers": len(live), **turns_figures(results)}

        return body

    texts, clips = typed_texts(), voice_clips()
    try:
        await phase("open", open_all)
        say(f"{stats.opened} of {len(sessions)} sockets open")
        await phase("idle", idle)
        if texters:
            await phase(
                "text", talking(texters, args.duration, lambda: {"text": random.choice(texts)})
            )
        if talkers:
            await phase(
                "voice",
                talking(talkers, args.voice_duration, lambda: {"frames": random.choice(clips)}),
            )
    finally:
        await monitor.stop()
        for task in pingers:
            task.cancel()
        await asyncio.gather(*pingers, return_exceptions=True)
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
    return {
        "phases": phases,
        "edges": edges,
        "sockets_opened": stats.opened,
        "socket_errors": {
            "errors": dict(stats.errors),
            "closes": dict(stats.closes),
            "handshakes": dict(stats.handshakes),
        },
        "idle_ping_ms": {
            "p50": stack.percentile(stats.rtts_ms, 0.5),
            "p99": stack.percentile(stats.rtts_ms, 0.99),
            "n": len(stats.rtts_ms),
        },
        "samples": monitor.samples,
    }


# --- Summary and targets ---------------------------------------------------------------------


def summary_of(args, measured: dict, edges: dict[str, tuple[dict, dict]]) -> dict:
    phases = {p["phase"]: p for p in measured["phases"]}
    held = [s for s in measured["samples"] if s["phase"] in phases]  # sockets opening or open
    connections = [s["server_connections"] for s in held]
    text, voice = phases.get("text"), phases.get("voice")
    turns_text = text["turns"] if text else 0
    turns_voice = voice["turns"] if voice else 0
    kind = "voice" if turns_voice else "text"
    # The cache over the turns phases, one after the other: from the first one's start
    # to the last one's end (nothing is said between them).
    talked = [name for name in ("text", "voice") if name in phases]
    cache = cache_figures(edges[talked[0]][0], edges[talked[-1]][1]) if talked else None
    opened = measured["sockets_opened"]
    summary = {
        "sessions": opened,
        "sessions_asked": args.sessions,
        "speakers": text["speakers"] if text else 0,
        "voice_speakers": voice["speakers"] if voice else 0,
        "turns": turns_text + turns_voice,
        "turns_text": turns_text,
        "turns_voice": turns_voice,
        "turn_kind": kind,
        "postgres_server_connections": max(connections, default=None),
        "postgres_server_connections_p50": stack.percentile(connections, 0.5),
        "pgbouncer_server_connections_max": max((s["sv_all"] for s in held), default=None),
        "pgbouncer_clients_waiting_max": max((s["cl_waiting"] for s in held), default=None),
        "queries_per_turn": ((voice if kind == "voice" else text) or {}).get("queries_per_turn"),
        "queries_per_text_turn": text["queries_per_turn"] if text else None,
        "queries_per_voice_turn": voice["queries_per_turn"] if voice else None,
        "queries_per_socket_open": (
            round(phases["open"]["queries"] / opened, 2) if opened and "open" in phases else None
        ),
        "idle_queries_per_s": phases["idle"]["queries_per_s"] if "idle" in phases else None,
        "cache_hit_ratio": cache["hit_ratio"] if cache else None,
        "cache_hit_ratio_source": cache["hit_ratio_source"] if cache else "no turns",
        "cache_reads": cache,
    }
    summary["targets"] = targets_check(summary)
    return summary


def targets_check(summary: dict) -> list[dict]:
    out = []
    sessions, conns = summary["sessions"], summary["postgres_server_connections"]
    at = "" if sessions >= TARGET_SESSIONS else f"; only {sessions} sessions, not {TARGET_SESSIONS}"
    name = f"<= {TARGET_CONNECTIONS} Postgres server connections at {TARGET_SESSIONS:,} sessions"
    out.append({
        "target": name,
        "measured": conns,
        "met": conns is not None and conns <= TARGET_CONNECTIONS and sessions >= TARGET_SESSIONS,
        "detail": f"max {conns} (p50 {summary['postgres_server_connections_p50']}) in "
        f"pg_stat_activity with {sessions} sessions open{at}",
    })  # fmt: skip
    qpt = summary["queries_per_turn"]
    kind = summary["turn_kind"]
    note = "" if kind == "voice" else "; measured on text turns: no voice turns were run"
    out.append({
        "target": f"<= {TARGET_QUERIES_PER_TURN:g} queries per voice turn",
        "measured": qpt,
        "met": qpt is not None and qpt <= TARGET_QUERIES_PER_TURN and kind == "voice",
        "detail": f"{qpt} queries per {kind} turn over {summary[f'turns_{kind}']} turns "
        f"(PgBouncer total_query_count; text turns {summary['queries_per_text_turn']}){note}",
    })  # fmt: skip
    ratio = summary["cache_hit_ratio"]
    out.append({
        "target": f"cache hit ratio >= {TARGET_CACHE_HIT_RATIO:.0%} on persona and context reads",
        "measured": ratio,
        "met": ratio is not None and ratio >= TARGET_CACHE_HIT_RATIO,
        "detail": f"{'-' if ratio is None else f'{ratio:.2%}'} over the turns phases "
        f"({summary['cache_hit_ratio_source']})",
    })  # fmt: skip
    return out


# --- Output ---------------------------------------------------------------------------------


def _core(core: int | None) -> str:
    return "unpinned" if core is None else f"on core {core}"


def _pct(ratio: float | None) -> str:
    return "-" if ratio is None else f"{100 * ratio:.1f}%"


def table(report: dict) -> str:
    machine, settings, summary = report["machine"], report["settings"], report["summary"]
    lines = [
        f"Database: {machine['nproc']} cores ({machine['cpu_model']}); {summary['sessions']} of "
        f"{settings['sessions']} sessions open; {summary['speakers']} text speakers, "
        f"{summary['voice_speakers']} voice speakers; web {_core(settings['server_core'])}, "
        f"workers {_core(settings['worker_core'])}, client {_core(settings['client_core'])}; "
        f"database {settings['database']}; commit {report['git']['commit'][:12] or 'unknown'}"
        f"{' (dirty)' if report['git']['dirty'] else ''}",
        "",
        "| phase | s | turns | queries | queries/turn | xacts/turn | queries/s | "
        "PG conns max | PG conns p50 | PgBouncer servers max | clients waiting max | "
        "cache hit | web CPU % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in report["phases"]:
        label = {
            "open": f"open {p.get('sockets_opened')} sockets",
            "idle": "all open, idle",
            "text": f"text turns, {p.get('speakers')} speakers",
            "voice": f"voice turns, {p.get('speakers')} speakers",
        }[p["phase"]]
        web_cpu = sum(v for k, v in p["cpu_percent"].items() if k.startswith("web"))
        cells = [
            label, p["seconds"], p.get("turns", "-"), p["queries"], p["queries_per_turn"],
            p["transactions_per_turn"], p["queries_per_s"],
            p["postgres_server_connections"]["max"], p["postgres_server_connections"]["p50"],
            p["pgbouncer_server_connections"]["max"], p["pgbouncer_clients_waiting_max"],
            _pct(p["cache"]["hit_ratio"]), round(web_cpu, 1),
        ]  # fmt: skip
        lines.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    cache = summary["cache_reads"] or {}
    reads = ", ".join(
        f"{kind} {r.get('hit', 0)} hit / {r.get('miss', 0)} miss"
        + (f" / {r['error']} error" if r.get("error") else "")
        for kind, r in sorted(cache.get("context_reads", {}).items())
    )
    lines += [
        "",
        f"Cache over the turns phases: {_pct(summary['cache_hit_ratio'])} "
        f"({summary['cache_hit_ratio_source']}); context reads: {reads or 'none'}; "
        f"django_cache_get: {_pct(cache.get('django_cache_hit_ratio'))} of "
        f"{cache.get('django_cache_gets', 0)} gets; cache Redis keyspace: "
        f"{_pct(cache.get('redis_keyspace_hit_ratio'))} of "
        f"{cache.get('redis_keyspace_hits', 0) + cache.get('redis_keyspace_misses', 0)} "
        "lookups (every process, sessions too).",
        f"Queries a socket open: {summary['queries_per_socket_open']}; idle, all open: "
        f"{summary['idle_queries_per_s']} queries/s.",
    ]
    for p in report["phases"]:
        if "turns" in p:
            origin = "speech.end" if p["phase"] == "voice" else "send"
            lines.append(
                f"{p['phase']} turns: {p['turns']} of {p['attempts']} attempts "
                f"({', '.join(f'{k} {v}' for k, v in p['outcomes'].items()) or 'none'}; "
                f"{p['empty_utterances']} empty, {p['interrupted_replies']} interrupted; errors "
                f"{p['errors_by_code'] or 'none'}); {origin} -> final p50 "
                f"{p['to_final_ms']['p50']} ms, -> reply.done p50 {p['to_reply_done_ms']['p50']}"
                f" p95 {p['to_reply_done_ms']['p95']} ms, -> last audio p50 "
                f"{p['to_last_audio_ms']['p50']} ms"
            )
    lines += ["", "## Targets", ""]
    for target in summary["targets"]:
        lines.append(f"- {'MET' if target['met'] else 'NOT MET'}: {target['target']}: "
                     f"{target['detail']}")  # fmt: skip
    return "\n".join(lines)


# --- Main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.database", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--sessions", type=int, default=1000, help="open sockets (default 1000)")
    parser.add_argument("--speakers", type=int, default=8, help="sessions taking text turns")
    parser.add_argument(
        "--voice-speakers", type=int, default=2, help="sessions taking voice turns; 0 to skip"
    )
    parser.add_argument("--duration", type=float, default=60.0, help="text turns phase, seconds")
    parser.add_argument(
        "--voice-duration", type=float, default=None, help="voice turns phase (default --duration)"
    )
    parser.add_argument("--idle-seconds", type=float, default=10.0, help="all open, no turns")
    parser.add_argument("--pause", type=float, default=1.0, help="between a speaker's turns, s")
    parser.add_argument("--ramp", type=float, default=200.0, help="sockets opened per second")
    parser.add_argument("--web-processes", type=int, default=1)
    parser.add_argument("--persona", default="ada", help="persona slug (seed_demo)")
    parser.add_argument("--database", default=stack.BENCH_DATABASE, help="recreated at the start")
    parser.add_argument("--server-core", type=int, default=0)
    parser.add_argument("--client-core", type=int, default=1)
    parser.add_argument("--worker-core", type=int, default=None, help="default: unpinned")
    parser.add_argument("--redis-core", type=int, default=None, help="default: the client's")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--deadline-minutes", type=float, default=None, help="default: an estimate x2"
    )
    args = parser.parse_args(argv)
    if args.voice_duration is None:
        args.voice_duration = args.duration
    if args.speakers + args.voice_speakers > args.sessions:
        parser.error("--speakers + --voice-speakers must not exceed --sessions")
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", args.database):
        parser.error("--database: lower-case letters, digits and _")
    if args.redis_core is None:
        args.redis_core = args.client_core
    cores = os.cpu_count() or 1
    for name in ("server_core", "client_core", "worker_core", "redis_core"):
        if getattr(args, name) is not None and getattr(args, name) >= cores:
            say(f"--{name.replace('_', '-')} {getattr(args, name)}: only {cores} cores; unpinned")
            setattr(args, name, None)
    return args


def _estimate_s(args) -> float:
    turns = args.duration + (args.voice_duration if args.voice_speakers else 0)
    return 300 + args.sessions / args.ramp + args.idle_seconds + turns + 3 * TURN_TIMEOUT_S


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    deadline_s = (args.deadline_minutes * 60) if args.deadline_minutes else 2 * _estimate_s(args)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, density.on_signal)
    signal.signal(signal.SIGALRM, density.on_signal)
    signal.alarm(max(1, round(deadline_s)))
    say(f"deadline in {deadline_s / 60:.0f} min")
    procs: list[stack.Proc] = []
    try:
        report = run(args, procs)
    finally:
        signal.alarm(0)
        for proc in reversed(procs):
            proc.stop()
    print(table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {density.shown(args.out)}")


def run(args, procs: list[stack.Proc]) -> dict:
    if args.client_core is not None:
        os.sched_setaffinity(0, {args.client_core})
    nofile = stack.raise_nofile(max(65_536, args.sessions + 256))

    say(f"stack: Postgres + PgBouncer (scripts/services.sh up), a fresh {args.database}, our Redis")
    stack.services_up()
    stack.database_recreate(args.database)
    redis = stack.redis_start(core=args.redis_core)
    procs.append(redis.proc)
    cache = stack.redis_start(core=args.redis_core)
    procs.append(cache.proc)
    env = bench_env(redis, cache, args.database)
    stack.migrate(env)
    manage = [sys.executable, "manage.py", "seed_demo"]
    subprocess.run(manage, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)

    roles = ["tts"] + (["stt"] if args.voice_speakers else [])
    workers = {role: worker_start(role, env, args.worker_core, procs) for role in roles}
    webs = [
        density.web_start("daphne", env, args.server_core, procs) for _ in range(args.web_processes)
    ]
    started = time.monotonic()
    users = density.users_create(env, args.sessions, args.persona)
    say(f"{len(users)} users, each with a conversation and a session, in "
        f"{time.monotonic() - started:.1f} s")  # fmt: skip
    for web in webs:
        density.web_wait(web)
    for proc, nodename in workers.values():
        worker_wait(proc, nodename, redis.url(BROKER_DB))
    pids = {f"web{i}": web.pid for i, web in enumerate(webs)}
    pids.update({f"worker_{role}": proc.pid for role, (proc, _) in workers.items()})
    say(f"stack up: {', '.join(f'{name} {pid}' for name, pid in pids.items())}")

    measured = asyncio.run(measure(args, users, webs, cache, pids))
    report = {
        "benchmark": "database",
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python -m benchmarks.database " + shlex.join(sys.argv[1:]),
        "machine": stack.machine_info(),
        "git": stack.git_commit(),
        "settings": {
            "sessions": args.sessions,
            "speakers": args.speakers,
            "voice_speakers": args.voice_speakers,
            "duration_s": args.duration,
            "voice_duration_s": args.voice_duration if args.voice_speakers else 0,
            "idle_seconds": args.idle_seconds,
            "pause_s": args.pause,
            "ramp_per_s": args.ramp,
            "web_processes": args.web_processes,
            "persona": args.persona,
            "database": args.database,
            "server_core": args.server_core,
            "client_core": args.client_core,
            "worker_core": args.worker_core,
            "redis_core": args.redis_core,
            "workers": [f"python -m config.worker {role}" for role in roles],
            "llm": "echo (no LLM endpoint)",
            "sample_s": SAMPLE_S,
            "open_files_limit": nofile,
        },
    }
    edges = measured.pop("edges")  # the counters at each phase's edges: not for the JSON
    report["summary"] = summary_of(args, measured, edges)
    report.update(measured)
    return report


if __name__ == "__main__":
    try:
        main()
    except density.DeadlinePassed as exc:
        say(f"{exc}: everything it started is stopped")
        sys.exit(1)
    except KeyboardInterrupt:
        say("interrupted: everything it started is stopped")
        sys.exit(130)
