"""The one settings module. Everything that differs between machines is an
environment variable; with nothing set, Parley runs on embedded defaults
(SQLite, in-memory channel layer, local-memory cache, in-process workers)."""

import os
import re
import socket
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str = "") -> str:
    """A string from NAME, or from the file named by NAME_FILE (for secrets)."""
    path = os.environ.get(f"{name}_FILE")
    if path:
        return Path(path).read_text().strip()
    return os.environ.get(name, default)


def env_bool(name: str, default: bool = False) -> bool:
    value = env_str(name)
    if not value:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    value = env_str(name)
    return int(value) if value else default


def env_float(name: str, default: float) -> float:
    value = env_str(name)
    return float(value) if value else default


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in env_str(name, default).split(",") if item.strip()]


ENV = env_str("DJANGO_ENV", "development")
if ENV not in ("development", "production"):  # a typo must not mean development
    raise ImproperlyConfigured(f"DJANGO_ENV={ENV!r}: use development or production")
PRODUCTION = ENV == "production"


def required(name: str, fallback: str) -> str:
    """A value production must be given; development gets a harmless fallback."""
    value = env_str(name)
    if value:
        return value
    if PRODUCTION:
        raise ImproperlyConfigured(f"{name} must be set when DJANGO_ENV=production")
    return fallback


INSECURE_SECRET_KEY = "dev-only-insecure-key-change-me"
SECRET_KEY = required("SECRET_KEY", INSECURE_SECRET_KEY)
# With the public fallback key anyone can forge a session, so such a server answers
# this machine's own clients only, whatever address it listens on (config/asgi.py).
LOOPBACK_ONLY = SECRET_KEY == INSECURE_SECRET_KEY
DEBUG = env_bool("DEBUG", default=not PRODUCTION)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS") or (
    [] if PRODUCTION else ["localhost", "127.0.0.1", "[::1]", "testserver"]
)
if PRODUCTION and not ALLOWED_HOSTS:
    raise ImproperlyConfigured("ALLOWED_HOSTS must be set when DJANGO_ENV=production")

# Origins allowed to open WebSockets, checked by Channels' OriginValidator:
# "https://parley.example" (scheme, host, port must match) or a bare host
# (any scheme and port). Default: https on the allowed hosts in production,
# the bare allowed hosts (any local port) in development.
WEBSOCKET_ALLOWED_ORIGINS = env_list("WEBSOCKET_ALLOWED_ORIGINS") or [
    f"https://{host}" if PRODUCTION else host for host in ALLOWED_HOSTS if host != "*"
]
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "django_prometheus",
    "apps.accounts",
    "apps.personas",
    "apps.conversations",
    "apps.realtime",
    "apps.pipeline",
    "apps.observability",
]

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "apps.observability.middleware.RequestIdMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "apps.accounts.throttle.auth_throttle_middleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "csp.middleware.CSPMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

# Sign-in throttling (apps/accounts/throttle.py): POSTs to the login, admin login and
# sign-up forms per client address, and logins per username, within the window.
AUTH_THROTTLE_WINDOW_S = env_int("AUTH_THROTTLE_WINDOW_S", 600)
AUTH_THROTTLE_LOGIN_PER_IP = env_int("AUTH_THROTTLE_LOGIN_PER_IP", 30)
AUTH_THROTTLE_LOGIN_PER_USER = env_int("AUTH_THROTTLE_LOGIN_PER_USER", 10)
AUTH_THROTTLE_SIGNUP_PER_IP = env_int("AUTH_THROTTLE_SIGNUP_PER_IP", 5)

ROOT_URLCONF = "config.urls"
ASGI_APPLICATION = "config.asgi.application"
AUTH_USER_MODEL = "accounts.User"
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "home"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------
# DATABASE_URL points at PgBouncer in transaction pooling mode in production.
# Behind transaction pooling a server connection is shared between clients
# between transactions, so nothing may outlive a transaction: no server-side
# cursors, no prepared statements (psycopg's prepare_threshold=None), no
# persistent session state. Each process keeps its client connections to
# PgBouncer open (DATABASE_CONN_MAX_AGE, 60 s): a new one cost two statements
# every time (PgBouncer's and Django's time-zone settings), more than a voice
# turn's own writes. PgBouncer still shares its few server connections.
DATABASE_URL = env_str("DATABASE_URL")
if DATABASE_URL:
    import dj_database_url

    DATABASES = {
        "default": dj_database_url.parse(
            DATABASE_URL,
            conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 60),
            engine="django_prometheus.db.backends.postgresql",
        )
    }
    DATABASES["default"]["DISABLE_SERVER_SIDE_CURSORS"] = True
    # A database that is down costs a request DATABASE_CONNECT_TIMEOUT_S, then a 503
    # (apps.observability.views.server_error), never a hung worker thread. Statements
    # are bounded by PgBouncer (query_timeout, query_wait_timeout: deploy/pgbouncer).
    DATABASES["default"]["OPTIONS"] = {
        "prepare_threshold": None,
        "connect_timeout": env_int("DATABASE_CONNECT_TIMEOUT_S", 2),
    }
    DATABASES["default"]["TEST"] = {"NAME": env_str("DATABASE_TEST_NAME") or None}
else:
    DATABASES = {
        "default": {
            "ENGINE": "django_prometheus.db.backends.sqlite3",
            "NAME": env_str("SQLITE_PATH", str(BASE_DIR / "var" / "parley.sqlite3")),
            "OPTIONS": {"timeout": 20, "transaction_mode": "IMMEDIATE"},
            # A file, so that a Daphne started by the tests sees the test data.
            "TEST": {"NAME": env_str("SQLITE_TEST_PATH", str(BASE_DIR / "var" / "test.sqlite3"))},
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: cache, channel layer, Celery broker (one logical db each) -----
REDIS_URL = env_str("REDIS_URL")


def redis_db(url: str, db: int) -> str:
    """The same Redis server, another logical database."""
    base = url.rsplit("/", 1)[0] if url.count("/") > 2 else url
    return f"{base}/{db}"


CACHE_URL = env_str("CACHE_URL") or (redis_db(REDIS_URL, 1) if REDIS_URL else "")
CHANNEL_LAYER_URL = env_str("CHANNEL_LAYER_URL") or (redis_db(REDIS_URL, 2) if REDIS_URL else "")
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL") or (redis_db(REDIS_URL, 3) if REDIS_URL else "")
AUDIO_STORE_URL = env_str("AUDIO_STORE_URL") or (redis_db(REDIS_URL, 4) if REDIS_URL else "")

# "context": the persona and conversation context a turn and a socket read
# (apps/conversations/context.py), on its own alias with django-prometheus's backends
# (/metrics: django_cache_get_*); entries live CONTEXT_CACHE_TTL_S at most. Short
# timeouts: a Redis that does not answer is skipped and the database answers.
CONTEXT_CACHE_TTL_S = env_int("CONTEXT_CACHE_TTL_S", 600)
if CACHE_URL:
    CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": CACHE_URL,
            "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 2, "SOCKET_TIMEOUT": 2},
            "KEY_PREFIX": "parley",
        },
        "context": {
            "BACKEND": "django_prometheus.cache.backends.redis.RedisCache",
            "LOCATION": CACHE_URL,
            "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.5, "SOCKET_TIMEOUT": 0.5},
            "KEY_PREFIX": "parley-context",
            "TIMEOUT": CONTEXT_CACHE_TTL_S,
        },
    }
    SESSION_ENGINE = "django.contrib.sessions.backends.cached_db"
else:
    CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        "context": {
            "BACKEND": "django_prometheus.cache.backends.locmem.LocMemCache",
            "LOCATION": "context",
            "TIMEOUT": CONTEXT_CACHE_TTL_S,
            "OPTIONS": {"MAX_ENTRIES": 50_000},
        },
    }
    SESSION_ENGINE = "django.contrib.sessions.backends.db"

if CHANNEL_LAYER_URL:
    CHANNEL_LAYERS = {
        "default": {
            # channels_redis that rides out a Redis restart or freeze (apps/realtime/layer.py):
            # blocking reads of 1 s under a 2 s socket timeout, so nothing waits longer.
            "BACKEND": "apps.realtime.layer.ChannelLayer",
            "CONFIG": {
                "hosts": [
                    {"address": CHANNEL_LAYER_URL, "socket_timeout": 2, "socket_connect_timeout": 2}
                ],
                "capacity": 1000,
                "expiry": 30,
            },
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# --- Celery ---------------------------------------------------------------
# With no broker, tasks run on in-process worker threads (apps.pipeline.dispatch).
CELERY_TASK_ACKS_LATE = True  # a task is acknowledged after it ran ...
CELERY_TASK_REJECT_ON_WORKER_LOST = True  # ... and requeued if its worker died
CELERY_WORKER_PREFETCH_MULTIPLIER = 1  # long model tasks: take one at a time
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_TASK_ROUTES = {
    "apps.pipeline.tasks.transcribe_window_task": {"queue": "stt"},
    "apps.pipeline.tasks.synthesize_sentence_task": {"queue": "tts"},
}
# Redelivery (docs/reliability.md, "Workers"). A task is acknowledged after it ran, so a
# worker that dies mid-task leaves it unacknowledged in the broker; kombu's Redis transport
# gives it to another worker CELERY_VISIBILITY_TIMEOUT_S after its delivery (checked every
# CELERY_RESTORE_INTERVAL_S). It must come back well before the utterance's audio expires
# in the audio store (apps.pipeline.audio_store.TTL_SECONDS, 600 s), and no task may run
# longer than it (a slow task would be handed out a second time): time limits below it.
# (Celery enforces time limits in prefork pools only; our workers run threads, so they
# bound a task through its own timeouts, and a redelivered task is safe to run twice.)
CELERY_VISIBILITY_TIMEOUT_S = env_int("CELERY_VISIBILITY_TIMEOUT_S", 60)
CELERY_RESTORE_INTERVAL_S = env_int("CELERY_RESTORE_INTERVAL_S", 5)
CELERY_TASK_TIME_LIMIT = env_int("CELERY_TASK_TIME_LIMIT", 45)
CELERY_TASK_SOFT_TIME_LIMIT = env_int("CELERY_TASK_SOFT_TIME_LIMIT", 30)
if not CELERY_TASK_SOFT_TIME_LIMIT < CELERY_TASK_TIME_LIMIT < CELERY_VISIBILITY_TIMEOUT_S < 600:
    raise ImproperlyConfigured(
        "need CELERY_TASK_SOFT_TIME_LIMIT < CELERY_TASK_TIME_LIMIT < CELERY_VISIBILITY_TIMEOUT_S"
        f" < 600 s (the audio's TTL); got {CELERY_TASK_SOFT_TIME_LIMIT}, "
        f"{CELERY_TASK_TIME_LIMIT}, {CELERY_VISIBILITY_TIMEOUT_S}"
    )
# A task started this many times without finishing (each start killed its worker) is moved
# to the broker's `dead_letter` list instead of running again (apps/pipeline/redelivery.py).
TASK_MAX_STARTS = env_int("TASK_MAX_STARTS", 3)
# A database error while a task stores its result: retried after 1, 2, 4 s (at most 3 times).
TASK_DATABASE_RETRIES = env_int("TASK_DATABASE_RETRIES", 3)
CELERY_RESULT_BACKEND = env_str("CELERY_RESULT_BACKEND") or (
    redis_db(REDIS_URL, 5) if REDIS_URL else None
)
CELERY_RESULT_EXPIRES = 3600
# Every task is fire-and-forget (results come back through the channel layer):
# no result is stored, and publishing never subscribes to the result backend.
CELERY_TASK_IGNORE_RESULT = True
# Tasks wait here for the process's publisher thread (apps.pipeline.dispatch).
ENQUEUE_BUFFER = env_int("ENQUEUE_BUFFER", 10_000)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
IN_PROCESS_WORKERS = env_int("IN_PROCESS_WORKERS", 2)
# Task threads of a `tts` worker (config.worker): Piper synthesizes one part at a time
# per process; a second thread stores and publishes while the first synthesizes.
TTS_WORKER_THREADS = env_int("TTS_WORKER_THREADS", 2)
# CPU threads of one Piper synthesis (ONNX intra-op threads).
TTS_CPU_THREADS = env_int("TTS_CPU_THREADS", 1)

# --- Voice pipeline -------------------------------------------------------
STT_KIND = env_str("STT_KIND", "faster_whisper")
STT_MODEL = env_str("STT_MODEL", "")  # empty: the bundled tiny.en
STT_DEVICE = env_str("STT_DEVICE", "cpu")
STT_COMPUTE_TYPE = env_str("STT_COMPUTE_TYPE", "int8")
STT_CPU_THREADS = env_int("STT_CPU_THREADS", 2)
STT_PARTIAL_EVERY_MS = env_int("STT_PARTIAL_EVERY_MS", 700)
# The first draft comes sooner: at this much of the utterance's audio (which starts
# with the endpointer's 300 ms pre-roll), so the user sees words about 0.5 s in.
STT_FIRST_PARTIAL_MS = env_int("STT_FIRST_PARTIAL_MS", 500)
# Cross-session batching in the STT worker (apps/pipeline/batching.py): windows wait up
# to STT_BATCH_WAIT_MS for a batch of at most STT_BATCH_MAX. A worker process runs its
# tasks on STT_WORKER_THREADS threads (`-P threads -c`), enough to fill a batch.
STT_BATCH_MAX = env_int("STT_BATCH_MAX", 16)
STT_BATCH_WAIT_MS = env_int("STT_BATCH_WAIT_MS", 30)
STT_WORKER_THREADS = env_int("STT_WORKER_THREADS", 16)
# Drafts are skipped while more finals than this wait (in the worker and the `stt` queue).
STT_DRAFT_BACKLOG_MAX = env_int("STT_DRAFT_BACKLOG_MAX", 0)
# Whisper windows are padded to the batch's longest window, but never below these
# (shorter windows make Whisper loop); drafts take the cheaper, shorter floor.
STT_MIN_WINDOW_S = env_float("STT_MIN_WINDOW_S", 20.0)
STT_DRAFT_MIN_WINDOW_S = env_float("STT_DRAFT_MIN_WINDOW_S", 10.0)
# Windows per encoder call: on a CPU small groups are faster per window; on a GPU use
# STT_BATCH_MAX.
STT_ENCODE_GROUP = env_int("STT_ENCODE_GROUP", 2)
STT_PARTIAL_EXPIRES_S = env_float("STT_PARTIAL_EXPIRES_S", 3.0)  # a queued draft goes stale
VAD_END_SILENCE_MS = env_int("VAD_END_SILENCE_MS", 500)
# At this much silence the likely final is transcribed ahead of time (a
# "candidate"); if the silence lasts to VAD_END_SILENCE_MS it becomes the final.
VAD_PAUSE_MS = env_int("VAD_PAUSE_MS", 200)
STT_CANDIDATE_WAIT_S = env_float("STT_CANDIDATE_WAIT_S", 5.0)
VAD_MAX_UTTERANCE_MS = env_int("VAD_MAX_UTTERANCE_MS", 20_000)
VAD_MIN_SPEECH_MS = env_int("VAD_MIN_SPEECH_MS", 200)

LLM_BASE_URL = env_str("LLM_BASE_URL")
LLM_API_KEY = env_str("LLM_API_KEY") or env_str("OPENAI_API_KEY")
# The offline reply model, SmolLM2-135M-Instruct (`manage.py serve_llm`, one more AI stage:
# apps/pipeline/llm_server.py): `make run` starts it when no LLM_BASE_URL is set and sets
# LLM_LOCAL_URL, and the `local` kind talks to it as the `openai` kind talks to vLLM.
# Without either, replies come from the `echo` stand-in (tests, and a bare runserver).
LLM_LOCAL_URL = env_str("LLM_LOCAL_URL")
LLM_LOCAL_PORT = env_int("LLM_LOCAL_PORT", 8088)
LLM_LOCAL_PROCESSES = env_int("LLM_LOCAL_PROCESSES", 1)  # replies made at once, ~200 MB each
# Threads per process: 1. llama.cpp's threads wait for each other by spinning, so two on
# cores that STT and TTS also use made 21 tokens/s at 59 ms of CPU each, one 45 at 22 ms
# (docs/benchmarks.md, offline reply model); more replies at once are more processes.
LLM_LOCAL_THREADS = env_int("LLM_LOCAL_THREADS", 1)
LLM_LOCAL_MAX_TOKENS = env_int("LLM_LOCAL_MAX_TOKENS", 60)
LLM_LOCAL_TEMPERATURE = env_float("LLM_LOCAL_TEMPERATURE", 0.2)  # at most; above, sums go wrong
LLM_KIND = env_str("LLM_KIND") or (
    "openai" if (LLM_BASE_URL or LLM_API_KEY) else "local" if LLM_LOCAL_URL else "echo"
)
LLM_MODEL = env_str("LLM_MODEL", "gpt-4o-mini")
LLM_TIMEOUT_S = env_float("LLM_TIMEOUT_S", 20.0)  # one attempt
LLM_MAX_RETRIES = env_int("LLM_MAX_RETRIES", 2)
LLM_DEADLINE_S = env_float("LLM_DEADLINE_S", 60.0)  # the whole reply
LLM_HISTORY_TOKENS = env_int("LLM_HISTORY_TOKENS", 3000)
# Circuit breaker per process and endpoint of the OpenAI-compatible LLM, STT and TTS
# engines (apps/pipeline/providers/breaker.py): open after this many failed calls in a
# row (0: never), failing fast for the cooldown, then one trial call.
LLM_BREAKER_FAILURES = env_int("LLM_BREAKER_FAILURES", 5)
LLM_BREAKER_COOLDOWN_S = env_float("LLM_BREAKER_COOLDOWN_S", 30.0)

TTS_KIND = env_str("TTS_KIND", "piper")
OPENAI_STT_MODEL = env_str("OPENAI_STT_MODEL", "gpt-4o-mini-transcribe")
OPENAI_TTS_MODEL = env_str("OPENAI_TTS_MODEL", "gpt-4o-mini-tts")
OPENAI_BASE_URL = env_str("OPENAI_BASE_URL") or LLM_BASE_URL

# Live state (apps/realtime/live.py): open utterances' audio is written to the
# audio store in one batch per process every AUDIO_FLUSH_MS (and at once when
# an STT job needs it), with the owner's heartbeat every LIVE_HEARTBEAT_S.
AUDIO_FLUSH_MS = env_int("AUDIO_FLUSH_MS", 200)
LIVE_HEARTBEAT_S = env_float("LIVE_HEARTBEAT_S", 2.0)
# Every web process looks this often for dead ones (heartbeat gone on two looks) and
# finishes what they left: open utterances, streaming replies (apps/realtime/sweeper.py).
LIVE_SWEEP_S = env_float("LIVE_SWEEP_S", 3.0)
# Past this many final/candidate windows waiting in the `stt` queue, new conversation
# sockets are refused with 1013 (apps/realtime/admission.py); 0 turns it off. A window
# takes about 0.15 s of a CPU worker: 300 is about a minute of one worker's work.
STT_BACKLOG_REFUSE = env_int("STT_BACKLOG_REFUSE", 300)
# Conversation sockets one live STT worker serves at the latency targets: past that many
# per worker registered (apps/pipeline/stt_fleet.py), across the fleet, a new socket gets
# 1013 before any backlog builds (benchmarks/overload.py measures it; 4 on one CPU worker
# with one model thread). 0: off, the backlog bound only.
STT_SESSIONS_PER_WORKER = env_int("STT_SESSIONS_PER_WORKER", 0)
# Conversation sockets one user may hold open at once, on every web process together
# (apps/realtime/leases.py); one more is refused with 4409. 0: unlimited.
SOCKETS_PER_USER_MAX = env_int("SOCKETS_PER_USER_MAX", 5)
# Conversations one user may start in any 24 hours (staff: unlimited); one more is
# refused with a message (apps/conversations/services.py). 0: unlimited.
CONVERSATIONS_PER_DAY_MAX = env_int("CONVERSATIONS_PER_DAY_MAX", 50)
# An ended utterance's audio stays in the process (besides Redis) until its final
# is known, or this long after it is all stored.
LIVE_AUDIO_KEEP_S = env_float("LIVE_AUDIO_KEEP_S", 10.0)
# One bounded async Redis pool per process: a burst waits for a connection.
REDIS_POOL_MAX = env_int("REDIS_POOL_MAX", 32)
REDIS_POOL_TIMEOUT_S = env_float("REDIS_POOL_TIMEOUT_S", 2.0)
# Report event-loop callbacks that block for longer than this (0: off); see
# apps/observability/loopguard.py. The tests turn it on in every live server.
LOOP_GUARD_MS = env_int("LOOP_GUARD_MS", 0)
# The web process's garbage-collector thresholds (Python's default: 700, 10, 10).
GC_THRESHOLDS = tuple(int(n) for n in env_list("GC_THRESHOLDS", "50000,20,100"))
GC_PAUSE_LOG_MS = env_int("GC_PAUSE_LOG_MS", 50)  # log collections that pause longer (0: off)

# --- Metrics (apps/observability/metrics.py; docs/observability.md) ---------------
# /metrics (web) and each worker's exporter answer only `Authorization: Bearer
# <METRICS_TOKEN>`; with no token set they refuse everyone (403), in every environment.
METRICS_TOKEN = env_str("METRICS_TOKEN", "")
# Each worker process's exporter (/metrics, /healthz, /readyz) listens here; 0: off.
WORKER_METRICS_PORT = env_int("WORKER_METRICS_PORT", 0)
WORKER_METRICS_HOST = env_str("WORKER_METRICS_HOST", "0.0.0.0")  # noqa: S104 — a pod's probe port
# The web process's loop-lag timer fires this often (parley_event_loop_lag_seconds; 0: off).
LOOP_LAG_INTERVAL_MS = env_int("LOOP_LAG_INTERVAL_MS", 250)
# PgBouncer's admin console, read at scrape time for the pool figures (empty: not
# exported), e.g. postgres://postgres@127.0.0.1:6432/pgbouncer (a stats_users user).
PGBOUNCER_STATS_URL = env_str("PGBOUNCER_STATS_URL", "")

# Socket limits (see docs/protocol.md)
# The longest binary frame, in ms of PCM16 16 kHz mono (32 bytes a ms); `ready`
# tells clients. 100 ms frames are what clients send; up to 200 ms are taken.
AUDIO_FRAME_MAX_MS = env_int("AUDIO_FRAME_MAX_MS", 200)
AUDIO_FRAME_MAX_BYTES = AUDIO_FRAME_MAX_MS * 32
AUDIO_RATE_BURST_S = env_float("AUDIO_RATE_BURST_S", 5.0)  # a network stall, caught up
AUDIO_RATE_FACTOR = env_float("AUDIO_RATE_FACTOR", 1.5)  # x real time, sustained
WS_TEXT_MAX_BYTES = env_int("WS_TEXT_MAX_BYTES", 16_384)
TEXT_MESSAGE_MAX_CHARS = env_int("TEXT_MESSAGE_MAX_CHARS", 4000)
WS_HELD_EVENTS_MAX = env_int("WS_HELD_EVENTS_MAX", 500)  # group events held during a replay
# Hostile input (apps/realtime/limits.py): any message over this many bytes closes the
# socket with 1009, at Daphne (autobahn's payload limits, set in config/asgi.py: Daphne's
# own default is 1 MiB) and in the consumer.
WS_MESSAGE_MAX_BYTES = env_int("WS_MESSAGE_MAX_BYTES", 32_768)
if WS_MESSAGE_MAX_BYTES < max(WS_TEXT_MAX_BYTES, AUDIO_FRAME_MAX_BYTES):
    raise ImproperlyConfigured("WS_MESSAGE_MAX_BYTES must hold a text or an audio frame")
WS_AUDIO_FRAMES_PER_S = env_float("WS_AUDIO_FRAMES_PER_S", 100.0)  # messages, any size
WS_AUDIO_FRAMES_BURST = env_int("WS_AUDIO_FRAMES_BURST", 250)  # 5 s of 20 ms frames
WS_CONTROL_PER_S = env_float("WS_CONTROL_PER_S", 10.0)  # text messages of any type
WS_CONTROL_BURST = env_int("WS_CONTROL_BURST", 30)
WS_HELLO_EVERY_S = env_float("WS_HELLO_EVERY_S", 1.0)  # each hello reads the replay
# Messages dropped by the rate limits: past this many (less WS_FLOOD_FORGIVE_PER_S a
# second), the socket is closed with 4429.
WS_FLOOD_CLOSE_DROPS = env_int("WS_FLOOD_CLOSE_DROPS", 500)
WS_FLOOD_FORGIVE_PER_S = env_float("WS_FLOOD_FORGIVE_PER_S", 10.0)
# Closed with 4408: no hello this long after connecting; nothing sent this long (the
# page pings every 25 s); a socket older than this (Daphne's own cap is 24 h).
WS_HELLO_TIMEOUT_S = env_float("WS_HELLO_TIMEOUT_S", 10.0)
WS_IDLE_TIMEOUT_S = env_float("WS_IDLE_TIMEOUT_S", 300.0)
WS_SESSION_MAX_S = env_float("WS_SESSION_MAX_S", 4 * 3600.0)
WS_REPLAY_MAX_TURNS = env_int("WS_REPLAY_MAX_TURNS", 200)  # a hello replays the newest ones

# Daily quotas of new accounts, small until staff raise them (0 means unlimited); a
# socket reserves speaking time in chunks of QUOTA_AUDIO_CHUNK_S (apps/accounts/ledger.py).
QUOTA_AUDIO_SECONDS = env_int("QUOTA_AUDIO_SECONDS", 600)
QUOTA_TOKENS = env_int("QUOTA_TOKENS", 50_000)
QUOTA_AUDIO_CHUNK_S = env_float("QUOTA_AUDIO_CHUNK_S", 30.0)
QUOTA_REPLY_MIN_TOKENS = env_int("QUOTA_REPLY_MIN_TOKENS", 32)  # a shorter reply fits what is left
# What turns cost (apps/conversations/costs.py): JSON over the defaults there, per stage
# (stt, llm, tts) and engine kind, e.g. {"llm": {"openai": {"in_per_1m": 2.5, "out_per_1m": 10}}}.
# Malformed: no process starts.
COST_PRICES = env_str("COST_PRICES", "")

# --- Static files, security -------------------------------------------------
STATIC_URL = "/static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if PRODUCTION
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}
# The largest persona avatar staff may upload (apps/personas/avatars.py re-encodes it).
AVATAR_UPLOAD_MAX_BYTES = env_int("AVATAR_UPLOAD_MAX_BYTES", 2_000_000)
MEDIA_URL = "/media/"
MEDIA_ROOT = BASE_DIR / "media"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# Behind a TLS-terminating proxy (the Ingress), X-Forwarded-Proto says the scheme. From
# anyone else it is a lie a client can tell ("this is https"), so it is trusted only where
# the deployment says a proxy sets it and nothing else reaches the pods (deploy/k8s does).
TRUST_PROXY_HEADERS = env_bool("TRUST_PROXY_HEADERS", False)
if TRUST_PROXY_HEADERS:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
if PRODUCTION:
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31_536_000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SECURE_CONTENT_TYPE_NOSNIFF = True

# Content Security Policy (django-csp): scripts, the audio worklet and sockets
# come from this origin only; pages carry no inline scripts. Inline styles stay
# allowed for the admin.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'", "'unsafe-inline'"],
        "img-src": ["'self'", "data:"],
        "media-src": ["'self'", "blob:"],
        "connect-src": ["'self'"],
        "worker-src": ["'self'"],
        "object-src": ["'none'"],
        "base-uri": ["'self'"],
        "form-action": ["'self'"],
        "frame-ancestors": ["'none'"],
    }
}

# --- Probes (apps/observability/health.py) ----------------------------------
# /readyz reuses a result this long, and waits this long at most for its checks.
READINESS_CACHE_S = env_float("READINESS_CACHE_S", 2.0)
READINESS_TIMEOUT_S = env_float("READINESS_TIMEOUT_S", 1.0)
# While this file exists the process drains: /readyz answers 503 "draining" (the
# pod's preStop hook touches it; docs/observability.md). Empty: no drain file.
READINESS_DRAIN_FILE = env_str("READINESS_DRAIN_FILE", "")
# ...and closes its conversation sockets with 1012, evenly over this many seconds
# (apps/realtime/drain.py). The pod's terminationGracePeriodSeconds must exceed it.
DRAIN_CLOSE_S = env_float("DRAIN_CLOSE_S", 30.0)
# SIGTERM or Ctrl-C (apps/realtime/drain.py): sockets still open close with 1012 over
# SHUTDOWN_CLOSE_S, then up to SHUTDOWN_WAIT_S for their disconnects to keep what was said.
SHUTDOWN_CLOSE_S = env_float("SHUTDOWN_CLOSE_S", 2.0)
SHUTDOWN_WAIT_S = env_float("SHUTDOWN_WAIT_S", 10.0)
if READINESS_CACHE_S < 0 or READINESS_TIMEOUT_S <= 0:
    raise ImproperlyConfigured("READINESS_CACHE_S must be >= 0 and READINESS_TIMEOUT_S > 0")
if not 0 <= DRAIN_CLOSE_S <= 3600:
    raise ImproperlyConfigured(f"DRAIN_CLOSE_S must be between 0 and 3600 s, not {DRAIN_CLOSE_S}")

# --- Logging: JSON lines with request and conversation ids -----------------
# What this process is, set by whoever starts it (scripts/run.sh, config.worker,
# tests/live.py, the manifests): web, worker-stt, worker-tts, worker-all, ... It is
# on every log line and the `role` label of parley_process_info.
PARLEY_ROLE = env_str("PARLEY_ROLE", "web")
if not re.fullmatch(r"[a-z][a-z0-9-]{0,31}", PARLEY_ROLE):
    raise ImproperlyConfigured(
        f"PARLEY_ROLE={PARLEY_ROLE!r}: lower-case letters, digits and '-', like worker-stt"
    )
POD_NAME = env_str("POD_NAME") or socket.gethostname()  # the Downward API's pod name
LOG_LEVEL = env_str("LOG_LEVEL", "INFO")
# json: one JSON object per line (ts, level, logger, message, request_id,
# conversation_id, user_id, pod, role); text: one readable line (development).
LOG_FORMAT = env_str("LOG_FORMAT", "json" if PRODUCTION else "text")
if LOG_FORMAT not in ("json", "text"):
    raise ImproperlyConfigured(f"LOG_FORMAT={LOG_FORMAT!r}: use json or text")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        "context": {
            "()": "apps.observability.logging.ContextFilter",
            "pod": POD_NAME,
            "role": PARLEY_ROLE,
        }
    },
    "formatters": {
        "json": {"()": "apps.observability.logging.JsonFormatter"},
        "text": {"()": "apps.observability.logging.TextFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["context"],
        }
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django.channels.server": {"level": "WARNING"},
        "faster_whisper": {"level": "WARNING"},
    },
}
