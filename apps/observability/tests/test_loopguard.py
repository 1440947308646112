"""The loop guard reports blocking calls and CPU hogs on the event loop, and
nothing else. Run in a subprocess: installing it patches asyncio process-wide."""

import subprocess
import sys
import textwrap

from django.conf import settings

SCRIPT = textwrap.dedent(
    """
    import asyncio, logging, sqlite3, sys, time
    logging.basicConfig(stream=sys.stdout, format="%(message)s")
    from apps.observability import loopguard
    loopguard.install(10)

    async def main():
        loop = asyncio.get_running_loop()
        loop.call_soon(time.sleep, 0.02)                       # a blocking sleep
        loop.call_soon(lambda: sqlite3.connect(":memory:"))    # blocking I/O
        end = time.thread_time() + 0.05
        def spin():
            while time.thread_time() < end:
                pass
        loop.call_soon(spin)                                   # 50 ms of CPU
        await asyncio.sleep(0.01)                              # fine
        await asyncio.get_running_loop().run_in_executor(None, time.sleep, 0.02)  # fine
        await asyncio.sleep(0.05)
        print("blocked", loopguard.blocked_total())

    asyncio.run(main())
    """
)


def test_blocking_calls_and_cpu_hogs_are_reported_and_nothing_else():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=settings.BASE_DIR,
    )
    out = result.stdout
    assert result.returncode == 0, result.stderr
    reports = [line for line in out.splitlines() if line.startswith("loop-guard:")]
    assert len(reports) == 3, out
    assert "time.sleep" in reports[0]
    assert "sqlite3.connect" in reports[1]
    assert "(CPU)" in reports[2]
    assert out.strip().endswith("blocked 3")
