"""The container image, built and run for real (`make test-deploy`, part of `make test`).

`scripts/docker.sh up` starts the engine and makes parley-base:bookworm first. The test builds
the Dockerfile on that base, then runs each role from it the way a cluster would: read-only
root filesystem with a tmpfs /tmp, uid 10001, production settings, `--network host`, against
the test's own database (through PgBouncer, 127.0.0.1:6432) and Redis databases of its own;
then one voice turn goes through the containerised web and workers with the talk client.
Services mode only (it needs Postgres, PgBouncer and Redis). Every container it starts is
removed at the end.
"""

import json
import os
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from django.test import override_settings

from apps.accounts.models import User
from apps.accounts.services import session_key_create
from apps.conversations.services import conversation_start
from apps.personas.demo import demo_seed
from apps.personas.models import Persona
from apps.pipeline.talk_client import TalkClient
from apps.realtime.tests.helpers import speak
from tests import live
from tests.audio import manifest, pcm_of, word_error_rate

DOCKER = "/usr/bin/docker"  # Debian's client, the version of its daemon (scripts/docker.sh)
BASE_IMAGE = "parley-base:bookworm"
TAG = "parley:test-image"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
HOST_LOCAL_CAS = Path("/usr/local/share/ca-certificates")  # this machine's own CAs
SECRET_KEY = "image-test-secret-key-not-for-production"
# Redis databases of this test's own (the other runs use 0-4 and 9): cache, layer, broker, audio.
REDIS_DBS = {
    "CACHE_URL": 10,
    "CHANNEL_LAYER_URL": 11,
    "CELERY_BROKER_URL": 12,
    "AUDIO_STORE_URL": 13,
}
CLIP = "deepspeech_LDC93S1.wav"  # one short sentence
START_TIMEOUT_S = 120.0


def docker(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [DOCKER, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "DOCKER_BUILDKIT": "1"},
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"docker {' '.join(args[:3])} ... exited {result.returncode}:\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


@pytest.fixture(scope="module")
def image() -> str:
    """The product's Dockerfile built on the debootstrap base (cached layers are reused)."""
    if docker("image", "inspect", BASE_IMAGE, check=False).returncode != 0:
        raise AssertionError(f"no {BASE_IMAGE} image: run `bash scripts/docker.sh up` first")
    secret = ["--secret", f"id=ca,src={HOST_CA_BUNDLE}"] if HOST_CA_BUNDLE.exists() else []
    docker(
        "build", "--network", "host", *secret, "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
        "-t", TAG, str(live.ROOT), timeout=1800,
    )  # fmt: skip
    return TAG


@dataclass
class Containers:
    """Starts containers of the image (read-only, tmpfs /tmp, host network) and removes them."""

    image: str
    ids: list[str] = field(default_factory=list)

    def args(self, env: dict[str, str]) -> list[str]:
        flags = ["--network", "host", "--read-only", "--tmpfs", "/tmp:rw,mode=1777"]
        for name, value in env.items():
            flags += ["-e", f"{name}={value}"]
        return flags

    def run(
        self, role: str, env: dict[str, str], timeout: float = 300
    ) -> subprocess.CompletedProcess:
        """Run `role` in the foreground until it exits; the result (removed afterwards)."""
        name = f"parley-test-{role}-{os.getpid()}-{len(self.ids)}"
        self.ids.append(name)
        return docker("run", "--name", name, *self.args(env), self.image, role,
                      check=False, timeout=timeout)  # fmt: skip

    def start(self, role: str, env: dict[str, str]) -> str:
        """Start `role` in the background; its container id."""
        cid = docker("run", "-d", *self.args(env), self.image, role).stdout.strip()
        self.ids.append(cid)
        return cid

    def running(self, cid: str) -> bool:
        state = docker("inspect", "--format", "{{json .State}}", cid).stdout
        return json.loads(state)["Running"]

    def logs(self, cid: str, lines: int = 60) -> str:
        result = docker("logs", "--tail", str(lines), cid, check=False)
        return result.stdout + result.stderr

    def wait_ok(self, cid: str, url: str, what: str) -> None:
        """Until `url` answers 200; fails with the container's log if it exits or times out."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if not self.running(cid):
                raise AssertionError(f"{what} exited while starting:\n{self.logs(cid)}")
            try:
                if live.http_get(url, timeout_s=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(
            f"{what}: {url} not 200 after {START_TIMEOUT_S:.0f}s:\n{self.logs(cid)}"
        )

    def remove_all(self) -> None:
        for cid in self.ids:
            docker("rm", "-f", cid, check=False)
        self.ids.clear()


@pytest.fixture(scope="module")
def containers(image) -> Iterator[Containers]:
    started = Containers(image)
    yield started
    started.remove_all()


@pytest.fixture(scope="module")
def app_env(live_env) -> dict[str, str]:
    """What a pod gets from its ConfigMap and Secret: the test database through PgBouncer,
    Redis databases of our own, a secret key, the metrics token."""
    if not live.services_mode():
        raise AssertionError("the image test needs services mode: run it with `make test-deploy`")
    redis = urllib.parse.urlsplit(live_env["REDIS_URL"])
    env = {
        "SECRET_KEY": SECRET_KEY,
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "DATABASE_URL": live_env["DATABASE_URL"],
        "METRICS_TOKEN": live.METRICS_TOKEN,
        "LOG_LEVEL": "INFO",
    }
    for name, db in REDIS_DBS.items():
        env[name] = f"redis://{redis.netloc}/{db}"
    import redis as redis_client

    for name in ("CELERY_BROKER_URL", "CHANNEL_LAYER_URL"):  # nothing left from an earlier run
        redis_client.Redis.from_url(env[name]).flushdb()
    return env


@dataclass
class Stack:
    web: str
    web_url: str
    workers: dict[str, tuple[str, str]]  # role: (container id, exporter URL)


@pytest.fixture(scope="module")
def stack(containers, app_env) -> Stack:
    """web plus the three workers, each in its own container, started together."""
    port = live.free_port()
    web = containers.start(
        "web",
        {**app_env, "PORT": str(port), "WEBSOCKET_ALLOWED_ORIGINS": f"http://127.0.0.1:{port}"},
    )
    workers = {}
    for role in ("worker-stt", "worker-tts", "worker-default"):
        metrics_port = live.free_port()
        cid = containers.start(
            role,
            {
                **app_env,
                "WORKER_METRICS_PORT": str(metrics_port),
                "WORKER_METRICS_HOST": "127.0.0.1",
            },
        )
        workers[role] = (cid, f"http://127.0.0.1:{metrics_port}")
    web_url = f"http://127.0.0.1:{port}"
    containers.wait_ok(web, f"{web_url}/healthz", "web")
    for role, (cid, url) in workers.items():
        containers.wait_ok(cid, f"{url}/readyz", role)
    return Stack(web=web, web_url=web_url, workers=workers)


def in_image(image: str, script: str) -> subprocess.CompletedProcess:
    """`bash -c script` in a read-only container of the image (no settings needed)."""
    return docker("run", "--rm", "--network", "host", "--read-only", "--tmpfs", "/tmp",
                  image, "bash", "-c", script)  # fmt: skip


def test_image_runs_as_uid_10001_in_production(image):
    out = in_image(image, "id -u; id -g; echo $DJANGO_ENV; touch /tmp/ok && echo tmp-writable")
    assert out.stdout.split() == ["10001", "10001", "production", "tmp-writable"]
    config = json.loads(docker("image", "inspect", image).stdout)[0]["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["/app/deploy/docker-entrypoint.sh"]
    # the root filesystem is read-only: not even the app's own directory is writable
    result = docker("run", "--rm", "--read-only", "--tmpfs", "/tmp", image, "touch", "/app/x",
                    check=False)  # fmt: skip
    assert result.returncode != 0 and "Read-only file system" in result.stderr


def test_host_ca_bundle_is_not_in_the_image(image):
    """pip had the host's CA bundle as a build secret; no layer of the final image kept it:
    no secret file, and none of this machine's own CAs (the ones Debian's bundle lacks,
    which the secret carried) anywhere in the image."""
    bundle = HOST_CA_BUNDLE.read_text() if HOST_CA_BUNDLE.exists() else ""
    # one line of each CA's base64 body, one that the bundle given to the build holds
    needles = [ca.read_text().splitlines()[2] for ca in sorted(HOST_LOCAL_CAS.glob("*.crt"))]
    needles = [needle for needle in needles if needle in bundle]
    search = ""
    if needles:  # a machine with CAs of its own (this one has)
        patterns = " ".join(f"-e {needle!r}" for needle in needles)
        search = (
            f"grep -rlF {patterns} / --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev"
            " 2>/dev/null"
        )
    out = in_image(image, f"test ! -e /run/secrets/ca || echo /run/secrets/ca; {search}; true")
    assert out.stdout.strip() == "", f"the host's CA is in the image: {out.stdout}"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ALLOWED_HOSTS": "127.0.0.1"}, "SECRET_KEY must be set when DJANGO_ENV=production"),
        ({"SECRET_KEY": SECRET_KEY}, "ALLOWED_HOSTS must be set when DJANGO_ENV=production"),
    ],
)
@pytest.mark.parametrize("role", ["web", "worker-default", "migrate"])
def test_refuses_to_start_without_its_secrets(containers, role, env, message):
    result = containers.run(role, env, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]


def test_migrate_exits_0(containers, app_env):
    result = containers.run("migrate", app_env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Operations to perform" in result.stdout, result.stdout


def test_web_probes_and_metrics(stack):
    assert live.http_get(f"{stack.web_url}/healthz")[0] == 200
    status, _, body = live.http_get(f"{stack.web_url}/readyz")
    assert status == 200, body
    assert "parley_process_info" in live.metrics_get(f"{stack.web_url}/metrics")
    assert live.http_get(f"{stack.web_url}/metrics")[0] == 401  # no bearer token


@pytest.mark.parametrize("role", ["worker-stt", "worker-tts", "worker-default"])
def test_worker_exporters_ready(stack, role):
    _, url = stack.workers[role]
    status, _, body = live.http_get(f"{url}/readyz")
    assert status == 200, body
    assert f'role="{role}"' in live.metrics_get(f"{url}/metrics")


def test_voice_turn_through_the_containers(stack, containers, transactional_db):
    """A spoken sentence in; its transcript, a reply and the reply's audio out, all from
    the containers (the host only created the user, persona and conversation)."""
    demo_seed()
    user = User.objects.create_user("image-talker", password="pw-123456!")
    conversation = conversation_start(user=user, persona=Persona.objects.get(slug="ada"))
    with override_settings(SECRET_KEY=SECRET_KEY):  # the session is signed with the web's key
        session = session_key_create(user=user)
    ws_url = stack.web_url.replace("http://", "ws://")
    client = TalkClient(f"{ws_url}/ws/conversations/{conversation.id}/", session_cookie=session)
    logs: Callable[[], str] = lambda: "\n".join(  # noqa: E731
        f"--- {name}:\n{containers.logs(cid, 30)}"
        for name, cid in [("web", stack.web)] + [(r, c) for r, (c, _) in stack.workers.items()]
    )
    try:
        ready = client.connect()
        assert ready["type"] == "ready", ready
        try:
            events = speak(client, pcm_of(CLIP))
        except TimeoutError as error:
            raise AssertionError(f"no settled turn: {error}\n{logs()}") from error
    finally:
        client.close()
    assert [e for e in events if e["type"] == "error"] == []
    finals = [e["text"] for e in events if e["type"] == "transcript.final"]
    assert len(finals) == 1, (finals, logs())
    assert word_error_rate([manifest()[CLIP]["reference_transcript"]], finals) <= 0.2, finals
    done = [e for e in events if e["type"] == "reply.done"]
    assert len(done) == 1 and done[0]["text"].strip(), done
    assert any(e["type"] == "reply.audio.start" for e in events)
    assert sum(e["bytes"] for e in events if e["type"] == "binary") > 0, "no reply audio"


def test_drain_role_turns_readiness_off(containers, app_env):
    """The web's preStop hook: `drain` creates the drain file (readiness 503 at once), then
    waits DRAIN_CLOSE_S + 5 s while the web process closes its sockets."""
    port = live.free_port()
    web = containers.start("web", {**app_env, "PORT": str(port), "DRAIN_CLOSE_S": "1"})
    url = f"http://127.0.0.1:{port}"
    containers.wait_ok(web, f"{url}/readyz", "web")
    started = time.monotonic()
    docker("exec", web, "/app/deploy/docker-entrypoint.sh", "drain", timeout=60)
    assert time.monotonic() - started >= 6.0  # DRAIN_CLOSE_S + 5
    status, _, body = live.http_get(f"{url}/readyz")
    assert status == 503 and b"draining" in body, (status, body)
    assert live.http_get(f"{url}/healthz")[0] == 200  # alive: only readiness is off


def test_llm_role_serves_the_offline_model_without_secrets(containers):
    """The `llm` role: the offline model's OpenAI-compatible endpoint, from the weights
    baked in at build time, with no database, no Redis and no secrets."""
    import openai

    port = live.free_port()
    llm = containers.start("llm", {"LLM_LOCAL_PORT": str(port)})
    containers.wait_ok(llm, f"http://127.0.0.1:{port}/healthz", "llm")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)

    [model] = client.models.list().data
    reply = client.chat.completions.create(
        model=model.id, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8
    )

    assert model.id == "SmolLM2-135M-Instruct"
    assert reply.choices[0].message.content and 0 < reply.usage.completion_tokens <= 8
    user = docker("exec", llm, "id", "-u").stdout.strip()
    assert user != "0"  # not root
