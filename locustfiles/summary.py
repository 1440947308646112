"""The table `make loadtest` prints, from Locust's `<prefix>_stats.csv`:
per request type and name, the count, failures, p50 and p95 (ms).

    python -m locustfiles.summary reports/loadtest/loadtest_stats.csv

Exits 1 when any request failed or none was made. Locust's percentiles are
approximate: above 100 ms it keeps two significant digits (1234 ms → 1200).
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path

COLUMNS = ("Type", "Name", "Request Count", "Failure Count", "50%", "95%")


class SummaryError(ValueError):
    pass


@dataclass(frozen=True)
class Row:
    type: str
    name: str
    count: int
    failures: int
    p50: str
    p95: str


def rows_read(path: Path) -> list[Row]:
    """Every row of a Locust stats CSV by type and name, the Aggregated one last."""
    try:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise SummaryError(f"{path} is not a Locust stats CSV: no {', '.join(missing)}")
            rows = [
                Row(
                    r["Type"],
                    r["Name"],
                    int(r["Request Count"]),
                    int(r["Failure Count"]),
                    r["50%"],
                    r["95%"],
                )
                for r in reader
            ]
    except FileNotFoundError:
        raise SummaryError(f"no Locust stats CSV at {path}") from None
    except ValueError as exc:
        if isinstance(exc, SummaryError):
            raise
        raise SummaryError(f"{path}: {exc}") from None
    return sorted(rows, key=lambda r: (r.name == "Aggregated", r.type, r.name))


def table(rows: list[Row]) -> str:
    header = ("type", "name", "count", "failures", "p50 ms", "p95 ms")
    body = [(r.type or "", r.name, str(r.count), str(r.failures), r.p50, r.p95) for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells) -> str:
        return "  ".join(
            cell.ljust(width) if i < 2 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(header), rule, *(line(cells) for cells in body)])


def failed(rows: list[Row]) -> str:
    """Why the run failed ("" when it did not): a failure, or no request at all."""
    total = next((r for r in rows if r.name == "Aggregated"), None)
    requests = total.count if total else sum(r.count for r in rows)
    failures = total.failures if total else sum(r.failures for r in rows)
    if not requests:
        return "no request was made"
    if failures:
        return f"{failures} of {requests} requests failed"
    return ""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m locustfiles.summary <prefix>_stats.csv", file=sys.stderr)
        return 2
    try:
        rows = rows_read(Path(args[0]))
    except SummaryError as exc:
        print(f"summary: {exc}", file=sys.stderr)
        return 2
    print(table(rows))
    why = failed(rows)
    if why:
        print(f"\nFAILED: {why} (see {args[0].replace('_stats.csv', '_failures.csv')})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
