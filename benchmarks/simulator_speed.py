"""Simulator speed: simulated expert activations and simulated seconds per wall second, per preset, and the
wall time of a 200-configuration sweep over the bundled traces.

Goals (issue "Simulator"): a 1,000-token decode of Mixtral-8x7B's shape (32 layers, 8 experts, top-2:
64,000 expert activations) under any preset in under 1 s on one core; a 200-configuration sweep over the
bundled traces in under 60 s on this 2-core machine.

The Mixtral trace is synthetic (no Mixtral routing trace is bundled): per-layer expert popularity from
the real Mixtral-8x7B-Instruct frequencies in ../shared/traces-raw/abhibambhaniya__mixtral-offloading-
residency-info (uniform if absent), a token's top-1 expert repeats the previous token's with probability
0.3, and a next-layer guess that is right 80% of the time (so guess-based prefetchers have work to do).

    python benchmarks/simulator_speed.py [--tokens 1000] [--sweep-configs 200] [--jobs 2] [--skip-sweep]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FREQUENCIES = (REPO.parent / "shared" / "traces-raw" / "abhibambhaniya__mixtral-offloading-residency-info" / "src"
               / "expert_frequencies.npy")


def synthetic_mixtral_trace(path: Path, decode_tokens: int, prompt_tokens: int = 16, seed: int = 0) -> Path:
    from moesim.modelspec import load_model_shape
    from moesim.tracer import DECODE, PREFILL, TraceCells, TraceMeta, TraceSource, write_trace

    shape = load_model_shape("mixtral-8x7b")
    L, E, k = shape.num_moe_layers, shape.num_experts, shape.top_k
    rng = np.random.default_rng(seed)
    freq = np.load(FREQUENCIES) if FREQUENCIES.exists() else np.full((L, E), 1.0 / E)
    n_tok = prompt_tokens + decode_tokens
    experts = np.zeros((n_tok, L, k), dtype=np.int16)
    for t in range(n_tok):
        for layer in range(L):
            p = freq[layer] / freq[layer].sum()
            first = experts[t - 1, layer, 0] if (t > 0 and rng.random() < 0.3) else rng.choice(E, p=p)
            q = p.copy()
            q[first] = 0
            second = rng.choice(E, p=q / q.sum())
            experts[t, layer] = (first, second)
    w1 = rng.uniform(0.5, 0.95, size=(n_tok, L))
    weights = np.stack([w1, 1 - w1], axis=2).astype(np.float32)
    guess = np.full((n_tok, L, k), -1, dtype=np.int16)
    for t in range(n_tok):
        for layer in range(L - 1):
            g = experts[t, layer + 1].copy()
            for s in range(k):
                if rng.random() > 0.8:
                    g[s] = rng.choice([e for e in range(E) if e not in g])
            guess[t, layer] = g
    tok = np.repeat(np.arange(n_tok), L)
    lay = np.tile(np.arange(L), n_tok)
    cells = TraceCells(
        request=np.zeros(n_tok * L, np.int32),
        phase=np.where(tok < prompt_tokens, PREFILL, DECODE).astype(np.uint8),
        position=tok.astype(np.int32), layer=lay.astype(np.int16),
        experts=experts.reshape(-1, k), weights=weights.reshape(-1, k),
        next_layer_guess=guess.reshape(-1, k),
    )
    meta = TraceMeta(model=shape, dtype="bfloat16", expert_bytes=tuple([shape.expert_bytes()] * L),
                     non_expert_bytes=shape.non_expert_bytes(),
                     source=TraceSource(kind="synthetic", path="", sha256="",
                                        details={"seed": seed, "generator": "benchmarks/simulator_speed.py"}))
    return write_trace(path, meta, cells)


def bench_presets(trace_path: Path, profile: str, repeats: int) -> None:
    from moesim.simulator.config import SimConfig
    from moesim.simulator.presets import PRESETS, get_preset
    from moesim.simulator.run import load_trace_cached, simulate

    trace = load_trace_cached(trace_path)
    print(f"\n{int((trace.phase == 1).sum()) // trace.meta.num_layers:,}-token decode of Mixtral-8x7B's shape on "
          f"{profile}, bf16 experts, 4 cache slots per layer, memory budget unbounded (speed only); one core")
    print(f"{'preset':26s} {'cold_s':>7s} {'warm_s':>7s} {'activations/s':>14s} {'sim_s/wall_s':>12s} "
          f"{'sim_s':>8s} {'events':>8s}  goal<1s")
    for name in PRESETS.names():
        config = SimConfig(get_preset(name), cache_experts=4, gpu_mem_bytes=1 << 40)
        t0 = time.perf_counter()
        r = simulate(trace, profile, config)
        cold = time.perf_counter() - t0
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            r = simulate(trace, profile, config)
            best = min(best, time.perf_counter() - t0)
        if not r.feasible:
            print(f"{name:26s} does not fit: {r.reason}")
            continue
        activations = sum(trace.phase == 1) * trace.meta.top_k
        print(f"{name:26s} {cold:7.3f} {best:7.3f} {activations / best:14,.0f} {r.makespan_s / best:12.1f} "
              f"{r.makespan_s:8.2f} {r.sim_events:8d}  {'ok' if best < 1.0 else 'MISSED'}")


def bench_sweep(n_configs: int, jobs: int) -> None:
    from moesim.simulator.presets import PRESETS
    from moesim.simulator.sweep import build_grid, run_sweep
    from moesim.traces import bundled_traces

    traces = sorted(bundled_traces())
    policies = PRESETS.names()
    points = build_grid(traces, ["rtx-3060"], policies, [1, 2, 4, 8, 16, 32], [], [None], None, [1])[:n_configs]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        rows = run_sweep(points, Path(tmp), jobs=jobs, progress=False)
        wall = time.perf_counter() - t0
    fit = sum(1 for r in rows if r.get("feasible"))
    print(f"\nsweep: {len(points)} configurations ({len(traces)} bundled traces x {len(policies)} presets x cache "
          f"sizes) on {jobs} worker(s): {wall:.1f} s wall, {fit} simulated, {len(points) - fit} did not fit  "
          f"goal<60s: {'ok' if wall < 60 else 'MISSED'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--profile", default="rtx-4090")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sweep-configs", type=int, default=200)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--skip-sweep", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = synthetic_mixtral_trace(Path(tmp) / "mixtral-synthetic.parquet", args.tokens)
        bench_presets(path, args.profile, args.repeats)
    if not args.skip_sweep:
        bench_sweep(args.sweep_configs, args.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
