"""Sweep scaling: the same 200-configuration grid with 1 worker and with N workers (default 2), each into a
fresh results folder, checking that the tables are byte-identical and printing the speed-up.

Goal (issue #14): at least 1.8x with 2 workers on an idle 2-core machine. Timings are noisy when other
processes share the cores, so the load average is printed with the figures, and the runs alternate
(1, N, 1, N, ...) so that a change in load hits both sides alike.

The machine's own ceiling is printed last (``--ceiling-rounds``, 0 to skip): N copies of one CPU-bound job
(pure Python, then numpy) started at once against one copy alone, alternating. A virtual machine whose cores
slow down when all are busy (shared turbo budget, host SMT siblings, memory bandwidth) caps every parallel
speed-up there, the sweep's included.

    python benchmarks/sweep_scaling.py [--configs 200] [--jobs 2] [--repeats 1] [--executor ray] [--ceiling-rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path


def grid(n_configs: int):
    from moesim.simulator.presets import PRESETS
    from moesim.simulator.sweep import build_grid
    from moesim.traces import bundled_traces

    traces = sorted(bundled_traces())
    return build_grid(traces, ["rtx-3060"], PRESETS.names(), [1, 2, 4, 8, 16, 32], [], [None], None, [1])[:n_configs]


def timed_sweep(points, out: Path, jobs: int, executor: str) -> tuple[float, float, bytes, bytes]:
    """Wall seconds of one sweep into the fresh folder ``out`` (run in a fresh process, so no memo of an
    earlier run helps it), the CPU seconds of that process and its workers, and its Parquet and CSV bytes.

    The CPU seconds do not depend on the load: equal totals for 1 and N workers mean no work is repeated
    per worker, so on idle cores the wall time divides by N up to the serial part."""
    import resource
    import subprocess

    code = ("import sys, time, json; from pathlib import Path; sys.path.insert(0, %r); "
            "from sweep_scaling import grid; from moesim.simulator.sweep import run_sweep, write_tables; "
            "pts = grid(%d); t0 = time.perf_counter(); "
            "kw = {} if %r == 'local' else {'executor': %r}; "
            "rows = run_sweep(pts, Path(%r), jobs=%d, progress=False, **kw); "
            "wall = time.perf_counter() - t0; write_tables(rows, Path(%r)); print(wall)"
            % (str(Path(__file__).parent), len(points), executor, executor, str(out), jobs, str(out)))
    env = dict(os.environ, MOESIM_CACHE_DIR=str(out / "cache"))  # a cold on-disk cache for every run
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"sweep with {jobs} worker(s) failed:\n{proc.stderr}")
    wall = float(proc.stdout.strip().splitlines()[-1])
    return wall, cpu, (out / "sweep.parquet").read_bytes(), (out / "sweep.csv").read_bytes()


CEILING_JOBS = {
    "pure Python": "s = 0\nfor i in range(12_000_000):\n    s += i * i % 7",
    "numpy": "import numpy as np\na = np.random.default_rng(0).random(4_000_000)\n"
             "for _ in range(40):\n    b = np.sort(a[::-1] + 1.0)",
}


def machine_ceiling(jobs: int, rounds: int) -> None:
    """Print how much faster ``jobs`` copies of one CPU-bound job finish together than one after another."""
    import subprocess
    import time

    def wall(code: str, copies: int) -> float:
        t0 = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(copies)]
        for p in procs:
            p.wait()
        return time.perf_counter() - t0

    print(f"this machine's ceiling: {jobs} copies of a CPU-bound job at once vs 1 ({rounds} alternating rounds)")
    for name, code in CEILING_JOBS.items():
        ratios = sorted(jobs * wall(code, 1) / wall(code, jobs) for _ in range(rounds))
        print(f"  {name:<12} throughput {jobs} vs 1: median {statistics.median(ratios):.2f}x, "
              f"range {ratios[0]:.2f}-{ratios[-1]:.2f}x")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--configs", type=int, default=200)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--executor", default="local", help="executor of the N-worker side (local or ray)")
    ap.add_argument("--ceiling-rounds", type=int, default=5, help="rounds of the machine's own ceiling (0: skip)")
    args = ap.parse_args(argv)
    points = grid(args.configs)
    print(f"{len(points)} configurations; load average before: {os.getloadavg()[0]:.2f} "
          f"(cores: {os.cpu_count()})")
    one, many = [], []
    with tempfile.TemporaryDirectory() as tmp:
        ref = None
        for r in range(args.repeats):
            for jobs, executor, walls in ((1, "local", one), (args.jobs, args.executor, many)):
                out = Path(tmp) / f"r{r}-j{jobs}-{executor}"
                wall, cpu, parquet, csv = timed_sweep(points, out, jobs, executor)
                walls.append(wall)
                if ref is None:
                    ref = (parquet, csv)
                elif (parquet, csv) != ref:
                    which = " and ".join(n for n, a, b in (("parquet", parquet, ref[0]), ("csv", csv, ref[1])) if a != b)
                    print(f"tables differ ({which}): {jobs} worker(s), {executor}, repeat {r}")
                    return 1
                print(f"  {jobs} worker(s) ({executor}): {wall:6.1f} s wall, {cpu:6.1f} CPU s (all processes)   "
                      f"load average {os.getloadavg()[0]:.2f}")
    best1, bestn = min(one), min(many)
    paired = sorted(a / b for a, b in zip(one, many))
    print(f"tables byte-identical across {2 * args.repeats} runs")
    print(f"speed-up {args.jobs} workers ({args.executor}) vs 1: {best1 / bestn:.2f}x "
          f"(best of {args.repeats}: {best1:.1f} s vs {bestn:.1f} s; goal >= 1.8x on an idle 2-core machine)")
    # a shared machine's speed drifts between runs (the same work's CPU time moves by 10-20%), so each 1-worker
    # run is also set against the N-worker run right after it
    print(f"  run by run: median {statistics.median(paired):.2f}x, range {paired[0]:.2f}-{paired[-1]:.2f}x")
    if args.ceiling_rounds > 0:
        machine_ceiling(args.jobs, args.ceiling_rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
