"""The offline reply model alone: `python -m benchmarks.llm` (make bench BENCH=llm).

SmolLM2-135M-Instruct through apps/pipeline/llamacpp.py, in this process: for 1 and 2
threads, quiet and beside one busy core (a process spinning, as STT or TTS would keep
it), the tokens per second and CPU milliseconds a token of a 60-token reply; then the
first token after prompts of three lengths (what the prompt costs), and the RSS. Prints
a table, writes docs/benchmarks/llm.json."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OUT = ROOT / "docs" / "benchmarks" / "llm.json"
CHAT = [
    {"role": "system", "content": "You are Captain Rex, a jolly pirate."},
    {"role": "user", "content": "Tell me about the sea."},
]


def spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def reply_cost(model, repeats: int) -> dict:
    from apps.pipeline.llamacpp import Generation

    tokens = wall = cpu = 0.0
    for _ in range(repeats):
        result = Generation()
        started, cpu_started = time.perf_counter(), time.process_time()
        for _piece in model.generate(CHAT, max_tokens=60, result=result):
            pass
        wall += time.perf_counter() - started
        cpu += time.process_time() - cpu_started
        tokens += result.completion_tokens
    return {
        "tokens_per_s": round(tokens / wall, 1),
        "cpu_ms_per_token": round(1000 * cpu / tokens, 1),
    }


def first_token_ms(model, words: int) -> tuple[int, int]:
    from apps.pipeline.llamacpp import Generation

    model.kept.clear()  # nothing reused
    model.lib.llama_kv_self_clear(model.context)
    chat = [{"role": "user", "content": "hello there " * (words // 2)}]
    result = Generation()
    started = time.perf_counter()
    for _piece in model.generate(chat, max_tokens=1, result=result):
        break
    return result.prompt_tokens, round(1000 * (time.perf_counter() - started))


def run(repeats: int) -> dict:
    from apps.pipeline.llamacpp import LocalModel

    rows = []
    for threads in (1, 2):
        model = LocalModel(threads=threads)
        quiet = reply_cost(model, repeats)
        busy = multiprocessing.Process(target=spin, args=(600,), daemon=True)
        busy.start()
        try:
            beside = reply_cost(model, repeats)
        finally:
            busy.terminate()
            busy.join()
        prompts = [first_token_ms(model, words) for words in (10, 150, 400)]
        rows.append({"threads": threads, "quiet": quiet, "beside_a_busy_core": beside,
                     "first_token_ms_by_prompt_tokens": prompts})  # fmt: skip
    return {
        "benchmark": "llm",
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python -m benchmarks.llm " + " ".join(sys.argv[1:]),
        "rows": rows,
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def table(report: dict) -> str:
    lines = ["| threads | tokens/s | CPU ms/token | beside a busy core: tokens/s | CPU ms/token "
             "| first token ms (prompt tokens) |", "|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for row in report["rows"]:
        prompts = ", ".join(f"{ms} ({n})" for n, ms in row["first_token_ms_by_prompt_tokens"])
        lines.append(
            f"| {row['threads']} | {row['quiet']['tokens_per_s']} | "
            f"{row['quiet']['cpu_ms_per_token']} | {row['beside_a_busy_core']['tokens_per_s']} | "
            f"{row['beside_a_busy_core']['cpu_ms_per_token']} | {prompts} |"
        )
    lines.append(f"\nmax RSS {report['max_rss_mb']} MB (both models loaded)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    report = run(args.repeats)
    print(table(report))
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
