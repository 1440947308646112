"""config/settings.py switches on environment variables alone. Each case imports the
settings in a fresh interpreter with a controlled environment (no django.setup(),
so no app code runs)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SETTINGS_FILE = ROOT / "config" / "settings.py"

# Every variable settings.py reads; removed so the developer's shell cannot leak in.
SETTINGS_VARS = sorted(
    set(re.findall(r'(?:env_\w+|required)\(\s*"([A-Z0-9_]+)"', SETTINGS_FILE.read_text()))
)

DUMP = """
import json
from django.conf import settings as s
db = s.DATABASES["default"]
print(json.dumps({
    "engine": db["ENGINE"],
    "db_name": str(db["NAME"]),
    "db_options": db.get("OPTIONS", {}),
    "server_side_cursors_disabled": db.get("DISABLE_SERVER_SIDE_CURSORS", False),
    "conn_max_age": db.get("CONN_MAX_AGE"),
    "test_name": db.get("TEST", {}).get("NAME"),
    "cache_backend": s.CACHES["default"]["BACKEND"],
    "cache_location": s.CACHES["default"].get("LOCATION"),
    "layer_backend": s.CHANNEL_LAYERS["default"]["BACKEND"],
    "layer_hosts": [
        host if isinstance(host, str) else host["address"]
        for host in s.CHANNEL_LAYERS["default"].get("CONFIG", {}).get("hosts", [])
    ],
    "session_engine": s.SESSION_ENGINE,
    "broker": s.CELERY_BROKER_URL,
    "results": s.CELERY_RESULT_BACKEND,
    "audio_store": s.AUDIO_STORE_URL,
    "secret_key": s.SECRET_KEY,
    "debug": s.DEBUG,
    "allowed_hosts": s.ALLOWED_HOSTS,
    "proxy_ssl_header": s.SECURE_PROXY_SSL_HEADER,
}))
"""


def clean_env(**overrides: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS_VARS}
    for name in SETTINGS_VARS:
        env.pop(f"{name}_FILE", None)
    env.update(DJANGO_SETTINGS_MODULE="config.settings", HF_HUB_OFFLINE="1", **overrides)
    return env


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def load_settings(**env: str) -> dict:
    result = run_python(DUMP, **env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def redis_db_number(url: str) -> int:
    return int(url.rsplit("/", 1)[1])


def test_nothing_set_runs_on_embedded_defaults():
    # given no environment variables
    # when
    s = load_settings()
    # then
    assert s["engine"] == "django_prometheus.db.backends.sqlite3"  # counts queries (/metrics)
    assert s["db_name"].endswith("var/parley.sqlite3")
    assert s["test_name"].endswith("var/test.sqlite3")  # a file: live servers see test data
    assert s["cache_backend"] == "django.core.cache.backends.locmem.LocMemCache"
    assert s["layer_backend"] == "channels.layers.InMemoryChannelLayer"
    assert s["session_engine"] == "django.contrib.sessions.backends.db"
    assert s["broker"] == ""  # no broker: in-process workers
    assert s["results"] is None
    assert s["debug"] is True


def test_database_and_redis_urls_switch_to_services():
    # given
    env = {
        "DATABASE_URL": "postgres://parley:secret@pgbouncer.internal:6432/parley",
        "REDIS_URL": "redis://redis.internal:6379/0",
    }
    # when
    s = load_settings(**env)
    # then Postgres, safe behind PgBouncer in transaction pooling mode
    assert s["engine"] == "django_prometheus.db.backends.postgresql"
    assert s["db_name"] == "parley"
    assert "prepare_threshold" in s["db_options"]
    assert s["db_options"]["prepare_threshold"] is None
    assert s["server_side_cursors_disabled"] is True
    assert s["conn_max_age"] == 60  # client connections to PgBouncer are kept; it pools
    # and Redis for everything else, one logical database each
    assert s["cache_backend"] == "django_redis.cache.RedisCache"
    assert s["layer_backend"] == "apps.realtime.layer.ChannelLayer"
    assert s["session_engine"] == "django.contrib.sessions.backends.cached_db"
    urls = {
        "cache": s["cache_location"],
        "layer": s["layer_hosts"][0],
        "broker": s["broker"],
        "audio": s["audio_store"],
        "results": s["results"],
    }
    assert all(url.startswith("redis://redis.internal:6379/") for url in urls.values()), urls
    numbers = {name: redis_db_number(url) for name, url in urls.items()}
    assert numbers == {"cache": 1, "layer": 2, "broker": 3, "audio": 4, "results": 5}


@pytest.mark.parametrize(
    ("env", "header"),
    [
        ({}, None),
        ({"DJANGO_ENV": "production", "SECRET_KEY": "x" * 60, "ALLOWED_HOSTS": "p.example"}, None),
        ({"TRUST_PROXY_HEADERS": "true"}, ["HTTP_X_FORWARDED_PROTO", "https"]),
    ],
)
def test_proxy_headers_are_trusted_only_when_the_deployment_says_so(env, header):
    assert load_settings(**env)["proxy_ssl_header"] == header


def test_database_test_name_is_configurable():
    s = load_settings(
        DATABASE_URL="postgres://postgres@127.0.0.1:6432/parley", DATABASE_TEST_NAME="test_parley"
    )
    assert s["test_name"] == "test_parley"


@pytest.mark.parametrize(
    ("env", "missing"),
    [
        ({"ALLOWED_HOSTS": "parley.example"}, "SECRET_KEY"),
        ({"SECRET_KEY": "x" * 60}, "ALLOWED_HOSTS"),
    ],
)
def test_production_refuses_to_start_without_required_values(env, missing):
    # when
    result = run_python(DUMP, DJANGO_ENV="production", **env)
    # then
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert missing in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("value", ["prod", "staging", "Production"])
def test_an_unknown_django_env_refuses_to_start_rather_than_mean_development(value):
    result = run_python(DUMP, DJANGO_ENV=value)
    assert result.returncode != 0
    assert f"DJANGO_ENV={value!r}: use development or production" in result.stderr


ROUTES = (
    "import django; django.setup(); from apps.realtime.routing import websocket_urlpatterns as u;"
    " print(sorted(str(p.pattern) for p in u))"
)


@pytest.mark.parametrize(
    ("env", "echo_routed"),
    [
        ({}, True),
        ({"DJANGO_ENV": "production", "SECRET_KEY": "x" * 60, "ALLOWED_HOSTS": "p.example"}, False),
    ],
)
def test_the_unauthenticated_echo_socket_is_not_routed_in_production(env, echo_routed):
    result = run_python(ROUTES, **env)
    assert result.returncode == 0, result.stderr
    routes = result.stdout.strip()
    assert "ws/conversations/<uuid:conversation_id>/" in routes
    assert ("ws/echo/" in routes) is echo_routed


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT='xml': use json or text"),
        ({"PARLEY_ROLE": "Web Pod"}, "PARLEY_ROLE='Web Pod'"),
        ({"READINESS_TIMEOUT_S": "0"}, "READINESS_TIMEOUT_S > 0"),
        ({"READINESS_CACHE_S": "-1"}, "READINESS_CACHE_S must be >= 0"),
        # a task may not outlive its visibility timeout, nor that the audio's TTL
        ({"CELERY_TASK_TIME_LIMIT": "90"}, "got 30, 90, 60"),
        ({"CELERY_VISIBILITY_TIMEOUT_S": "900"}, "got 30, 45, 900"),
    ],
)
def test_malformed_logging_and_probe_settings_refuse_to_start(env, named):
    result = run_python(DUMP, **env)
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert named in result.stderr.strip().splitlines()[-1]


def test_secret_key_may_come_from_a_file(tmp_path):
    # given
    secret = "file-secret-" + "k" * 50
    secret_file = tmp_path / "secret_key"
    secret_file.write_text(secret + "\n")
    # when
    s = load_settings(
        DJANGO_ENV="production", SECRET_KEY_FILE=str(secret_file), ALLOWED_HOSTS="parley.example"
    )
    # then
    assert s["secret_key"] == secret
    assert s["debug"] is False
    assert s["allowed_hosts"] == ["parley.example"]


def test_env_example_documents_every_setting():
    documented = set(
        re.findall(r"^# ?([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M)
    )
    assert SETTINGS_VARS, "no env_* calls found in settings.py"
    assert set(SETTINGS_VARS) - documented == set()
