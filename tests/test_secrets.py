"""No secret in the repository, none in the logs, and production's deploy checks clean."""

import re
import secrets
import subprocess

import pytest

from apps.personas.tests.factories import PersonaFactory
from apps.realtime.tests.conftest import socket_opener
from tests import live
from tests.test_settings import ROOT, run_python

# Written in pieces, so that this file does not match itself.
KEY_PATTERNS = {
    "AWS access key": r"AKIA" + r"[0-9A-Z]{16}",
    "private key": r"-----BEGIN [A-Z ]*" + r"PRIVATE KEY-----",
    "OpenAI key": r"\bsk-" + r"(?:proj-)?[A-Za-z0-9_-]{32,}",
    "GitHub token": r"\bgh[pousr]_" + r"[A-Za-z0-9]{36}",
    "Slack token": r"\bxox[abprs]-" + r"[A-Za-z0-9-]{10,}",
    "Google API key": r"\bAIza" + r"[0-9A-Za-z_-]{35}",
}


def test_no_file_in_the_repository_holds_a_key():
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    found = []
    for name in filter(None, files):
        path = ROOT / name.decode()
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        text = path.read_bytes().decode(errors="ignore")
        found += [(kind, name.decode()) for kind, p in KEY_PATTERNS.items() if re.search(p, text)]
    assert found == []


def test_production_passes_djangos_deploy_checks():
    env = {"DJANGO_ENV": "production", "SECRET_KEY": secrets.token_urlsafe(60),
           "ALLOWED_HOSTS": "parley.example.com"}  # fmt: skip
    result = run_python(
        "import django, sys; django.setup(); from django.core.management import call_command;"
        " call_command('check', deploy=True, fail_level='WARNING')",
        **env,
    )
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout + result.stderr


@pytest.mark.django_db(transaction=True)
def test_secrets_never_reach_the_logs(live_env, settings):
    # given a server with a secret key and an LLM key of its own, whose endpoint is down
    secret_key, api_key = secrets.token_urlsafe(50), "sk-" + secrets.token_urlsafe(40)
    settings.SECRET_KEY = secret_key  # the sessions this test signs in with are its
    server = live.start_daphne({**live_env, "SECRET_KEY": secret_key, "LLM_API_KEY": api_key,
                                "LLM_BASE_URL": f"http://127.0.0.1:{live.free_port()}/v1",
                                "LLM_MAX_RETRIES": "0", "LOG_LEVEL": "DEBUG"})  # fmt: skip
    clients: list = []
    try:
        PersonaFactory(slug="keyed", llm_kind="openai", tts_kind="espeak")
        client = socket_opener(server, clients)("keyed")
        # when a turn fails on the LLM (its error is logged)
        client.send_json({"type": "text", "text": "hello?"})
        error = client.wait_for(lambda e: e["type"] == "error", timeout=30).event
        assert error["code"] == "llm_unavailable"
        live.http_get(f"{server.url}/metrics")  # and a refused scrape
    finally:
        for client in clients:
            client.close()
        server.stop()
    # then neither key is anywhere in its log
    log = server.log_path.read_text(errors="replace")
    assert "reply failed (llm_unavailable)" in log  # the failure itself is logged
    assert secret_key not in log and api_key not in log
    assert api_key[:12] not in log
