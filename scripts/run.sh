#!/usr/bin/env bash
# Serve Parley (called by `make run` after migrate, collectstatic and seed_demo).
# With REDIS_URL set, a Celery worker per AI stage (stt, tts) runs beside Daphne and all
# stop together;
# with embedded defaults the workers are threads inside Daphne, so only Daphne runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BIN=.venv/bin
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
# Each process's role is on its log lines (config.worker sets worker-<role> for workers).
DAPHNE=(env PARLEY_ROLE="${PARLEY_ROLE:-web}" "$BIN/daphne" -b "$HOST" -p "$PORT" config.asgi:application)

banner() {
    echo
    echo "  Parley: http://$HOST:$PORT/"
    # seed_demo prints "Demo login: <user> / <password>"; `make run` keeps its output.
    grep -h "Demo login:" var/demo-login.txt var/seed-demo.log 2>/dev/null | tail -n 1 | sed 's/^/  /' || true
    echo
}

if [[ -z "${REDIS_URL:-}" ]]; then
    echo "run: embedded defaults: workers run in-process inside Daphne"
    banner
    exec "${DAPHNE[@]}"
fi

pids=()
stop_all() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
}
trap stop_all INT TERM
trap 'stop_all; wait' EXIT

# One worker per AI stage, so that a transcription spike never slows the replies' speech.
# Each has its own metrics exporter port (/metrics, /healthz, /readyz): stt 9101, tts 9102,
# or WORKER_METRICS_PORT and the next one.
METRICS_PORT=${WORKER_METRICS_PORT:-9101}
for role in stt tts; do
    PARLEY_ROLE="worker-$role" WORKER_METRICS_PORT="$METRICS_PORT" \
        "$BIN/python" -m config.worker "$role" --loglevel INFO &
    METRICS_PORT=$((METRICS_PORT + 1))
    pids+=($!)
    echo "run: Celery $role worker started (pid $!)"
done
banner
"${DAPHNE[@]}" &
pids+=($!)
# Returns when Daphne exits or a signal arrives; the EXIT trap stops the rest.
wait "${pids[2]}" || exit $?
