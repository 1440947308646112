"""The Celery app of the fault tests' workers (`celery -A apps.pipeline.tests.fault_tasks
worker`): Parley's own app and tasks, plus a poison task that kills its worker."""

import os
import signal
import time

from apps.pipeline.tasks import TranscribeWindowTask
from config.celery import app

__all__ = ["app", "transcribe_window_kill_task"]


@app.task(base=TranscribeWindowTask, name="faults.transcribe_window_kill_task",
          acks_late=True, ignore_result=True)  # fmt: skip
def transcribe_window_kill_task(**kwargs) -> None:
    """A transcription that kills its worker, whole (SIGKILL), every time it starts;
    each start is written to FAULT_STARTS_FILE first. As a final transcript's task,
    the client hears of it when it is dead-lettered (TranscribeWindowTask.abandoned)."""
    with open(os.environ["FAULT_STARTS_FILE"], "a") as starts:
        starts.write(f"{time.time()}\n")
    os.kill(os.getpid(), signal.SIGKILL)
