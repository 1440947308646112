# The README's index of commands: `make run` and `make test` work from a fresh clone.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

# Commands the tests and the voice pipeline need, and the Debian packages that bring them.
SYSTEM_COMMANDS := pgbouncer chromium chromedriver espeak-ng sox
SYSTEM_PACKAGES := pgbouncer chromium chromium-driver espeak-ng sox

# Services mode: Postgres through our PgBouncer (scripts/services.sh), Redis db 0 as the base.
# TEST_DATABASE: give concurrent runs on one machine their own (PgBouncer routes any name).
export PGBOUNCER_PORT ?= 6432
TEST_DATABASE ?= test_parley
SERVICES_ENV := DATABASE_URL=postgres://postgres@127.0.0.1:$(PGBOUNCER_PORT)/parley \
	DATABASE_TEST_NAME=$(TEST_DATABASE) \
	REDIS_URL=redis://127.0.0.1:6379/0 \
	PARLEY_TEST_MODE=services
PYTEST_ARGS ?=

.PHONY: help venv system-deps services run test test-embedded test-services lint bench-voice clean

help:
	@echo "make run          serve Parley at http://127.0.0.1:8000 (embedded defaults; reads .env)"
	@echo "make test         the whole suite twice: embedded defaults, then Postgres+PgBouncer+Redis+Celery"
	@echo "make lint         ruff"
	@echo "make services     start Postgres, Redis and PgBouncer (127.0.0.1:6432)"
	@echo "make bench-voice  voice pipeline latency benchmark"
	@echo "make clean        remove generated files (keeps .venv)"

venv: $(STAMP)

# Reinstall only when a requirements file is newer than the stamp.
$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	@touch $@

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

# Both modes run even when the first fails; the target fails if either did.
test: venv system-deps services
	@mkdir -p var
	@status=0; \
	echo "=== embedded defaults: SQLite, in-memory layers, in-process workers ==="; \
	env -u DATABASE_URL -u REDIS_URL -u PARLEY_TEST_MODE $(VENV)/bin/pytest $(PYTEST_ARGS) || status=1; \
	echo "=== services: Postgres via PgBouncer, Redis, real Celery worker ==="; \
	env $(SERVICES_ENV) $(VENV)/bin/pytest $(PYTEST_ARGS) || status=1; \
	exit $$status

test-embedded: venv
	@mkdir -p var
	env -u DATABASE_URL -u REDIS_URL -u PARLEY_TEST_MODE $(VENV)/bin/pytest $(PYTEST_ARGS)

test-services: venv system-deps services
	@mkdir -p var
	env $(SERVICES_ENV) $(VENV)/bin/pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench-voice: venv
	$(PY) -m benchmarks.voice

clean:
	-bash scripts/services.sh down
	rm -rf var staticfiles .pytest_cache .ruff_cache
	find . -path ./.venv -prune -o -name __pycache__ -type d -exec rm -rf {} +
