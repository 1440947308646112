"""Pins: requirements*.txt say what we depend on; requirements.lock pins every package
the venv holds, transitive ones included, and both installs (make venv, the Dockerfile)
are constrained by it."""

import re
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;#]+)")
NOT_FROZEN = {"pip", "setuptools", "wheel", "distribute"}  # what `pip freeze` leaves out


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        match = PIN.match(line.strip())
        if match:
            found[canonical(match[1])] = match[2]
    return found


def test_every_direct_pin_is_the_locked_version():
    lock = pins(ROOT / "requirements.lock")
    for name in ("requirements.txt", "requirements-dev.txt", "requirements-llm.txt"):
        direct = pins(ROOT / name)
        assert direct, name
        differ = {p: (v, lock.get(p)) for p, v in direct.items() if lock.get(p) != v}
        assert differ == {}, f"{name} and requirements.lock differ (make lock): {differ}"


def test_the_venv_holds_exactly_what_is_locked():
    lock = pins(ROOT / "requirements.lock")
    installed = {
        canonical(d.metadata["Name"]): d.version
        for d in metadata.distributions()
        if canonical(d.metadata["Name"]) not in NOT_FROZEN
    }
    unlocked = {n: v for n, v in installed.items() if lock.get(n) != v}
    assert unlocked == {}, f"installed but not locked at that version (make lock): {unlocked}"
    missing = sorted(set(lock) - set(installed))
    assert missing == [], f"locked but not installed: {missing}"


def test_both_installs_are_constrained_by_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert makefile.count("-c requirements.lock") == 2
    assert dockerfile.count("-c /tmp/requirements.lock") == 2
    assert "requirements.lock /tmp/" in dockerfile
