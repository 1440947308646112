"""`make test` runs both modes from a clean environment: settings exported in the
developer's shell (an LLM endpoint, a broker, production mode, ...) must not
reach either pytest run."""

import os
import subprocess

from tests.live import ROOT

# Each would change what the tests run against if it leaked from the shell.
LEAKY = {
    "DJANGO_ENV": "production",
    "LLM_KIND": "openai",
    "LLM_BASE_URL": "http://llm.invalid/v1",
    "LLM_API_KEY": "sk-from-the-shell",
    "LLM_API_KEY_FILE": "/nonexistent/key",
    "LLM_MODEL": "shell-model",
    "LLM_TIMEOUT_S": "1",
    "OPENAI_API_KEY": "sk-from-the-shell",
    "OPENAI_BASE_URL": "http://openai.invalid/v1",
    "CELERY_BROKER_URL": "redis://broker.invalid:6379/9",
    "CELERY_RESULT_BACKEND": "redis://results.invalid:6379/9",
    "CACHE_URL": "redis://cache.invalid:6379/9",
    "CHANNEL_LAYER_URL": "redis://layer.invalid:6379/9",
    "AUDIO_STORE_URL": "redis://audio.invalid:6379/9",
    "STT_KIND": "openai",
    "TTS_KIND": "openai",
    "DATABASE_URL_FILE": "/nonexistent/database-url",
}


def test_make_test_runs_both_modes_without_the_shells_settings():
    # given a shell that exports settings (and runs the embedded mode's REDIS_URL)
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")  # a make running these tests
    }
    env.update(LEAKY, REDIS_URL="redis://shell.invalid:6379/0", PARLEY_TEST_MODE="services")

    # when `make test` runs, with `env` in place of pytest and its set-up steps and lint skipped
    result = subprocess.run(
        [
            "make",
            "-s",
            "-o",
            "venv",
            "-o",
            "system-deps",
            "-o",
            "services",
            "test",
            "PYTEST=env",
            "TEST_LINT=",
            "DOCKER_UP=true",
            "DEPLOY_TESTS=",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    # then each run got the environment it is meant to have, and nothing from the shell
    assert result.returncode == 0, result.stderr
    _, embedded, services, deploy = result.stdout.split("=== ")
    runs = {}
    for name, dump in (("embedded", embedded), ("services", services), ("deploy", deploy)):
        lines = dump.splitlines()[1:]  # after the "=== <mode> ===" heading
        runs[name] = dict(line.split("=", 1) for line in lines if "=" in line)
    for name, run in runs.items():
        leaked = sorted(set(LEAKY) & set(run))
        assert leaked == [], f"{name} run got {leaked} from the shell"
    assert "REDIS_URL" not in runs["embedded"] and "DATABASE_URL" not in runs["embedded"]
    assert "PARLEY_TEST_MODE" not in runs["embedded"]
    assert runs["services"]["REDIS_URL"] == "redis://127.0.0.1:6379/0"
    assert runs["services"]["DATABASE_URL"].startswith("postgres://postgres@127.0.0.1:")
    assert runs["services"]["PARLEY_TEST_MODE"] == "services"
    assert {
        k: runs["deploy"].get(k) for k in ("REDIS_URL", "DATABASE_URL", "PARLEY_TEST_MODE")
    } == {
        k: runs["services"][k] for k in ("REDIS_URL", "DATABASE_URL", "PARLEY_TEST_MODE")
    }  # the image test (make test-deploy) runs in services mode too
    # and the rest of the shell's environment is kept (PATH, HOME, ...)
    assert runs["embedded"]["PATH"] == os.environ["PATH"]
