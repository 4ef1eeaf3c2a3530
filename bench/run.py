"""Run every benchmark module side by side with its baseline and print one table of ratios."""

from __future__ import annotations

import importlib
import sys
import time
import traceback

MODULES = ["bench.bench_tfs", "bench.bench_worker", "bench.bench_operator", "bench.bench_jobs", "bench.bench_keda"]


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return "" if value is None else str(value)


def main(argv: list[str] | None = None) -> int:
    selected = (argv if argv is not None else sys.argv[1:]) or MODULES
    rows: list[dict] = []
    failed = []
    for name in selected:
        name = name if name.startswith("bench.") else f"bench.{name}"
        started = time.monotonic()
        print(f"== {name} ...", flush=True)
        try:
            rows.extend(importlib.import_module(name).run())
        except Exception:  # noqa: BLE001 - one broken benchmark must not hide the others
            traceback.print_exc()
            failed.append(name)
        print(f"   done in {time.monotonic() - started:.1f}s", flush=True)
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="kiosk-operator benchmarks (baseline vs ours, one run)")
        for col in ("benchmark", "baseline", "ours", "unit", "ratio", "note"):
            table.add_column(col, justify="right" if col in ("baseline", "ours", "ratio") else "left")
        for row in rows:
            table.add_row(*(_fmt(row.get(k)) for k in ("name", "baseline", "ours", "unit", "ratio", "note")))
        Console(width=160).print(table)
    except ImportError:
        for row in rows:
            print(" | ".join(_fmt(row.get(k)) for k in ("name", "baseline", "ours", "unit", "ratio", "note")))
    if failed:
        print("benchmarks that failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
