#!/usr/bin/env bash
# Serve Parley (called by `make run` after migrate, collectstatic and seed_demo).
# With REDIS_URL set, a Celery worker runs beside Daphne and stops with it; with
# embedded defaults the workers are threads inside Daphne, so only Daphne starts.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BIN=.venv/bin
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

worker_pid=""
stop_worker() {
    if [[ -n "$worker_pid" ]] && kill -0 "$worker_pid" 2>/dev/null; then
        kill -TERM "$worker_pid" 2>/dev/null || true
        wait "$worker_pid" 2>/dev/null || true
    fi
}

if [[ -n "${REDIS_URL:-}" ]]; then
    "$BIN/celery" -A config worker -Q default,stt,tts -c 2 --loglevel INFO &
    worker_pid=$!
    trap stop_worker EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    echo "run: Celery worker started (pid $worker_pid), queues default, stt, tts"
else
    echo "run: embedded defaults: workers run in-process inside Daphne"
fi

echo
echo "  Parley: http://$HOST:$PORT/"
# seed_demo prints "Demo login: <user> / <password>"; make run keeps its output.
grep -h "Demo login:" var/demo-login.txt var/seed-demo.log 2>/dev/null | tail -n 1 | sed 's/^/  /' || true
echo

"$BIN/daphne" -b "$HOST" -p "$PORT" config.asgi:application
