"""Sessions per web process: `make bench BENCH=density` (python -m benchmarks.density).

Starts its own stack: a Redis server of its own on a free port, Postgres
through our PgBouncer (a fresh `parley_bench` database, migrated and seeded),
and ONE web process (`daphne config.asgi:application`) pinned to core 0 with
`taskset`. Speech-to-text jobs go to a Redis db that no worker reads, so they
pile up unread and only the web tier is measured. This process is the load
generator: one asyncio loop on core 1 (the `websockets` package) that opens N
sockets with real session cookies, sends `hello`, and streams the English test
clips (one clip, 1 s of silence, the next clip, ...) in 100 ms frames of 3200
bytes at real-time pace on an absolute schedule, with a `ping` every second.
The ping -> pong round trip is the lag.

Per level of N streaming sessions (measured for --seconds once all N are open):
ping p50/p99, frames sent per second and frames sent > 50 ms late, CPU of the
web process (utime + stime, % of one core), its RSS (total, and per session
against the RSS before any socket), and socket errors (error events, unexpected
closes, failed handshakes). Then: --idle sockets that only ping every 5 s; the
same streaming client against a bare `websockets` server (--bare: the client is
not the limit); --per-call web processes with one session each (memory and CPU
of process-per-call against the shared process); optionally --server uvicorn
and --profile (py-spy, top entries in reports/density-profile.txt).

Prints a table and writes docs/benchmarks/density.json with the targets:
>= 400 streaming sessions at ping p99 <= 50 ms with no socket errors, >= 2,000
idle sockets, and memory per streaming session >= 99% below process-per-call.
Everything it starts is stopped by pid at the end, on Ctrl-C and on errors too,
and a deadline (--deadline-minutes) stops a run that hangs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.util
import json
import os
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from benchmarks import stack
from tests.live import BIN, _command, http_get

ROOT = stack.ROOT
OUT = ROOT / "docs" / "benchmarks" / "density.json"
PROFILE_OUT = ROOT / "reports" / "density-profile.txt"

FRAME_BYTES = 3200  # 100 ms of PCM16 16 kHz mono
FRAME_S = 0.1
LATE_S = 0.05  # a frame sent later than this after its slot counts as late
CLIP_GAP = bytes(32_000)  # 1 s of silence after each clip
STREAM_PING_S = 1.0
IDLE_PING_S = 5.0
HANDSHAKE_TIMEOUT_S = 30.0  # connect + upgrade, and again hello -> ready
HANDSHAKES_IN_FLIGHT = 64
PONG_GRACE_S = 2.0  # after the window, for pongs of pings sent in it
BROKER_DB = 15  # CELERY_BROKER_URL: a db of our Redis that no worker reads
HELLO = json.dumps({"type": "hello", "protocol": 1})

TARGET_STREAMING = 400
TARGET_P99_MS = 50.0
TARGET_IDLE = 2000
TARGET_MEMORY_BELOW = 0.99

# Variables that would point the web process at something other than our stack.
ENV_DROP = (
    "CACHE_URL", "CHANNEL_LAYER_URL", "CELERY_BROKER_URL", "AUDIO_STORE_URL",
    "CELERY_RESULT_BACKEND", "DATABASE_URL", "REDIS_URL", "SQLITE_PATH", "DJANGO_ENV",
    "LLM_KIND", "LLM_BASE_URL", "LLM_API_KEY", "LLM_MODEL", "OPENAI_API_KEY",
    "OPENAI_BASE_URL", "STT_KIND", "TTS_KIND", "PARLEY_TEST_MODE", "DATABASE_TEST_NAME",
    "WEBSOCKET_ALLOWED_ORIGINS", "DEBUG",
)  # fmt: skip


def say(message: str) -> None:
    print(f"density: {message}", file=sys.stderr, flush=True)


# --- The environment and the data -----------------------------------------------------


def bench_env(redis: stack.RedisServer) -> dict:
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ENV_DROP and name.removesuffix("_FILE") not in ENV_DROP
    }
    env.update(
        DJANGO_SETTINGS_MODULE="config.settings",
        DATABASE_URL=stack.database_url(stack.BENCH_DATABASE),
        REDIS_URL=redis.url(0),
        CELERY_BROKER_URL=redis.url(BROKER_DB),
        HF_HUB_OFFLINE="1",
        LOG_LEVEL="WARNING",
        DEBUG="0",  # no per-query log in the long-lived process
        PYTHONUNBUFFERED="1",
    )
    return env


# Run in a subprocess with the benchmark's environment: N users, each with a
# conversation and a signed-in session. Writes [[conversation id, session key], ...].
USERS_SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
from tests.live import install_network_guard
install_network_guard()
import django
django.setup()
from django.db import transaction
from apps.accounts.models import User
from apps.accounts.services import session_key_create
from apps.conversations.services import conversation_start
from apps.personas.models import Persona

count, slug, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
persona = Persona.objects.get(slug=slug)
names = [f"density-{{slug}}-{{i:05d}}" for i in range(count)]  # one set per persona
User.objects.bulk_create([User(username=name, password="!") for name in names])
rows = []
with transaction.atomic():
    for user in User.objects.filter(username__in=names).order_by("username"):
        conversation = conversation_start(user=user, persona=persona)
        rows.append([str(conversation.id), session_key_create(user=user)])
with open(out, "w") as handle:
    json.dump(rows, handle)
"""


def users_create(env: dict, count: int, persona: str) -> list[tuple[str, str]]:
    """(conversation id, session key) for `count` fresh users, in one subprocess."""
    with tempfile.TemporaryDirectory(prefix="density-") as folder:
        out = Path(folder) / "users.json"
        script = USERS_SCRIPT.format(root=str(ROOT))
        command = [sys.executable, "-c", script, str(count), persona, str(out)]
        subprocess.run(command, cwd=ROOT, env=env, check=True)
        return [tuple(row) for row in json.loads(out.read_text())]


def speech_frames() -> list[bytes]:
    """The English test clips, each followed by 1 s of silence, in 3200-byte frames."""
    from tests.audio import english_clips, pcm_of

    pcm = b"".join(pcm_of(name) + CLIP_GAP for name in english_clips())
    pcm += bytes(-len(pcm) % FRAME_BYTES)
    return [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm), FRAME_BYTES)]


# --- Servers -------------------------------------------------------------------------


@dataclass
class Web:
    kind: str
    proc: stack.Proc
    port: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, conversation_id: str) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/conversations/{conversation_id}/"


def web_start(kind: str, env: dict, core: int | None, procs: list) -> Web:
    """daphne (or uvicorn) serving config.asgi:application on a free port, on `core`."""
    port = stack.free_port()
    env = {**env, "WEBSOCKET_ALLOWED_ORIGINS": f"http://127.0.0.1:{port}"}
    app = "config.asgi:application"
    if kind == "daphne":
        command = _command("daphne", "-b", "127.0.0.1", "-p", str(port), app)
    elif kind == "uvicorn":
        command = _command(
            "uvicorn", app, "--host", "127.0.0.1", "--port", str(port),
            "--ws", "websockets", "--log-level", "warning",
        )  # fmt: skip
    elif kind == "bare":
        command = [sys.executable, "-m", "benchmarks.density", "--bare-server", str(port)]
    else:
        raise ValueError(kind)
    proc = stack.spawn(stack.pinned(command, core), env, f"density-{kind}-{port}")
    procs.append(proc)
    return Web(kind=kind, proc=proc, port=port)


def web_wait(web: Web, timeout_s: float = 120.0) -> None:
    def ready() -> bool:
        if web.kind == "bare":
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", web.port), 1):
                return True
            return False
        try:
            return http_get(f"{web.origin}/healthz", timeout_s=2)[0] == 200
        except OSError:
            return False

    stack.wait_until(ready, web.proc, f"{web.kind} on port {web.port}", timeout_s)


async def _bare_handler(ws) -> None:
    """Answers `hello` with `ready` and `ping` with `pong`; discards audio."""
    async for message in ws:
        if isinstance(message, bytes):
            continue
        event = json.loads(message)
        if event.get("type") == "hello":
            await ws.send(json.dumps({"type": "ready", "protocol": 1}))
        elif event.get("type") == "ping":
            await ws.send(json.dumps({"type": "pong", "t": event.get("t")}))


async def bare_serve(port: int) -> None:
    from websockets.asyncio.server import serve

    async with serve(
        _bare_handler, "127.0.0.1", port, compression=None, max_size=None,
        ping_interval=None, backlog=1024,
    ):  # fmt: skip
        await asyncio.Future()


# --- The client ----------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    url: str
    origin: str
    cookie: str = ""


@dataclass
class Stats:
    """One level's counts. Frames and pings count only inside the window;
    errors, closes and failed handshakes count over the whole level."""

    window: bool = False
    rtts_ms: list[float] = field(default_factory=list)
    pings: int = 0
    frames: int = 0
    late: int = 0
    opened: int = 0
    errors: Counter = field(default_factory=Counter)  # error events after ready, by code
    closes: Counter = field(default_factory=Counter)  # unexpected closes, by code
    handshakes: Counter = field(default_factory=Counter)  # failed handshakes, by reason


class Session:
    def __init__(self, target: Target, stats: Stats) -> None:
        self.target = target
        self.stats = stats
        self.ws: ClientConnection | None = None
        self.reader: asyncio.Task | None = None
        self.ready = asyncio.Event()
        self.opened = False
        self.closing = False
        self.refused = ""
        self.pings: dict[float, bool] = {}  # ping t -> sent inside the window

    async def open(self) -> bool:
        headers = {"Cookie": f"sessionid={self.target.cookie}"} if self.target.cookie else None
        try:
            self.ws = await connect(
                self.target.url, origin=self.target.origin, additional_headers=headers,
                compression=None, proxy=None, open_timeout=HANDSHAKE_TIMEOUT_S,
                ping_interval=None, close_timeout=5, max_size=None,
            )  # fmt: skip
        except InvalidStatus as exc:
            return self._failed(f"http_{exc.response.status_code}")
        except TimeoutError:
            return self._failed("timeout")
        except (OSError, WebSocketException) as exc:
            return self._failed(type(exc).__name__)
        self.reader = asyncio.create_task(self.read())
        try:
            await self.ws.send(HELLO)
            await asyncio.wait_for(self.ready.wait(), HANDSHAKE_TIMEOUT_S)
        except ConnectionClosed:
            pass
        except TimeoutError:
            self.refused = self.refused or "no_ready"
        if self.refused:
            return self._failed(self.refused)
        self.opened = True
        return True

    def _failed(self, reason: str) -> bool:
        self.stats.handshakes[reason] += 1
        return False

    async def read(self) -> None:
        ws, stats = self.ws, self.stats
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    continue
                event = json.loads(message)
                kind = event.get("type")
                self.on_event(event)
                if kind == "pong":
                    if self.pings.pop(event.get("t"), False):
                        stats.rtts_ms.append((time.monotonic() - event["t"]) * 1000)
                elif kind == "ready":
                    self.ready.set()
                elif kind == "error":
                    code = str(event.get("code"))
                    if self.ready.is_set():
                        stats.errors[code] += 1
                    else:
                        self.refused = f"error_{code}"
        except ConnectionClosed:
            pass
        finally:
            if not self.closing:
                code = ws.close_code or 1006
                if self.opened:
                    stats.closes[str(code)] += 1
                else:
                    self.refused = self.refused or f"closed_{code}"
            self.ready.set()

    def on_event(self, event: dict) -> None:
        """Every JSON event as it arrives (a hook for benchmarks.database's speakers)."""

    async def ping(self) -> None:
        t = time.monotonic()
        self.pings[t] = self.stats.window
        self.stats.pings += self.stats.window
        await self.ws.send(json.dumps({"type": "ping", "t": t}))

    async def stream(self, frames: list[bytes], offset: int) -> None:
        """Real-time audio on an absolute schedule (a late frame doesn't shift the
        next), from a random phase; a ping with every 10th frame."""
        stats, count = self.stats, len(frames)
        start = time.monotonic() + random.random() * FRAME_S
        k = 0
        with contextlib.suppress(ConnectionClosed):
            while True:
                due = start + k * FRAME_S
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await self.ws.send(frames[(offset + k) % count])
                if stats.window:
                    stats.frames += 1
                    stats.late += time.monotonic() - due > LATE_S
                if k % round(STREAM_PING_S / FRAME_S) == 0:
                    await self.ping()
                k += 1

    async def idle(self) -> None:
        start = time.monotonic() + random.random() * IDLE_PING_S
        k = 0
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.sleep(max(0.0, start + k * IDLE_PING_S - time.monotonic()))
                await self.ping()
                k += 1

    def unanswered(self) -> int:
        return sum(self.pings.values())

    async def close(self) -> None:
        self.closing = True
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()
        if self.reader is not None:
            with contextlib.suppress(Exception):
                await self.reader


def _rss_mb(pids: list[int]) -> float:
    return sum(stack.rss_bytes(pid) for pid in pids) / 2**20


def _cpu_s(pids: list[int]) -> float:
    return sum(stack.cpu_seconds(pid) for pid in pids)


def _self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_level(
    label: str,
    targets: list[Target],
    *,
    mode: str,
    seconds: float,
    ramp: float,
    pids: list[int],
    base_rss_mb: float,
    frames: list[bytes],
    redis_pid: int | None = None,
    profile: tuple[int, float, int | None] | None = None,  # (pid, seconds, core)
    settle_s: float = 1.0,
) -> dict:
    """Open every socket (at `ramp` per second), measure `seconds` once all are
    open (or failed), then close them all."""
    stats = Stats()
    sessions = [Session(target, stats) for target in targets]
    rss_before = _rss_mb(pids)
    pending = len(sessions)
    resolved = asyncio.Event()
    gate = asyncio.Semaphore(HANDSHAKES_IN_FLIGHT)
    started = time.monotonic()

    async def life(index: int, session: Session) -> None:
        nonlocal pending
        await asyncio.sleep(max(0.0, started + index / ramp - time.monotonic()))
        try:
            async with gate:
                ok = await session.open()
        finally:
            pending -= 1
            if pending == 0:
                resolved.set()
        if not ok:
            return
        stats.opened += 1
        if mode == "stream":
            await session.stream(frames, random.randrange(len(frames)))
        else:
            await session.idle()

    tasks = [asyncio.create_task(life(i, s)) for i, s in enumerate(sessions)]
    profiler = None
    try:
        if sessions:
            budget = len(sessions) / ramp + 2 * HANDSHAKE_TIMEOUT_S + 30
            try:
                await asyncio.wait_for(resolved.wait(), budget)
            except TimeoutError:
                say(f"{label}: {pending} sockets still opening after {budget:.0f} s; measuring")
        ramp_s = time.monotonic() - started

        if profile is not None:
            profiler = await _profile_start(*profile)
        cpu0, self0 = _cpu_s(pids), _self_cpu_s()
        redis0 = stack.cpu_seconds(redis_pid) if redis_pid else 0.0
        window0 = time.monotonic()
        stats.window = True
        rss_peak = 0.0
        while (left := window0 + seconds - time.monotonic()) > 0:
            await asyncio.sleep(min(1.0, left))
            rss_peak = max(rss_peak, _rss_mb(pids))
        stats.window = False
        window_s = time.monotonic() - window0
        cpu_s, self_s = _cpu_s(pids) - cpu0, _self_cpu_s() - self0
        redis_s = stack.cpu_seconds(redis_pid) - redis0 if redis_pid else None
        rss_mb = _rss_mb(pids)

        grace_end = time.monotonic() + PONG_GRACE_S
        while any(s.unanswered() for s in sessions) and time.monotonic() < grace_end:
            await asyncio.sleep(0.1)
        unanswered = sum(s.unanswered() for s in sessions)
        if profiler is not None:
            await _profile_finish(profiler, profile[1])
    finally:
        if profiler is not None and profiler[0].returncode is None:
            with contextlib.suppress(ProcessLookupError):
                profiler[0].kill()  # interrupted: stop py-spy (our child, by pid)
            await profiler[0].wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
    await _settle(pids, settle_s)

    n = len(sessions)
    socket_errors = sum(stats.errors.values()) + sum(stats.closes.values())
    socket_errors += sum(stats.handshakes.values())
    level = {
        "sessions": n,
        "mode": mode,
        "opened": stats.opened,
        "ramp_s": round(ramp_s, 1),
        "window_s": round(window_s, 1),
        "ping_ms": {
            "p50": _round(stack.percentile(stats.rtts_ms, 0.5), 1),
            "p99": _round(stack.percentile(stats.rtts_ms, 0.99), 1),
            "max": _round(max(stats.rtts_ms, default=None), 1),
            "n": len(stats.rtts_ms),
        },
        "pings_sent": stats.pings,
        "pings_unanswered": unanswered,
        "cpu_percent": round(100 * cpu_s / window_s, 1),
        "cpu_percent_per_session": round(100 * cpu_s / window_s / n, 3) if n else None,
        "client_cpu_percent": round(100 * self_s / window_s, 1),
        "redis_cpu_percent": None if redis_s is None else round(100 * redis_s / window_s, 1),
        "rss_mb": round(rss_mb, 1),
        "rss_peak_mb": round(max(rss_peak, rss_mb), 1),
        "rss_before_level_mb": round(rss_before, 1),
        "rss_base_mb": round(base_rss_mb, 1),
        # The spec'd figure: against the RSS before any socket was opened.
        "rss_per_session_kb": round((rss_mb - base_rss_mb) * 1024 / n, 1) if n else None,
        # Against the RSS just before this level (after the previous one closed).
        "rss_marginal_per_session_kb": round((rss_mb - rss_before) * 1024 / n, 1) if n else None,
        "socket_errors": socket_errors,
        "errors_by_code": dict(stats.errors),
        "closes_by_code": dict(stats.closes),
        "handshake_failures": dict(stats.handshakes),
    }
    if mode == "stream":
        level.update(
            frames_per_s=round(stats.frames / window_s, 1),
            frames_expected_per_s=round(stats.opened / FRAME_S, 1),
            frames_late=stats.late,
            frames_late_percent=round(100 * stats.late / stats.frames, 2) if stats.frames else 0,
        )
    ping = level["ping_ms"]
    say(
        f"{label}: {stats.opened}/{n} open, ping p50 {ping['p50']} p99 {ping['p99']} ms, "
        f"web CPU {level['cpu_percent']}%, RSS {level['rss_mb']} MB, "
        f"socket errors {socket_errors}"
    )
    return level


async def _settle(pids: list[int], at_least_s: float, quiet: float = 0.1, most_s: float = 30):
    """Let the server finish the disconnects: until its CPU stays under `quiet` of
    a core per process for half a second (at least `at_least_s`, at most `most_s`)."""
    started = time.monotonic()
    await asyncio.sleep(at_least_s)
    while time.monotonic() - started < most_s:
        before = _cpu_s(pids)
        await asyncio.sleep(0.5)
        if _cpu_s(pids) - before < 0.5 * quiet * len(pids):
            return


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


# --- Profile -------------------------------------------------------------------------


async def _profile_start(pid: int, seconds: float, core: int | None):
    py_spy = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
    if not py_spy:
        say("--profile: py-spy is not installed (pip install -r requirements-dev.txt); skipped")
        return None
    raw = PROFILE_OUT.with_suffix(".raw")
    raw.parent.mkdir(parents=True, exist_ok=True)
    command = stack.pinned(
        [
            py_spy, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
            "--rate", "100", "--nonblocking", "--format", "raw", "--output", str(raw),
        ],
        core,
    )  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    return process, raw


async def _profile_finish(profiler, seconds: float) -> None:
    process, raw = profiler
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), seconds + 30)
    except TimeoutError:
        process.kill()
        await process.wait()
        say("--profile: py-spy did not finish in time; killed")
        return
    if process.returncode != 0 or not raw.exists():
        say(f"--profile: py-spy failed ({process.returncode}): {stderr.decode()[-500:]}")
        return
    PROFILE_OUT.write_text(_profile_summary(raw.read_text(), seconds))
    say(f"profile: {PROFILE_OUT.relative_to(ROOT)} (collapsed stacks: {raw.relative_to(ROOT)})")


LINE_NUMBER = re.compile(r"\(([^()]*):\d+\)$")  # "f (path.py:12)" -> "f (path.py)"


def _profile_summary(collapsed: str, seconds: float, top: int = 40) -> str:
    """Top functions (all their lines together) by own samples and by samples with
    them anywhere on the stack."""
    own: Counter = Counter()
    inclusive: Counter = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack_text, _, count = line.rpartition(" ")
        if not stack_text or not count.isdigit():
            continue
        samples = int(count)
        frames = [LINE_NUMBER.sub(r"(\1)", frame) for frame in stack_text.split(";")]
        total += samples
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    lines = [
        f"py-spy record --nonblocking --rate 100, {seconds:.0f} s of the web process at the "
        f"largest streaming level; {total} samples (idle threads excluded)",
        "",
        f"Top {top} by own samples:",
    ]
    lines += [f"{100 * n / total:6.2f}%  {frame}" for frame, n in own.most_common(top)]
    lines += ["", f"Top {top} by samples on the stack (inclusive):"]
    lines += [f"{100 * n / total:6.2f}%  {frame}" for frame, n in inclusive.most_common(top)]
    return "\n".join(lines) + "\n" if total else "py-spy recorded no samples\n"


# --- Phases --------------------------------------------------------------------------


async def server_phase(kind: str, args, env, users, frames, procs, redis) -> dict:
    """Every streaming level, then the idle sockets, against one web process."""
    web = web_start(kind, env, args.server_core, procs)
    web_wait(web)
    await asyncio.sleep(1)
    base = _rss_mb([web.pid])
    say(f"{kind} pid {web.pid} on port {web.port}: RSS before any socket {base:.1f} MB")
    result = {"pid": web.pid, "rss_base_mb": round(base, 1), "levels": [], "idle": None}
    largest = max(args.sessions, default=0)
    for n in args.sessions:
        targets = [Target(web.ws_url(c), web.origin, k) for c, k in users[:n]]
        profile = None
        if args.profile and kind == "daphne" and n == largest:
            profile = (web.pid, args.profile, args.client_core)
        level = await run_level(
            f"{kind} {n} streaming", targets, mode="stream", seconds=args.seconds,
            ramp=args.ramp, pids=[web.pid], base_rss_mb=base, frames=frames,
            redis_pid=redis.proc.pid, profile=profile,
        )  # fmt: skip
        result["levels"].append(level)
    if args.idle:
        targets = [Target(web.ws_url(c), web.origin, k) for c, k in users[: args.idle]]
        result["idle"] = await run_level(
            f"{kind} {args.idle} idle", targets, mode="idle", seconds=args.idle_seconds,
            ramp=args.ramp, pids=[web.pid], base_rss_mb=base, frames=frames,
            redis_pid=redis.proc.pid,
        )  # fmt: skip
    web.proc.stop()
    return result


async def bare_phase(args, frames, procs) -> dict:
    web = web_start("bare", os.environ, args.server_core, procs)
    web_wait(web)
    await asyncio.sleep(0.5)
    base = _rss_mb([web.pid])
    targets = [Target(web.ws_url(str(i)), web.origin) for i in range(args.bare)]
    level = await run_level(
        f"bare websockets server {args.bare} streaming", targets, mode="stream",
        seconds=args.seconds, ramp=args.ramp, pids=[web.pid], base_rss_mb=base,
        frames=frames,
    )  # fmt: skip
    web.proc.stop()
    return level


async def per_call_phase(args, env, users, frames, procs, redis) -> dict:
    """One web process per call: --per-call processes with one session each."""
    webs = [web_start("daphne", env, args.server_core, procs) for _ in range(args.per_call)]
    for web in webs:
        web_wait(web, timeout_s=60 + 30 * args.per_call)
    await asyncio.sleep(1)
    pids = [web.pid for web in webs]
    base = _rss_mb(pids)
    targets = [
        Target(web.ws_url(conversation), web.origin, key)
        for web, (conversation, key) in zip(webs, users, strict=False)
    ]
    level = await run_level(
        f"process-per-call x{args.per_call}", targets, mode="stream", seconds=args.seconds,
        ramp=args.ramp, pids=pids, base_rss_mb=base, frames=frames, redis_pid=redis.proc.pid,
    )  # fmt: skip
    for web in webs:
        web.proc.stop()
    k = args.per_call
    level.update(
        processes=k,
        # Process-per-call: each session costs its whole process.
        rss_per_session_kb=round(level["rss_mb"] * 1024 / k, 1),
        rss_per_session_mb=round(level["rss_mb"] / k, 1),
        rss_added_per_session_kb=level["rss_per_session_kb"],  # over the idle processes
        cpu_percent_per_session=round(level["cpu_percent"] / k, 3),
    )
    return level


def comparison(levels: list[dict], per_call: dict) -> dict | None:
    """Shared process (the level closest to --per-call sessions) vs process-per-call."""
    if not levels or not per_call:
        return None
    k = per_call["processes"]
    shared = min(levels, key=lambda level: (abs(level["sessions"] - k), -level["sessions"]))
    shared_kb = shared["rss_per_session_kb"]
    call_kb = per_call["rss_per_session_kb"]
    shared_cpu, call_cpu = shared["cpu_percent_per_session"], per_call["cpu_percent_per_session"]
    memory_ratio = shared_kb / call_kb if call_kb else None
    return {
        "shared_level_sessions": shared["sessions"],
        "shared_rss_per_session_kb": shared_kb,
        "per_call_rss_per_session_kb": round(call_kb, 1),
        "memory_ratio": _round(memory_ratio, 5),
        "memory_below": _round(None if memory_ratio is None else 1 - memory_ratio, 5),
        "shared_cpu_percent_per_session": shared_cpu,
        "per_call_cpu_percent_per_session": call_cpu,
        "cpu_ratio": _round(shared_cpu / call_cpu, 3) if call_cpu else None,
        "every_level_memory_below": {
            level["sessions"]: _round(1 - level["rss_per_session_kb"] / call_kb, 5)
            for level in levels
            if call_kb
        },
    }


# --- Targets ---------------------------------------------------------------------------


def _passes(level: dict) -> bool:
    p99 = level["ping_ms"]["p99"]
    return (
        p99 is not None
        and p99 <= TARGET_P99_MS
        and level["socket_errors"] == 0
        and level["pings_unanswered"] == 0
        and level["opened"] == level["sessions"]
    )


def targets_check(report: dict) -> list[dict]:
    daphne = report["servers"].get("daphne") or {}
    levels = daphne.get("levels") or []
    out = []

    name = (
        f">= {TARGET_STREAMING} streaming sessions with ping p99 <= {TARGET_P99_MS:.0f} ms "
        "and zero socket errors"
    )
    passing = [level for level in levels if _passes(level)]
    best = max((level["sessions"] for level in passing), default=0)
    largest = max((level["sessions"] for level in levels), default=0)
    if best >= TARGET_STREAMING:
        p99 = next(lv for lv in passing if lv["sessions"] == best)["ping_ms"]["p99"]
        detail = f"met at {best} sessions (p99 {p99} ms): {best / TARGET_STREAMING:.2f}x the target"
    elif largest < TARGET_STREAMING:
        detail = (
            f"not measured: the largest level run was {largest} sessions "
            f"(best passing level {best}); run the default levels"
        )
    else:
        first = min(
            (lv for lv in levels if lv["sessions"] >= TARGET_STREAMING and not _passes(lv)),
            key=lambda lv: lv["sessions"],
        )
        p99 = first["ping_ms"]["p99"]
        over = "-" if p99 is None else f"{p99 - TARGET_P99_MS:+.1f} ms against the 50 ms bar"
        detail = (
            f"largest passing level {best} sessions ({best / TARGET_STREAMING:.0%} of the "
            f"target); at {first['sessions']}: p99 {p99} ms ({over}), "
            f"{first['socket_errors']} socket errors, {first['pings_unanswered']} pongs missing"
        )
    out.append({"target": name, "met": best >= TARGET_STREAMING, "detail": detail})

    name = f">= {TARGET_IDLE} idle sockets"
    idle = daphne.get("idle")
    if idle is None:
        out.append({"target": name, "met": False, "detail": "not measured (--idle 0)"})
    else:
        met = idle["opened"] >= TARGET_IDLE and idle["socket_errors"] == 0
        detail = (
            f"{idle['opened']} of {idle['sessions']} held "
            f"({idle['opened'] / TARGET_IDLE:.0%} of {TARGET_IDLE}), "
            f"{sum(idle['handshake_failures'].values())} handshake failures, "
            f"{idle['socket_errors']} socket errors, ping p99 {idle['ping_ms']['p99']} ms"
        )
        if idle["sessions"] < TARGET_IDLE:
            detail += f"; only {idle['sessions']} asked for (--idle)"
        out.append({"target": name, "met": met, "detail": detail})

    name = f"memory per streaming session >= {TARGET_MEMORY_BELOW:.0%} below process-per-call"
    compared = report.get("comparison")
    if not compared or compared["memory_below"] is None:
        out.append({"target": name, "met": False, "detail": "not measured (--per-call 0)"})
    else:
        below = compared["memory_below"]
        detail = (
            f"{below:.2%} below at {compared['shared_level_sessions']} sessions "
            f"({compared['shared_rss_per_session_kb']} KB vs "
            f"{compared['per_call_rss_per_session_kb']:.0f} KB per session; "
            f"{100 * (below - TARGET_MEMORY_BELOW):+.2f} points against "
            f"{TARGET_MEMORY_BELOW:.0%})"
        )
        out.append({"target": name, "met": below >= TARGET_MEMORY_BELOW, "detail": detail})
    return out


# --- Output ------------------------------------------------------------------------------


def _cell(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _errors_text(level: dict) -> str:
    parts = [f"error {c}: {n}" for c, n in level["errors_by_code"].items()]
    parts += [f"close {c}: {n}" for c, n in level["closes_by_code"].items()]
    parts += [f"handshake {c}: {n}" for c, n in level["handshake_failures"].items()]
    return str(level["socket_errors"]) + (f" ({', '.join(parts)})" if parts else "")


STREAM_HEADER = (
    "| sessions | open | ping p50 ms | ping p99 ms | frames/s (of) | late frames | "
    "web CPU % | RSS MB | RSS/session KB | marginal KB | client CPU % | socket errors |\n"
    "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
)


def _stream_row(level: dict, label: str | None = None) -> str:
    cells = [
        label or str(level["sessions"]),
        level["opened"],
        level["ping_ms"]["p50"],
        level["ping_ms"]["p99"],
        f"{level['frames_per_s']:.0f} ({level['frames_expected_per_s']:.0f})",
        level["frames_late"],
        level["cpu_percent"],
        level["rss_mb"],
        level["rss_per_session_kb"],
        level["rss_marginal_per_session_kb"],
        level["client_cpu_percent"],
        _errors_text(level),
    ]
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def table(report: dict) -> str:
    machine, settings = report["machine"], report["settings"]
    lines = [
        f"Density: {machine['nproc']} cores ({machine['cpu_model']}); web process on core "
        f"{settings['server_core']}, client on core {settings['client_core']}, Redis on core "
        f"{settings['redis_core']}; {settings['seconds']:.0f} s per level; "
        f"commit {report['git']['commit'][:12] or 'unknown'}"
        f"{' (dirty)' if report['git']['dirty'] else ''}",
    ]
    for kind, result in report["servers"].items():
        if "skipped" in result:
            lines += ["", f"{kind}: skipped: {result['skipped']}"]
            continue
        lines += [
            "",
            f"## Streaming sessions, one {kind} process "
            f"(RSS before any socket {result['rss_base_mb']} MB)",
            "",
            STREAM_HEADER,
        ]
        lines += [_stream_row(level) for level in result["levels"]]
        idle = result["idle"]
        if idle:
            lines += [
                "",
                f"## Idle sockets, one {kind} process (a ping every {IDLE_PING_S:.0f} s)",
                "",
                "| sockets | open | ping p50 ms | ping p99 ms | web CPU % | RSS MB | "
                "RSS/socket KB | marginal KB | handshake failures | socket errors |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
                "| "
                + " | ".join(
                    _cell(c)
                    for c in (
                        idle["sessions"],
                        idle["opened"],
                        idle["ping_ms"]["p50"],
                        idle["ping_ms"]["p99"],
                        idle["cpu_percent"],
                        idle["rss_mb"],
                        idle["rss_per_session_kb"],
                        idle["rss_marginal_per_session_kb"],
                        sum(idle["handshake_failures"].values()),
                        _errors_text(idle),
                    )
                )
                + " |",
            ]
    bare = report.get("bare")
    if bare:
        lines += [
            "",
            "## Client check: the same client against a bare websockets server "
            "(hello -> ready, ping -> pong, audio discarded)",
            "",
            STREAM_HEADER,
            _stream_row(bare),
        ]
    per_call = report.get("per_call")
    if per_call:
        compared = report["comparison"]
        lines += [
            "",
            f"## Process-per-call: {per_call['processes']} daphne processes, one streaming "
            "session each",
            "",
            STREAM_HEADER,
            _stream_row(per_call, f"{per_call['processes']} x 1"),
            "",
            f"Process-per-call: total RSS {per_call['rss_mb']} MB, "
            f"{per_call['rss_per_session_mb']} MB per session; CPU {per_call['cpu_percent']}% "
            f"total, {per_call['cpu_percent_per_session']}% per session.",
            f"Shared process at {compared['shared_level_sessions']} sessions: "
            f"{compared['shared_rss_per_session_kb']} KB and "
            f"{compared['shared_cpu_percent_per_session']}% CPU per session: memory ratio "
            f"{compared['memory_ratio']} ({compared['memory_below']:.2%} below process-per-call:"
            f" {'at least' if compared['memory_below'] >= TARGET_MEMORY_BELOW else 'NOT'} 99%),"
            f" CPU ratio {compared['cpu_ratio']}.",
        ]
    lines += ["", "## Targets", ""]
    for target in report["targets"]:
        lines.append(f"- {'MET' if target['met'] else 'NOT MET'}: {target['target']}: "
                     f"{target['detail']}")  # fmt: skip
    return "\n".join(lines)


# --- Main ------------------------------------------------------------------------------


def _levels(text: str) -> list[int]:
    levels = sorted({int(part) for part in text.split(",") if part.strip()})
    if any(n <= 0 for n in levels):
        raise argparse.ArgumentTypeError("levels are positive session counts")
    return levels


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.density", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--sessions",
        type=_levels,
        default=_levels("25,50,100,200,400,800"),
        help="streaming levels, comma-separated (default 25,50,100,200,400,800)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=20.0,
        help="measured window per level, once all its sockets are open",
    )
    parser.add_argument(
        "--idle",
        type=int,
        default=2000,
        help="idle sockets (hello, then a ping every 5 s); 0 to skip",
    )
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=None,
        help="window of the idle level (default: --seconds)",
    )
    parser.add_argument(
        "--per-call",
        type=int,
        default=10,
        help="process-per-call comparison: this many web processes, one session each; 0 to skip",
    )
    parser.add_argument(
        "--bare",
        type=int,
        default=None,
        help="sessions against a bare websockets server (default: the largest level); 0 to skip",
    )
    parser.add_argument(
        "--server",
        default="daphne",
        help="web servers, comma-separated; daphne always runs (the targets "
        "are judged on it), others (uvicorn) run the same levels after it",
    )
    parser.add_argument(
        "--profile",
        type=float,
        default=0,
        metavar="SECONDS",
        help="py-spy the web process for SECONDS at the largest level",
    )
    parser.add_argument("--ramp", type=float, default=200.0, help="sockets opened per second")
    parser.add_argument("--persona", default="ada", help="persona slug (seed_demo)")
    parser.add_argument("--server-core", type=int, default=0)
    parser.add_argument("--client-core", type=int, default=1)
    parser.add_argument(
        "--redis-core",
        type=int,
        default=None,
        help="core for our Redis (default: the client's, keeping the web process's core to itself)",
    )
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--deadline-minutes",
        type=float,
        default=None,
        help="stop everything after this long (default: an estimate x2)",
    )
    parser.add_argument("--bare-server", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.idle_seconds is None:
        args.idle_seconds = args.seconds
    if args.bare is None:
        args.bare = max(args.sessions, default=0)
    if args.redis_core is None:
        args.redis_core = args.client_core
    servers = [s.strip() for s in args.server.split(",") if s.strip()]
    unknown = set(servers) - {"daphne", "uvicorn"}
    if unknown:
        parser.error(f"--server: unknown {', '.join(sorted(unknown))} (daphne, uvicorn)")
    args.servers = ["daphne"] + [s for s in dict.fromkeys(servers) if s != "daphne"]
    cores = os.cpu_count() or 1
    for name in ("server_core", "client_core", "redis_core"):
        if getattr(args, name) >= cores:
            say(f"--{name.replace('_', '-')} {getattr(args, name)}: only {cores} cores; unpinned")
            setattr(args, name, None)
    return args


def _estimate_s(args) -> float:
    def level_s(n: int, seconds: float) -> float:
        return n / args.ramp + seconds + PONG_GRACE_S + 15

    per_server = sum(level_s(n, args.seconds) for n in args.sessions) + 60
    per_server += level_s(args.idle, args.idle_seconds) if args.idle else 0
    total = 300 + per_server * len(args.servers)
    total += level_s(args.bare, args.seconds) + 30 if args.bare else 0
    total += level_s(args.per_call, args.seconds) + 60 + 30 * args.per_call
    return total + args.profile


class DeadlinePassed(KeyboardInterrupt):
    """Raised by SIGALRM; a KeyboardInterrupt, so that asyncio tasks don't swallow it."""


def on_signal(signum, _frame):
    if signum == signal.SIGALRM:
        raise DeadlinePassed("the deadline passed (--deadline-minutes)")
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.bare_server is not None:
        asyncio.run(bare_serve(args.bare_server))
        return
    deadline_s = (args.deadline_minutes * 60) if args.deadline_minutes else 2 * _estimate_s(args)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGALRM, on_signal)
    signal.alarm(max(1, round(deadline_s)))
    say(f"deadline in {deadline_s / 60:.0f} min")
    procs: list[stack.Proc] = []
    try:
        report = run(args, procs)
    finally:
        signal.alarm(0)
        for proc in reversed(procs):
            proc.stop()
    text = table(report)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {shown(args.out)}")


def shown(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(ROOT))
    return str(path)


def run(args, procs: list[stack.Proc]) -> dict:
    if args.client_core is not None:
        os.sched_setaffinity(0, {args.client_core})
    wanted = max([*args.sessions, args.idle, args.bare, args.per_call]) + 256
    nofile = stack.raise_nofile(max(65_536, wanted))
    if nofile < wanted:
        say(f"open-files limit {nofile} is below the {wanted} sockets this run needs")

    say("stack: Postgres + PgBouncer (scripts/services.sh up), a fresh parley_bench, our Redis")
    stack.services_up()
    stack.database_recreate(stack.BENCH_DATABASE)
    redis = stack.redis_start(core=args.redis_core)
    procs.append(redis.proc)
    env = bench_env(redis)
    stack.migrate(env)
    manage = [sys.executable, "manage.py", "seed_demo"]
    subprocess.run(manage, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    count = max([*args.sessions, args.idle, args.per_call])
    started = time.monotonic()
    users = users_create(env, count, args.persona)
    took = time.monotonic() - started
    say(f"{len(users)} users, each with a conversation and a session, in {took:.1f} s")
    frames = speech_frames()
    gc.collect()
    gc.freeze()  # the long-lived setup stays out of the collector's way

    report: dict = {
        "benchmark": "density",
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python -m benchmarks.density " + shlex.join(sys.argv[1:]),
        "machine": stack.machine_info(),
        "git": stack.git_commit(),
        "settings": {
            "sessions": args.sessions,
            "seconds": args.seconds,
            "idle": args.idle,
            "idle_seconds": args.idle_seconds,
            "per_call": args.per_call,
            "bare": args.bare,
            "servers": args.servers,
            "ramp_per_s": args.ramp,
            "persona": args.persona,
            "server_core": args.server_core,
            "client_core": args.client_core,
            "redis_core": args.redis_core,
            "frame_bytes": FRAME_BYTES,
            "late_ms": LATE_S * 1000,
            "stream_ping_s": STREAM_PING_S,
            "idle_ping_s": IDLE_PING_S,
            "audio_loop_s": round(len(frames) * FRAME_S, 1),
            "open_files_limit": nofile,
        },
        "servers": {},
        "bare": None,
        "per_call": None,
        "comparison": None,
    }
    for kind in args.servers:
        if kind == "uvicorn" and not (
            importlib.util.find_spec("uvicorn") and (BIN / "uvicorn").exists()
        ):
            reason = "uvicorn is not installed in .venv (pip install uvicorn to compare)"
            say(f"--server uvicorn: skipped: {reason}")
            report["servers"][kind] = {"skipped": reason}
            continue
        report["servers"][kind] = asyncio.run(
            server_phase(kind, args, env, users, frames, procs, redis)
        )
        if kind == "daphne":
            if args.bare:
                report["bare"] = asyncio.run(bare_phase(args, frames, procs))
            if args.per_call:
                report["per_call"] = asyncio.run(
                    per_call_phase(args, env, users, frames, procs, redis)
                )
    report["comparison"] = comparison(report["servers"]["daphne"]["levels"], report["per_call"])
    report["targets"] = targets_check(report)
    return report


if __name__ == "__main__":
    try:
        main()
    except DeadlinePassed as exc:
        say(f"{exc}: everything it started is stopped")
        sys.exit(1)
    except KeyboardInterrupt:
        say("interrupted: everything it started is stopped")
        sys.exit(130)
