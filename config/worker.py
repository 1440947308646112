"""`python -m config.worker ROLE [celery worker options]`: a Celery worker of one
role (`stt`, `tts` or `all`; see config.celery.worker_arguments). Options given
after the role override the role's (a later `-n` or `-c` wins)."""

import os
import sys


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: python -m config.worker stt|tts|all [celery worker options]")
    # The process's role (logs, parley_process_info), before the settings are read;
    # an unknown role is refused below.
    if argv[0].isalpha() and argv[0].islower():
        os.environ.setdefault("PARLEY_ROLE", f"worker-{argv[0]}")
    from config.celery import app, worker_arguments

    try:
        arguments = worker_arguments(argv[0])
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    app.worker_main(["worker", *arguments, *argv[1:]])


if __name__ == "__main__":
    main(sys.argv[1:])
