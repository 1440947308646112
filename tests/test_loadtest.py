"""The load test (locustfiles/): a short headless Locust run against a real Daphne
and a real Celery worker (in the services run only, the stack `make loadtest` runs
on: it is the suite's longest test), the accounts it signs in with, the summary it
prints, and the clear errors for bad input.

Locust is only ever run in a subprocess: importing it here would monkey-patch
this process with gevent.
"""

import csv
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from django.contrib.auth import authenticate
from django.core.management import CommandError, call_command

from locustfiles import run, summary
from tests.audio import AUDIO_DIR
from tests.live import ROOT

CLIPS = ("deepspeech_LDC93S1.wav", "speechbrain_spk1_snt1.wav")
EACH_KIND = 2  # users of each kind in the short run
VOICE_STAGES = ("speech_end_to_final", "final_to_first_token", "first_token_to_first_audio", "turn")
TEXT_STAGES = ("text_to_final", "final_to_first_token", "turn")
PAGES = (
    ("GET", "/accounts/login/"),
    ("POST", "/accounts/login/ (POST)"),
    ("GET", "/"),
    ("GET", "/conversations/"),
    ("GET", "/conversations/[id]/transcript/"),
    ("POST", "/personas/[slug]/talk/"),
)


def locust(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "locust", "-f", "locustfiles/locustfile.py", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_short_headless_run_has_every_user_kind_and_stage_and_no_failure(
    transactional_db, live_daphne, live_worker, services_mode, tmp_path
):
    if not services_mode:  # 45 s; make loadtest runs on the services stack, as this run does
        pytest.skip("the headless run is made in make test's services run")
    from apps.conversations.models import Message
    from apps.personas.demo import demo_seed

    demo_seed()
    users_file = tmp_path / "users.json"
    call_command("loadtest_seed", users=3 * EACH_KIND, out=str(users_file))
    audio = tmp_path / "audio"
    audio.mkdir()
    for name in CLIPS:
        shutil.copy(AUDIO_DIR / name, audio / name)
    out = tmp_path / "reports"

    command = [
        sys.executable, "-m", "locustfiles.run", "--host", live_daphne.url,
        "--users-file", str(users_file), "--users", str(3 * EACH_KIND),
        "--spawn-rate", str(3 * EACH_KIND), "--duration", "40s",
        "--mix", "http=1,voice=1,text=1", "--audio-dir", str(audio), "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180)
    printed = done.stdout + done.stderr + run.summary_tail(out / "locust-summary.txt")

    assert done.returncode == 0, printed
    assert f"{EACH_KIND} HttpBrowser" in done.stdout and f"{EACH_KIND} VoiceTalker" in done.stdout
    assert f"{EACH_KIND} TextTyper" in done.stdout
    rows = {(row.type, row.name): row for row in summary.rows_read(out / "loadtest_stats.csv")}
    assert rows[("", "Aggregated")].failures == 0, printed
    expected = [*PAGES, ("ws", "connect")]
    expected += [("voice", name) for name in VOICE_STAGES]
    expected += [("text", name) for name in TEXT_STAGES]
    missing = [key for key in expected if key not in rows or rows[key].count == 0]
    assert not missing, printed
    assert all(row.failures == 0 for row in rows.values())
    assert float(rows[("voice", "turn")].p50) > 0
    # The table printed is the CSV's, one line per row.
    for (_kind, name), row in rows.items():
        assert any(name in line and str(row.count) in line for line in done.stdout.splitlines())
    with open(out / "loadtest_failures.csv", newline="") as handle:
        assert list(csv.DictReader(handle)) == []
    html = (out / "loadtest.html").read_text()
    assert "speech_end_to_final" in html and "first_token_to_first_audio" in html
    # The voice users' speech was transcribed and stored, as real turns.
    spoken = Message.objects.filter(role=Message.Role.USER, source=Message.Source.VOICE)
    assert spoken.filter(conversation__user__username__startswith="loadtest-").exists()


def test_loadtest_seed_makes_accounts_that_sign_in_and_new_passwords_each_run(
    transactional_db, tmp_path
):
    import json

    from apps.personas.demo import demo_seed

    demo_seed()
    path = tmp_path / "sub" / "users.json"
    call_command("loadtest_seed", users=2, out=str(path), prefix="lt-")
    first = json.loads(path.read_text())["users"]
    assert [row["username"] for row in first] == ["lt-0001", "lt-0002"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert authenticate(username="lt-0001", password=first[0]["password"]) is not None
    from apps.accounts.models import User

    user = User.objects.get(username="lt-0001")
    assert (user.audio_seconds_quota, user.tokens_quota) == (0, 0)  # unlimited
    call_command("loadtest_seed", users=1, out=str(path), prefix="lt-")
    second = json.loads(path.read_text())["users"]
    assert second[0]["password"] != first[0]["password"]
    assert authenticate(username="lt-0001", password=first[0]["password"]) is None
    assert second[0]["conversation_id"] != first[0]["conversation_id"]


def test_loadtest_seed_refuses_bad_input(db, tmp_path):
    with pytest.raises(CommandError, match="at least 1"):
        call_command("loadtest_seed", users=0, out=str(tmp_path / "u.json"))
    with pytest.raises(CommandError, match="run `manage.py seed_demo` first"):
        call_command("loadtest_seed", users=1, out=str(tmp_path / "u.json"))
    assert not (tmp_path / "u.json").exists()


def test_locust_refuses_bad_options_before_any_user_starts(tmp_path):
    users = tmp_path / "users.json"
    users.write_text('{"users": [{"username": "u", "password": "p", "conversation_id": "c"}]}')
    base = ["--headless", "--host", "http://127.0.0.1:9", "-u", "1", "-t", "2s"]
    cases = [
        (["--users-file", str(tmp_path / "nope.json")], "no users file at"),
        (["--users-file", str(users), "--mix", "voice=x"], "bad --mix item 'voice=x'"),
        (["--users-file", str(users), "--mix", "http=0"], "gives every user kind weight 0"),
        (["--users-file", str(users), "--audio-dir", str(tmp_path)], "holds no audio"),
        (["--users-file", str(tmp_path)], "not a users file"),
    ]
    for args, message in cases:
        done = locust(*base, *args)
        assert done.returncode != 0 and message in done.stderr, (args, done.stderr[-2000:])


def test_summary_fails_a_run_with_failures_or_no_requests(tmp_path, capsys):
    header = "Type,Name,Request Count,Failure Count,50%,95%\n"
    good = tmp_path / "good_stats.csv"
    good.write_text(header + "voice,turn,3,0,1200,2000\n,Aggregated,3,0,1200,2000\n")
    assert summary.main([str(good)]) == 0
    assert "voice  turn" in capsys.readouterr().out
    bad = tmp_path / "bad_stats.csv"
    bad.write_text(header + "voice,turn,3,1,1200,2000\n,Aggregated,3,1,1200,2000\n")
    assert summary.main([str(bad)]) == 1
    assert "FAILED: 1 of 3 requests failed" in capsys.readouterr().out
    empty = tmp_path / "empty_stats.csv"
    empty.write_text(header + ",Aggregated,0,0,0,0\n")
    assert summary.main([str(empty)]) == 1
    assert "no request was made" in capsys.readouterr().out
    assert summary.main([str(tmp_path / "missing.csv")]) == 2
    assert "no Locust stats CSV" in capsys.readouterr().err
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    assert summary.main([str(tmp_path / "other.csv")]) == 2
    assert "is not a Locust stats CSV" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--users", "0"], "must be at least 1"),
        (["--spawn-rate", "0"], "must be positive"),
        (["--duration", "soon"], "expected 90s or 2m"),
        (["--host", "http://127.0.0.1:8000"], "--host needs --users-file"),
    ],
)
def test_loadtest_runner_refuses_bad_options(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        run.parse_args(args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_make_loadtest_passes_its_variables(tmp_path):
    done = subprocess.run(
        ["make", "-n", "loadtest", "LOADTEST_USERS=5", "LOADTEST_SPAWN_RATE=1",
         "LOADTEST_DURATION=30s", "LOADTEST_MIX=voice=1"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    line = next(
        line for line in done.stdout.replace("\\\n", " ").splitlines() if "locustfiles.run" in line
    )
    for part in ("--users 5", "--spawn-rate 1", "--duration 30s", "--mix voice=1"):
        assert part in line
    assert Path(ROOT / ".gitignore").read_text().count("/reports/") == 1  # reports untracked


def test_a_turn_that_times_out_fails_the_run(transactional_db, live_daphne, live_worker, tmp_path):
    from apps.personas.demo import demo_seed

    demo_seed()
    users_file = tmp_path / "users.json"
    call_command("loadtest_seed", users=1, out=str(users_file))
    out = tmp_path / "reports"
    # No reply is spoken, audio and all, within 50 ms of its text being sent.
    command = [
        sys.executable, "-m", "locustfiles.run", "--host", live_daphne.url,
        "--users-file", str(users_file), "--users", "1", "--duration", "8s",
        "--mix", "text=1", "--out", str(out), "--", "--turn-timeout", "0.05",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    rows = {(row.type, row.name): row for row in summary.rows_read(out / "loadtest_stats.csv")}
    assert rows[("text", "turn")].failures >= 1
    assert "FAILED:" in done.stdout
    with open(out / "loadtest_failures.csv", newline="") as handle:
        errors = [row["Error"] for row in csv.DictReader(handle)]
    assert any("TimeoutError" in error and "0.05s" in error for error in errors), errors


@pytest.mark.parametrize("ignores_sigterm", [False, True])
def test_a_locust_that_hangs_past_its_run_time_is_stopped_and_fails_the_run(
    ignores_sigterm, tmp_path, monkeypatch
):
    monkeypatch.setattr(run, "STOP_GRACE_S", 1)
    monkeypatch.setattr(run, "KILL_GRACE_S", 1)
    pid_file = tmp_path / "pids"
    hang = (
        "import os, signal, subprocess, sys, time\n"
        f"signal.signal(signal.SIGTERM, signal.SIG_IGN if {ignores_sigterm} else signal.SIG_DFL)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
        "time.sleep(60)\n"
    )
    code = run.locust_run([sys.executable, "-c", hang, "--run-time", "2s"], tmp_path / "out")
    assert code == 1
    pids = [int(pid) for pid in pid_file.read_text().split()]  # Locust and its worker
    assert not [pid for pid in pids if _running(pid)]


def _running(pid: int) -> bool:
    """Alive and not a zombie (a reparented child may wait a moment to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_a_run_time_is_read_in_seconds():
    assert [run.seconds(d) for d in ("90", "90s", "2m", "1h30m", "1m5s")] == [90, 90, 120, 5400, 65]


def _events(*events: dict) -> list:
    from apps.pipeline.talk_client import Received

    return [Received(float(n), event) for n, event in enumerate(events)]


def test_spoken_turns_wait_for_every_utterance_and_all_of_the_reply_audio():
    from apps.pipeline.talk_client import spoken_turns

    start = {"type": "speech.start", "utterance_id": "u1"}
    end = {"type": "speech.end", "utterance_id": "u1"}
    final = {"type": "transcript.final", "utterance_id": "u1", "text": "hi"}
    delta = {"type": "reply.delta", "reply_id": "r1", "text": "Hello"}
    audio = {"type": "reply.audio.start", "reply_id": "r1", "index": 0, "last": True, "bytes": 6}
    done = {"type": "reply.done", "reply_id": "r1", "status": "complete", "audio_parts": 1}
    assert spoken_turns(_events(start), 0) is None  # not ended
    assert spoken_turns(_events(start, end), 0) is None  # not transcribed
    assert spoken_turns(_events(start, end, final, delta, done), 0) is None  # audio owed
    partial = {"type": "binary", "bytes": 4}
    assert spoken_turns(_events(start, end, final, delta, done, audio, partial), 0) is None
    rest = {"type": "binary", "bytes": 2}
    received = _events(start, end, final, delta, done, audio, partial, rest)
    (turn,) = spoken_turns(received, 0)
    assert (turn.speech_end_t, turn.final_t, turn.text) == (1.0, 2.0, "hi")
    reply = turn.reply
    assert (reply.first_token_t, reply.first_audio_t, reply.done_t, reply.complete_t) == (
        3.0, 5.0, 4.0, 7.0,
    )  # fmt: skip
    assert reply.status == "complete"
    empty = {"type": "transcript.empty", "utterance_id": "u1"}
    (turn,) = spoken_turns(_events(start, end, empty), 0)
    assert turn.reply is None and turn.text == ""
    stopped = {"type": "reply.interrupted", "reply_id": "r1", "status": "interrupted"}
    (turn,) = spoken_turns(_events(start, end, final, delta, stopped), 0)
    assert turn.reply.status == "interrupted" and turn.reply.complete_t == 4.0
    assert spoken_turns(_events(start, end, empty, start), 0) is None  # a second one is open
    # Speaking again while the reply's audio plays stops the audio, with no event.
    again = {"type": "speech.start", "utterance_id": "u2"}
    end2 = {"type": "speech.end", "utterance_id": "u2"}
    empty2 = {"type": "transcript.empty", "utterance_id": "u2"}
    received = _events(start, end, final, delta, done, audio, partial, again, end2, empty2)
    first, second = spoken_turns(received, 0)
    assert first.reply.audio_cut and first.reply.complete_t == 7.0
    assert first.reply.status == "complete" and second.reply is None
