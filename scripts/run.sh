#!/usr/bin/env bash
# Serve Parley (called by `make run` after migrate, collectstatic and seed_demo).
# With REDIS_URL set, a Celery worker per AI stage (stt, tts) runs beside Daphne, supervised
# (restarted when it exits, with a backoff), and all stop together on Ctrl-C or SIGTERM;
# with embedded defaults the workers are threads inside Daphne. With no LLM endpoint set, the
# offline reply model's server (manage.py serve_llm) runs beside Daphne in both modes.
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

pids=()
stop_all() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
}
trap stop_all INT TERM
trap 'stop_all; wait' EXIT

# supervise NAME COMMAND...: run COMMAND, and start it again whenever it exits, as Kubernetes
# restarts a pod's container (restartPolicy: Always): after 1 s, then 2, 4, ... up to 30 s
# while it keeps failing (the delay starts again at 1 s after 60 s of running), each restart
# logged. SIGTERM or SIGINT (Ctrl-C) stops the command and the supervisor: SIGTERM to the
# command, and SIGKILL after STOP_GRACE_S (a Celery worker still starting can miss SIGTERM).
STOP_GRACE_S=${STOP_GRACE_S:-15}
supervise() {
    local name=$1 child="" nap="" delay=1 started status
    shift
    stop_child() {
        kill -TERM $child $nap 2>/dev/null || true
        local waited=0
        while kill -0 "$child" 2>/dev/null && ((waited < STOP_GRACE_S * 10)); do
            sleep 0.1
            waited=$((waited + 1))
        done
        if kill -0 "$child" 2>/dev/null; then
            echo "run: $name (pid $child) still running ${STOP_GRACE_S}s after SIGTERM: SIGKILL" >&2
            kill -KILL "$child" 2>/dev/null || true
        fi
        wait "$child" 2>/dev/null || true
        exit 0
    }
    # A subshell resets the caller's INT trap to the default (die): Ctrl-C reaches it too.
    trap stop_child INT TERM
    while true; do
        started=$SECONDS
        "$@" &
        child=$!
        echo "run: $name started (pid $child)"
        status=0
        wait "$child" || status=$?
        if ((SECONDS - started >= 60)); then delay=1; fi
        echo "run: $name (pid $child) exited with status $status; restarting it in ${delay}s" >&2
        sleep "$delay" &
        nap=$!
        wait "$nap" || true
        nap=""
        delay=$((delay * 2 > 30 ? 30 : delay * 2))
    done
}

# The offline reply model (manage.py serve_llm), one more AI stage, when no LLM endpoint or
# kind is configured: the `local` kind talks to it at LLM_LOCAL_URL. LLM_LOCAL_PROCESSES
# sets how many replies it makes at once.
if [[ -z "${LLM_BASE_URL:-}${LLM_API_KEY:-}${OPENAI_API_KEY:-}${LLM_LOCAL_URL:-}" ]] \
    && [[ -z "${LLM_KIND:-}" || "${LLM_KIND:-}" == local ]]; then
    LLM_LOCAL_PORT=${LLM_LOCAL_PORT:-8088}
    export LLM_LOCAL_URL="http://127.0.0.1:$LLM_LOCAL_PORT/v1"
    PARLEY_ROLE=llm supervise "offline reply model (SmolLM2-135M-Instruct)" \
        "$BIN/python" manage.py serve_llm --port "$LLM_LOCAL_PORT" &
    pids+=($!)
    echo "run: replies from SmolLM2-135M-Instruct, a small offline model (often wrong on facts);"
    echo "run: set LLM_BASE_URL (and LLM_API_KEY) for a real one"
fi

if [[ -z "${REDIS_URL:-}" ]]; then
    echo "run: embedded defaults: workers run in-process inside Daphne"
    banner
    "${DAPHNE[@]}" &
    daphne=$!
    pids+=("$daphne")
    # Returns when Daphne exits or a signal arrives; the EXIT trap stops the rest.
    wait "$daphne" || exit $?
    exit 0
fi

# One worker per AI stage, so that a transcription spike never slows the replies' speech.
# Each has its own metrics exporter port (/metrics, /healthz, /readyz): stt 9101, tts 9102,
# or WORKER_METRICS_PORT and the next one. A worker that exits is started again.
METRICS_PORT=${WORKER_METRICS_PORT:-9101}
for role in stt tts; do
    PARLEY_ROLE="worker-$role" WORKER_METRICS_PORT="$METRICS_PORT" \
        supervise "Celery $role worker" "$BIN/python" -m config.worker "$role" --loglevel INFO &
    METRICS_PORT=$((METRICS_PORT + 1))
    pids+=($!)
done
banner
"${DAPHNE[@]}" &
daphne=$!
pids+=("$daphne")
# Returns when Daphne exits or a signal arrives; the EXIT trap stops the rest.
wait "$daphne" || exit $?
