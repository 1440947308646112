# The README's index of commands: `make run` and `make test` work from a fresh clone.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

# Commands the tests and the voice pipeline need, and the Debian packages that bring them.
SYSTEM_COMMANDS := pgbouncer chromium chromedriver espeak-ng sox prometheus promtool
SYSTEM_PACKAGES := pgbouncer chromium chromium-driver espeak-ng sox prometheus

# Services mode: Postgres through our PgBouncer (scripts/services.sh), Redis db 0 as the base.
# TEST_DATABASE: give concurrent runs on one machine their own (PgBouncer routes any name).
export PGBOUNCER_PORT ?= 6432
TEST_DATABASE ?= test_parley
SERVICES_ENV := DATABASE_URL=postgres://postgres@127.0.0.1:$(PGBOUNCER_PORT)/parley \
	DATABASE_TEST_NAME=$(TEST_DATABASE) \
	REDIS_URL=redis://127.0.0.1:6379/0 \
	PARLEY_TEST_MODE=services
PYTEST := $(VENV)/bin/pytest
PYTEST_ARGS ?=
# `make test-deploy` (make test's third stage): the engine and base image, then deploy/tests.
DOCKER_UP ?= bash scripts/docker.sh up
DEPLOY_TESTS ?= deploy/tests
# `make test` runs `make lint` first; TEST_LINT= skips it.
TEST_LINT ?= yes
# `make bench` runs each benchmark named in BENCH as `$(PY) -m benchmarks.<name>`, one after
# the other, with BENCH_ARGS given to each: make bench BENCH="density stt" BENCH_ARGS=...
# Each starts the stack it needs, prints a table and writes docs/benchmarks/<name>.json.
BENCH ?= density frame stt latency database llm overload
BENCH_ARGS ?=
# `make loadtest`: a bounded headless Locust run against a stack it starts (locustfiles/README.md).
# LOADTEST_MIX weighs the user kinds; LOADTEST_ARGS go to Locust (e.g. --processes 2).
LOADTEST_USERS ?= 8
LOADTEST_SPAWN_RATE ?= 2
LOADTEST_DURATION ?= 2m
LOADTEST_MIX ?= http=2,voice=1,text=1
LOADTEST_ARGS ?=
# `make soak`: a long Locust run while a worker is killed and the Redis restarted, then an
# account of what was lost (locustfiles/soak.py; docs/reliability.md, "Soak").
SOAK_USERS ?= 9
SOAK_DURATION ?= 10m
SOAK_ARGS ?=

# Settings that must not leak from the shell into a test run: an LLM endpoint or key,
# other engines, a broker, cache, layer or store URL, production mode. Each run starts
# from the embedded defaults plus its own mode's variables (tests/test_makefile.py).
# config/settings.py reads NAME_FILE before NAME, so both go.
TEST_UNSET_VARS := DJANGO_ENV DATABASE_URL REDIS_URL \
	CACHE_URL CHANNEL_LAYER_URL CELERY_BROKER_URL AUDIO_STORE_URL CELERY_RESULT_BACKEND \
	LLM_KIND LLM_BASE_URL LLM_API_KEY LLM_MODEL LLM_TIMEOUT_S LLM_MAX_RETRIES LLM_DEADLINE_S \
	LLM_HISTORY_TOKENS LLM_LOCAL_URL LLM_LOCAL_PORT LLM_LOCAL_PROCESSES OPENAI_API_KEY OPENAI_BASE_URL OPENAI_STT_MODEL OPENAI_TTS_MODEL \
	STT_KIND STT_MODEL STT_DEVICE STT_COMPUTE_TYPE TTS_KIND
TEST_CLEAN_ENV := env $(foreach name,$(TEST_UNSET_VARS),-u $(name) -u $(name)_FILE) -u PARLEY_TEST_MODE
EMBEDDED_RUN := $(TEST_CLEAN_ENV) $(PYTEST)
SERVICES_RUN := $(TEST_CLEAN_ENV) $(SERVICES_ENV) $(PYTEST)

.PHONY: help venv lock system-deps services run test test-embedded test-services test-deploy lint bench loadtest soak screenshots clean

help:
	@echo "make run          serve Parley at http://127.0.0.1:8000 (embedded defaults; reads .env)"
	@echo "make test         the whole suite twice: embedded defaults, then Postgres+PgBouncer+Redis+Celery; then test-deploy"
	@echo "make test-deploy  the image built and run in Docker, the deploy manifests checked"
	@echo "make lint         ruff and mypy (make test runs it first)"
	@echo "make services     start Postgres, Redis and PgBouncer (127.0.0.1:6432)"
	@echo "make bench        the benchmarks named in BENCH (default: all seven; see README)"
	@echo "make lock         rewrite requirements.lock from the venv (after changing requirements*.txt)"
	@echo "make loadtest     a headless Locust run against a stack it starts; reports/loadtest/"
	@echo "make soak         10 min of Locust with a worker killed and Redis restarted; what was lost"
	@echo "make screenshots  copy the browser tests' screenshots (reports/screenshots/) to docs/screenshots/"
	@echo "make clean        remove generated files (keeps .venv)"

venv: $(STAMP)

# Reinstall only when a requirements file is newer than the stamp.
$(STAMP): requirements.txt requirements-dev.txt requirements-llm.txt requirements.lock
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-dev.txt -c requirements.lock
	$(PY) -m pip install --quiet --no-deps -r requirements-llm.txt -c requirements.lock
	rm -f $(VENV)/lib/python3*/site-packages/llama/_llama_cpp_cuda_* \
		$(VENV)/lib/python3*/site-packages/llama/_llama_cpp_vulkan_*
	@touch $@

# requirements.lock: every package of the venv at its version (see its header).
lock: venv
	@{ sed -n '1,/^# Regenerate/p' requirements.lock; $(PY) -m pip freeze | sort -f; } > requirements.lock.new
	@mv requirements.lock.new requirements.lock
	@echo "requirements.lock: $$(grep -c '==' requirements.lock) packages"

system-deps:
	@missing=""; \
	for cmd in $(SYSTEM_COMMANDS); do \
		command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$cmd"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "system-deps: missing$$missing: installing $(SYSTEM_PACKAGES)"; \
		$(SUDO) apt-get update -qq; \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
			$(SYSTEM_PACKAGES) >/dev/null; \
	fi
	@# kubectl (its kustomize renders deploy/k8s; deploy/tests): Kubernetes' own apt package
	@# (pkgs.k8s.io); Debian's kubernetes-client is 1.20, too old for kustomize components.
	@command -v kubectl >/dev/null 2>&1 || { \
		$(SUDO) apt-get update -qq; \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq kubectl >/dev/null || { \
			echo "system-deps: no kubectl package: add the pkgs.k8s.io apt repository" >&2; exit 1; }; }

services:
	bash scripts/services.sh up

# .env (optional, see .env.example) applies to every step.
run: venv
	@mkdir -p var
	@set -a; if [ -f .env ]; then . ./.env; fi; set +a; \
	$(PY) manage.py migrate --noinput; \
	$(PY) manage.py collectstatic --noinput --verbosity 0; \
	$(PY) manage.py seed_demo | tee var/seed-demo.log; \
	exec bash scripts/run.sh

# Lint (unless TEST_LINT is empty), both modes, then test-deploy; each step runs even when one
# before it failed, and the target fails if any did.
test: venv system-deps services
	@mkdir -p var
	@status=0; \
	if [ -n "$(TEST_LINT)" ]; then $(MAKE) --no-print-directory lint || status=1; fi; \
	echo "=== embedded defaults: SQLite, in-memory layers, in-process workers ==="; \
	$(EMBEDDED_RUN) $(PYTEST_ARGS) || status=1; \
	echo "=== services: Postgres via PgBouncer, Redis, real Celery worker ==="; \
	$(SERVICES_RUN) $(PYTEST_ARGS) || status=1; \
	echo "=== deploy: the image built and run (dockerd), the manifests validated ==="; \
	$(MAKE) --no-print-directory test-deploy || status=1; \
	exit $$status

test-embedded: venv
	@mkdir -p var
	$(EMBEDDED_RUN) $(PYTEST_ARGS)

test-services: venv system-deps services
	@mkdir -p var
	$(SERVICES_RUN) $(PYTEST_ARGS)

# deploy/tests (not in pyproject's testpaths): the image built and run against the services
# (scripts/docker.sh up starts dockerd and makes the base image), the manifests checked.
test-deploy: venv system-deps services
	@mkdir -p var
	$(DOCKER_UP)
	$(SERVICES_RUN) $(DEPLOY_TESTS) $(PYTEST_ARGS)

# Each check runs even when one before it failed; the target fails if any did.
# mypy loads config.settings (django-stubs), so it too starts from the embedded defaults.
lint: venv
	@status=0; \
	$(VENV)/bin/ruff check . || status=1; \
	$(VENV)/bin/ruff format --check . || status=1; \
	$(TEST_CLEAN_ENV) $(VENV)/bin/mypy || status=1; \
	exit $$status

# Starts its own Redis, Daphne and stt/tts workers on the parley_loadtest database (through
# PgBouncer), stops them after; exits 1 when any request failed.
loadtest: venv services
	$(PY) -m locustfiles.run --users $(LOADTEST_USERS) --spawn-rate $(LOADTEST_SPAWN_RATE) \
		--duration $(LOADTEST_DURATION) --mix $(LOADTEST_MIX) --out reports/loadtest \
		$(if $(strip $(LOADTEST_ARGS)),-- $(LOADTEST_ARGS))

soak: venv services
	$(PY) -m locustfiles.soak --users $(SOAK_USERS) --duration $(SOAK_DURATION) $(SOAK_ARGS)

bench: venv
	@for name in $(BENCH); do \
		echo "=== make bench: $(PY) -m benchmarks.$$name $(BENCH_ARGS) ==="; \
		$(PY) -m benchmarks.$$name $(BENCH_ARGS) || exit 1; \
	done

# The browser tests write their screenshots to reports/screenshots/ (not tracked);
# this copies them over the README's tracked ones.
screenshots:
	@ls reports/screenshots/*.png >/dev/null 2>&1 || { \
		echo "screenshots: none in reports/screenshots/; run the browser tests first" \
			"(make test, or $(PYTEST) apps/conversations/tests/test_browser.py)" >&2; exit 1; }
	@mkdir -p docs/screenshots
	cp reports/screenshots/*.png docs/screenshots/

clean:
	-bash scripts/services.sh down
	rm -rf var reports staticfiles .pytest_cache .ruff_cache .mypy_cache
	find . -path ./.venv -prune -o -name __pycache__ -type d -exec rm -rf {} +
