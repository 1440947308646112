"""The Celery app. Queues: `default`, `stt` (speech-to-text), `tts` (text-to-speech);
each runs as its own worker Deployment in production and scales on its own backlog."""

import os

from celery import Celery
from kombu import Queue

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

app = Celery("parley")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.task_queues = [Queue(name) for name in ("default", "stt", "tts")]
app.autodiscover_tasks()
