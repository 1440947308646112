"""`python -m config.worker ROLE [celery worker options]`: a Celery worker of one
role (`stt`, `tts` or `all`; see config.celery.worker_arguments). Options given
after the role override the role's (a later `-n` or `-c` wins)."""

import sys


def main(argv: list[str]) -> None:
    from config.celery import app, worker_arguments

    if not argv:
        raise SystemExit("usage: python -m config.worker stt|tts|all [celery worker options]")
    try:
        arguments = worker_arguments(argv[0])
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    app.worker_main(["worker", *arguments, *argv[1:]])


if __name__ == "__main__":
    main(sys.argv[1:])
