#!/usr/bin/env bash
# The image's entrypoint. The first argument is the role; the rest is passed on.
#   web             Daphne on :$PORT (default 8000; HTTP + WebSockets), behind a proxy
#   worker-stt      Celery worker for the `stt` and `stt_partial` queues (speech-to-text;
#                   GPU nodes in production)
#   worker-tts      Celery worker for the `tts` queue (text-to-speech)
#   worker-default  Celery worker for the `default` queue
#   llm             the offline reply model (SmolLM2-135M-Instruct on CPU) as an OpenAI-
#                   compatible endpoint on :$LLM_LOCAL_PORT (8088), LLM_LOCAL_PROCESSES
#                   replies at once; needs no database and no secrets
#   migrate         apply database migrations, then exit (a Job / init step)
#   drain           the web pod's preStop hook: creates $READINESS_DRAIN_FILE (/readyz turns
#                   503 and the web process closes its sockets with 1012, spread over
#                   DRAIN_CLOSE_S: apps/realtime/drain.py), then waits DRAIN_CLOSE_S + 5 s
#   anything else   exec'd as given, e.g. `python manage.py createsuperuser`
# Each role execs its process so it is PID 1 and receives SIGTERM directly
# (Daphne closes sockets; Celery finishes the running task: a warm shutdown).
set -euo pipefail

role="${1:-web}"
if [[ $# -gt 0 ]]; then
    shift
fi
# The role is on every log line and on parley_process_info (PARLEY_ROLE, config/settings.py).
case "$role" in
    web | worker-* | llm) export PARLEY_ROLE="${PARLEY_ROLE:-$role}" ;;
esac

# A pool of threads, as config.celery.worker_arguments: a worker's tasks share one model
# (and one STT batcher), and its exporter (WORKER_METRICS_PORT) sees the worker get ready.
celery_worker() {
    local queue="$1" concurrency="$2"
    shift 2
    exec celery -A config worker \
        -Q "$queue" \
        --pool threads \
        --concurrency "$concurrency" \
        --prefetch-multiplier 1 \
        --hostname "${queue%%,*}@%h" \
        --loglevel "${CELERY_LOG_LEVEL:-INFO}" \
        "$@"
}

case "$role" in
    web)
        exec daphne -b 0.0.0.0 -p "${PORT:-8000}" --proxy-headers "$@" config.asgi:application
        ;;
    worker-stt)
        # finals first: stt_partial is read only when stt is empty (see config/celery.py)
        celery_worker stt,stt_partial "${STT_CONCURRENCY:-${STT_WORKER_THREADS:-16}}" "$@"
        ;;
    worker-tts)
        celery_worker tts "${TTS_CONCURRENCY:-${TTS_WORKER_THREADS:-2}}" "$@"
        ;;
    worker-default)
        celery_worker default "${DEFAULT_CONCURRENCY:-2}" "$@"
        ;;
    llm)
        exec python -m apps.pipeline.llm_server --host 0.0.0.0 "$@"
        ;;
    migrate)
        exec python manage.py migrate --noinput "$@"
        ;;
    drain)
        : "${READINESS_DRAIN_FILE:?drain: READINESS_DRAIN_FILE must name the web process drain file}"
        touch "$READINESS_DRAIN_FILE"
        sleep "${DRAIN_CLOSE_S:-30}"
        exec sleep 5
        ;;
    *)
        exec "$role" "$@"
        ;;
esac
