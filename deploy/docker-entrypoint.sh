#!/usr/bin/env bash
# The image's entrypoint. The first argument is the role; the rest is passed on.
#   web             Daphne on :8000 (HTTP + WebSockets), behind a proxy
#   worker-stt      Celery worker for the `stt` and `stt_partial` queues (speech-to-text;
#                   GPU nodes in production)
#   worker-tts      Celery worker for the `tts` queue (text-to-speech)
#   worker-default  Celery worker for the `default` queue
#   migrate         apply database migrations, then exit (a Job / init step)
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
    web | worker-*) export PARLEY_ROLE="${PARLEY_ROLE:-$role}" ;;
esac

celery_worker() {
    local queue="$1" concurrency="$2"
    shift 2
    exec celery -A config worker \
        -Q "$queue" \
        --concurrency "$concurrency" \
        --prefetch-multiplier 1 \
        --hostname "${queue%%,*}@%h" \
        --loglevel "${CELERY_LOG_LEVEL:-INFO}" \
        "$@"
}

case "$role" in
    web)
        exec daphne -b 0.0.0.0 -p 8000 --proxy-headers "$@" config.asgi:application
        ;;
    worker-stt)
        # finals first: stt_partial is read only when stt is empty (see config/celery.py)
        celery_worker stt,stt_partial "${STT_CONCURRENCY:-1}" "$@"
        ;;
    worker-tts)
        celery_worker tts "${TTS_CONCURRENCY:-1}" "$@"
        ;;
    worker-default)
        celery_worker default "${DEFAULT_CONCURRENCY:-2}" "$@"
        ;;
    migrate)
        exec python manage.py migrate --noinput "$@"
        ;;
    *)
        exec "$role" "$@"
        ;;
esac
