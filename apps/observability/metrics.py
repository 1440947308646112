"""Every Parley metric, in one place (docs/observability.md is the catalogue).

The code records through the small functions below, each called at the one
place where the figure is stored (a timing on a message, a frame received, a
task run). Names follow Prometheus conventions: the `parley_` prefix, base
units (seconds, bytes), `_total` on counters (prometheus_client adds it), and
only low-cardinality labels: a stage, an engine kind, a queue, a close code,
never a user, conversation or utterance id.

Web processes expose these on `/metrics` (with django-prometheus's); each
worker process on its own small HTTP server (apps/observability/exporter.py).
Both need the bearer token METRICS_TOKEN."""

from __future__ import annotations

import time
import weakref
from decimal import Decimal

from prometheus_client import Counter, Gauge, Histogram

# Per-stage latency: 50 ms to 10 s, where a voice turn's stages live.
STAGE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)
TASK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# The three stages of a voice turn, as stored on messages (docs/protocol.md).
SPEECH_END_TO_FINAL = "speech_end_to_final"
FINAL_TO_FIRST_TOKEN = "final_to_first_token"
FIRST_TOKEN_TO_FIRST_AUDIO = "first_token_to_first_audio"
STAGES = (SPEECH_END_TO_FINAL, FINAL_TO_FIRST_TOKEN, FIRST_TOKEN_TO_FIRST_AUDIO)

# --- This process ---------------------------------------------------------------
PROCESS = Gauge(
    "parley_process_info", "1 for each Parley process, labelled with its role.", ["role"]
)
READY = Gauge("parley_ready", "1 while this process reports ready (/readyz), else 0.")

# --- Realtime (web processes) ------------------------------------------------------
SOCKETS_OPEN = Gauge("parley_sockets_open", "Conversation sockets open in this process.")
SOCKETS_STREAMING = Gauge(
    "parley_sockets_streaming",
    "Open sockets that sent an audio frame within the last second.",
)
SOCKETS_OPENED = Counter(
    "parley_sockets_opened",
    "Conversation socket handshakes, by result (accepted, or the refusal's close code).",
    ["result"],
)
FRAMES = Counter(
    "parley_socket_frames_received", "Frames received, by kind (audio, control).", ["kind"]
)
FRAME_BYTES = Counter(
    "parley_socket_received_bytes", "Bytes of the frames received, by kind.", ["kind"]
)
PROTOCOL_ERRORS = Counter(
    "parley_socket_protocol_errors",
    "Protocol errors reported to clients, by code (a flood's repeats, sent at most once a "
    "second, are counted too).",
    ["code"],
)
SOCKET_CLOSES = Counter("parley_socket_closes", "Sockets closed, by close code.", ["code"])
CHANNEL_LAYER_LOSSES = Counter(
    "parley_channel_layer_losses",
    "Times the channel layer's Redis stopped answering reads (apps/realtime/layer.py).",
)
LOOP_LAG = Histogram(
    "parley_event_loop_lag_seconds",
    "How late a periodic timer on the event loop fires: the loop's responsiveness.",
    buckets=LAG_BUCKETS,
)

# --- Pipeline --------------------------------------------------------------------
STAGE_SECONDS = Histogram(
    "parley_stage_seconds",
    "A voice turn's stages (speech_end_to_final, final_to_first_token, "
    "first_token_to_first_audio) by the engine kind of that stage. Interrupted "
    "and failed turns are never observed here (parley_replies_total counts them).",
    ["stage", "engine"],
    buckets=STAGE_BUCKETS,
)
REPLIES = Counter(
    "parley_replies",
    "Replies finished, by LLM engine kind and outcome (complete, interrupted, failed).",
    ["engine", "outcome"],
)
STT_RTF = Histogram(
    "parley_stt_real_time_factor",
    "Model seconds per audio second of each transcription, by engine and purpose.",
    ["engine", "purpose"],
    buckets=RTF_BUCKETS,
)
STT_AUDIO_SECONDS = Counter(
    "parley_stt_audio_seconds",
    "Audio seconds transcribed, by engine and purpose (partial, candidate, final).",
    ["engine", "purpose"],
)
STT_BATCH_SIZE = Histogram(
    "parley_stt_batch_size",
    "Windows transcribed together in one model call, by kind (final, draft).",
    ["kind"],
    buckets=BATCH_BUCKETS,
)
LLM_TOKENS = Counter(
    "parley_llm_tokens",
    "LLM tokens, by engine kind and direction (in: prompt, out: completion).",
    ["engine", "direction"],
)
TTS_AUDIO_SECONDS = Counter(
    "parley_tts_audio_seconds", "Seconds of speech synthesised, by engine kind.", ["engine"]
)
PROVIDER_ERRORS = Counter(
    "parley_provider_errors",
    "Engine failures, by stage (stt, llm, tts), engine kind and error code.",
    ["stage", "engine", "code"],
)
PROVIDER_RETRIES = Counter(
    "parley_provider_retries",
    "Requests an engine's client retried, by stage and engine kind.",
    ["stage", "engine"],
)
PROVIDER_CIRCUIT = Gauge(
    "parley_provider_circuit_state",
    "Circuit breaker of an engine's endpoint in this process (apps/pipeline/providers/"
    "breaker.py): 0 closed, 1 half-open (one trial call), 2 open (calls fail fast).",
    ["stage", "engine"],
)
COST = Counter(
    "parley_cost_usd",
    "What the turns cost in US dollars, priced by settings (COST_PRICES), by stage and engine.",
    ["stage", "engine"],
)

# --- Queues and workers ------------------------------------------------------------
# Read at scrape time by collectors.QueueCollector (web processes), which uses
# these names and help texts: not registered themselves.
QUEUE_DEPTH = Gauge(
    "parley_queue_depth", "Tasks waiting in a Celery queue.", ["queue"], registry=None
)
QUEUE_AGE = Gauge(
    "parley_queue_oldest_age_seconds",
    "Age of the oldest task waiting in a Celery queue (0 when it is empty).",
    ["queue"],
    registry=None,
)
TASKS_IN_FLIGHT = Gauge(
    "parley_worker_tasks_in_flight", "Tasks this worker process runs now, by queue.", ["queue"]
)
WORKER_THREADS = Gauge(
    "parley_worker_threads", "Tasks this worker process can run at once (its concurrency)."
)
TASK_SECONDS = Histogram(
    "parley_task_seconds",
    "Time a worker spent running each task, by queue and outcome (ok, error).",
    ["queue", "outcome"],
    buckets=TASK_BUCKETS,
)
TASKS_DEAD_LETTERED = Counter(
    "parley_tasks_dead_lettered",
    "Tasks moved to the broker's dead_letter list after TASK_MAX_STARTS starts that did "
    "not finish (apps/pipeline/redelivery.py), by queue and task name.",
    ["queue", "task"],
)

# --- Database pool (web processes, PGBOUNCER_STATS_URL; collectors.py) ----------------
# Read from PgBouncer's admin console (SHOW POOLS) at scrape time, summed over users.
PGBOUNCER_UP = "parley_pgbouncer_up"  # 1 when the last SHOW POOLS answered
PGBOUNCER_CLIENTS = "parley_pgbouncer_clients"  # {database, state: active|waiting}
PGBOUNCER_SERVERS = "parley_pgbouncer_servers"  # {database, state: active|idle|used|...}
PGBOUNCER_MAX_WAIT = "parley_pgbouncer_max_wait_seconds"  # {database}: oldest waiting client

# Pre-bound children of the per-frame path (the hottest code of the product).
AUDIO_FRAMES = FRAMES.labels("audio")
AUDIO_BYTES = FRAME_BYTES.labels("audio")
CONTROL_FRAMES = FRAMES.labels("control")
CONTROL_BYTES = FRAME_BYTES.labels("control")
SOCKETS_ACCEPTED = SOCKETS_OPENED.labels("accepted")

STREAMING_WINDOW_S = 1.0
# Sessions with a `last_audio_at` (time.monotonic()); the frame path only stores
# that time, and parley_sockets_streaming counts them at scrape time.
_streaming: weakref.WeakSet = weakref.WeakSet()


def streaming_track(session: object) -> None:
    _streaming.add(session)


def _streaming_count() -> int:
    now = time.monotonic()
    for _ in range(5):  # a socket opened while we count: count again
        try:
            return sum(
                1
                for session in list(_streaming)
                if now - getattr(session, "last_audio_at", -1e9) < STREAMING_WINDOW_S
            )
        except RuntimeError:
            continue
    return 0


SOCKETS_STREAMING.set_function(_streaming_count)


# --- Recording: one call at the one place each figure is stored --------------------


def stage_observe(stage: str, engine: str, ms: int | None) -> None:
    """A completed turn's stage timing, as it is stored on its message."""
    if ms is not None:
        STAGE_SECONDS.labels(stage, engine or "unknown").observe(ms / 1000)


def reply_finished(
    *, engine: str, outcome: str, prompt_tokens: int, completion_tokens: int
) -> None:
    REPLIES.labels(engine, outcome).inc()
    if prompt_tokens:
        LLM_TOKENS.labels(engine, "in").inc(prompt_tokens)
    if completion_tokens:
        LLM_TOKENS.labels(engine, "out").inc(completion_tokens)


def transcribed(*, engine: str, purpose: str, audio_s: float, model_s: float) -> None:
    STT_AUDIO_SECONDS.labels(engine, purpose).inc(audio_s)
    if audio_s > 0:
        STT_RTF.labels(engine, purpose).observe(model_s / audio_s)


def provider_error(*, stage: str, engine: str, code: str) -> None:
    PROVIDER_ERRORS.labels(stage, engine, code).inc()


CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}


def circuit_state(*, stage: str, engine: str, state: str) -> None:
    PROVIDER_CIRCUIT.labels(stage, engine).set(CIRCUIT_STATES[state])


def tts_synthesized(*, engine: str, pcm_bytes: int, sample_rate: int) -> None:
    """One piece of speech (PCM16 mono) made by a TTS engine."""
    if pcm_bytes and sample_rate:
        TTS_AUDIO_SECONDS.labels(engine).inc(pcm_bytes / 2 / sample_rate)


def cost_add(*, stage: str, engine: str, usd: float | Decimal) -> None:
    """What a turn's work of `stage` (stt, llm, tts) cost, as it is stored on the
    turn (Message.cost_usd; apps/conversations/costs.py prices it). A zero cost
    (a local engine) still makes the series exist."""
    COST.labels(stage, engine or "unknown").inc(float(usd))


def task_dead_lettered(*, queue: str, task: str) -> None:
    TASKS_DEAD_LETTERED.labels(queue or "unknown", task).inc()


def process_role(role: str) -> None:
    """This process is a Parley process of `role` (web, or the worker's role)."""
    PROCESS.labels(role).set(1)


def provider_retried(*, stage: str, engine: str) -> None:
    """An engine retried a call itself (the LLM engine: before the first token)."""
    PROVIDER_RETRIES.labels(stage, engine).inc()


def retry_hook(stage: str, engine: str):
    """An httpx request hook (sync) counting the requests an OpenAI client retries:
    the SDK marks each attempt with `x-stainless-retry-count`."""
    retries = PROVIDER_RETRIES.labels(stage, engine)

    def hook(request) -> None:
        if request.headers.get("x-stainless-retry-count", "0") not in ("0", ""):
            retries.inc()

    return hook
