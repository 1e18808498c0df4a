"""Regenerate the bundled traces from the raw BigMoeOnEdge route CSVs.

Run from the repository root, with the shared data beside it (``../shared/traces-raw``):

    python traces/convert_bundled.py            # rewrite traces/*.parquet
    python traces/convert_bundled.py --check    # convert again and compare with the bundled files

Each trace is exactly what this command writes (run from the repository root):

    moesim trace import --format llama-route-csv \\
        ../shared/traces-raw/Helldez__BigMoeOnEdge/docs/bench-data/2026-07-15-route-trace/<tag>.route.csv \\
        --engine-cache-budget <budget> --out traces/<name>.parquet

The cache budgets are those of the source's PROVENANCE.md (they are not in the CSVs).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RAW = Path("..") / "shared" / "traces-raw" / "Helldez__BigMoeOnEdge" / "docs" / "bench-data" / "2026-07-15-route-trace"

# bundled name, source CSV, the engine's expert-cache budget in that run
BUNDLED = (
    ("qwen3-30b-a3b-bigmoeonedge", "qwen.route.csv", "4000MiB"),
    ("gemma-4-26b-a4b-bigmoeonedge", "gemma.route.csv", "4000MiB"),
    ("gpt-oss-120b-bigmoeonedge", "gptoss.route.csv", "3000MiB"),
)
COLUMNS = ("request", "phase", "position", "layer", "experts", "weights", "recorded_hit")


def command(name: str, csv_name: str, budget: str) -> list[str]:
    return ["trace", "import", "--format", "llama-route-csv", str(RAW / csv_name), "--engine-cache-budget", budget,
            "--out", str(Path("traces") / f"{name}.parquet")]


def convert() -> int:
    from moesim.cli import cli

    for name, csv_name, budget in BUNDLED:
        args = command(name, csv_name, budget)
        print("moesim " + " ".join(args), flush=True)
        rc = cli.main(args=args, prog_name="moesim", standalone_mode=False)
        if rc:
            return int(rc)
    return 0


def check() -> int:
    """Convert again in memory; report any bundled trace whose rows or metadata differ (creation time aside)."""
    from moesim.tracer import read_trace
    from moesim.tracer.importers import ImportOptions, import_trace
    from moesim.units import parse_bytes

    failed = 0
    for name, csv_name, budget in BUNDLED:
        fresh = import_trace("llama-route-csv", RAW / csv_name, ImportOptions(engine_cache_budget=parse_bytes(budget)))
        bundled = read_trace(Path("traces") / f"{name}.parquet")
        same_rows = all(np.array_equal(getattr(bundled.cells, c), getattr(fresh.cells, c)) for c in COLUMNS)
        a, b = bundled.meta, fresh.meta
        same_meta = (a.model, a.dtype, a.expert_bytes, a.non_expert_bytes, a.source, a.recorded_engine) == \
                    (b.model, b.dtype, b.expert_bytes, b.non_expert_bytes, b.source, b.recorded_engine)
        print(f"{name}: {'ok' if same_rows and same_meta else 'DIFFERS'} ({len(bundled)} rows)")
        failed += not (same_rows and same_meta)
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare a fresh conversion with the bundled files")
    args = parser.parse_args()
    os.chdir(REPO)  # the recorded source paths are relative to the repository root
    if not RAW.is_dir():
        print(f"{RAW}: not found (the shared data must sit beside the repository)", file=sys.stderr)
        return 2
    if args.check:
        return check()
    return convert()


if __name__ == "__main__":
    sys.exit(main())
