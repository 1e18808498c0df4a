"""Simulator speed: the figures of issue #14, measured side by side in one run.

1. A plain-Python reference replay of per-layer LRU (written here: the trace's rows grouped into forward steps,
   an OrderedDict per layer, the cost tables' seconds summed in the engine's order) against warm
   ``moesim simulate`` on the bundled Qwen3 trace; the reference's latency sum must equal ``lru --transfer
   sync``'s makespan (goal: warm ``lru`` within 2x of the reference).
2. Every preset on a 1,000-token decode of Mixtral-8x7B's shape (32 layers, 8 experts, top-2: 64,000 expert
   activations): the SimPy engine (clocked lanes; ``compiled=False``; ``--events`` adds the engine with an event
   per copy) against the default path, which is the compiled replay (``simulator/kernel.py``) for the presets it
   covers (the ``path`` column says which ran), warm, on one core (goals: < 0.2 s and >= 1M activations/s).
3. Peak memory (a child process's VmHWM, Linux) of simulating a ``moesim trace synth`` trace of N activations
   (goal: 32M activations under 4 GiB; the default N is smaller and 32M is extrapolated from N and N/2, see
   --memory-activations).
4. ``moesim --help`` wall time (goal < 0.2 s), and optionally a 200-configuration sweep.

The Mixtral trace is synthetic (no Mixtral routing trace is bundled): per-layer expert popularity from
the real Mixtral-8x7B-Instruct frequencies in ../shared/traces-raw/abhibambhaniya__mixtral-offloading-
residency-info (uniform if absent), a token's top-1 expert repeats the previous token's with probability
0.3, and a next-layer guess that is right 80% of the time (so guess-based prefetchers have work to do).

    python benchmarks/simulator_speed.py [--tokens 1000] [--memory-activations N] [--events] [--sweep]
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


def best_of(repeats: int, run) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = run()
        best = min(best, time.perf_counter() - t0)
    return best, out


def reference_lru_replay(trace, costs, capacity: int) -> tuple[float, int, int]:
    """Per-layer LRU replayed in plain Python with the engine's timing of ``lru --transfer sync`` (copies on the
    compute stream, so a forward pass is one sum): returns (latency sum, decode hits, decode accesses).
    Batch 1, no gating: each request's prompt is one forward pass, each decode token another."""
    from collections import OrderedDict

    from moesim.tracer import PREFILL

    c = trace.cells
    L, k = trace.meta.num_layers, trace.meta.top_k
    request, phase, position, layer_of = (c.request.tolist(), c.phase.tolist(), c.position.tolist(),
                                          c.layer.tolist())
    experts = c.experts.tolist()
    gpu, copy_in, head = costs.gpu_expert, costs.h2d_pageable_by_layer, costs.head
    lo, dense, step_overhead = costs.layer_overhead_s, costs.dense_layers, costs.step_overhead_s
    resident = [OrderedDict() for _ in range(L)]
    now = 0.0
    hits = accesses = 0

    def forward(layers: list, ne: float, head_s: float, decode: bool) -> float:
        nonlocal hits, accesses
        pending = step_overhead + head_s + dense * ne
        attention = ne + lo
        for layer in range(L):
            pending += attention
            used = layers[layer]
            if used is None:
                continue
            order = list(used)
            cache = resident[layer]
            for i, e in enumerate(order):
                if e in cache:
                    cache.move_to_end(e)
                    hits += decode
                else:
                    if len(cache) >= capacity:
                        later = order[i + 1:]
                        victim = next((x for x in cache if x not in later), None)
                        if victim is not None:
                            del cache[victim]
                    if len(cache) < capacity:
                        cache[e] = None
                    pending += copy_in[layer]
            accesses += decode * len(order)
            for e in order:
                pending += gpu[used[e]]
        return pending

    n, i = len(request), 0
    while i < n:
        r = request[i]
        prompt: list = [None] * L
        positions = set()
        while i < n and request[i] == r and phase[i] == PREFILL:
            used = prompt[layer_of[i]] = prompt[layer_of[i]] or {}
            for e in experts[i][:k]:
                used[e] = used.pop(e, 0) + 1  # the order of last use, as the compiled workload's
            positions.add(position[i])
            i += 1
        P = max(len(positions), 1)
        now += forward(prompt, costs.prefill_non_expert[P], head[1], False)
        j = 0
        while i < n and request[i] == r:
            pos = position[i]
            step: list = [None] * L
            while i < n and request[i] == r and position[i] == pos:
                used = step[layer_of[i]] = step[layer_of[i]] or {}
                for e in experts[i][:k]:
                    used[e] = used.pop(e, 0) + 1
                i += 1
            j += 1
            now += forward(step, costs.decode_non_expert[1][P + j], head[1], True)
    return now, hits, accesses


def bench_reference(profile: str, capacity: int, repeats: int) -> None:
    from moesim.simulator.cli import build_policy
    from moesim.simulator.config import SimConfig
    from moesim.simulator.run import build_policy_objects, load_trace_cached, prepare, replay_path, simulate
    from moesim.simulator.run import load_profile_cached
    from moesim.traces import bundled_traces

    trace = load_trace_cached(bundled_traces()["qwen3-30b-a3b-bigmoeonedge"])
    sync = SimConfig(build_policy("lru", transfer="sync"), cache_experts=capacity, gpu_mem_bytes=1 << 40)
    stream = SimConfig(build_policy("lru"), cache_experts=capacity, gpu_mem_bytes=1 << 40)
    costs = build_policy_objects(prepare(trace, load_profile_cached(profile), sync)).costs
    activations = int((trace.phase == 1).sum()) * trace.meta.top_k
    ref_s, (ref_latency, hits, accesses) = best_of(repeats, lambda: reference_lru_replay(trace, costs, capacity))
    simulate(trace, profile, sync)
    simulate(trace, profile, stream)  # warm: trace read, workload compiled, cost tables built
    sync_s, r_sync = best_of(repeats, lambda: simulate(trace, profile, sync))
    stream_s, r_stream = best_of(repeats, lambda: simulate(trace, profile, stream))
    print(f"\n1. reference LRU replay vs warm `moesim simulate` on qwen3-30b-a3b-bigmoeonedge ({activations:,} decode "
          f"activations), {profile}, {capacity} slots per layer")
    print(f"   reference (plain Python)   {ref_s:7.3f} s  latency sum {ref_latency:.9f} s  hit rate "
          f"{hits / accesses:.4f}")
    print(f"   simulate lru --transfer sync {sync_s:5.3f} s  makespan    {r_sync.makespan_s:.9f} s  hit rate "
          f"{r_sync.hit_rate:.4f}  (relative difference {abs(r_sync.makespan_s - ref_latency) / ref_latency:.1e})")
    print(f"   simulate lru (copy stream)  {stream_s:6.3f} s")
    prep = prepare(trace, load_profile_cached(profile), stream)
    print(f"   ratio warm lru / reference: {stream_s / ref_s:.2f}x (sync {sync_s / ref_s:.2f}x)  goal <= 2x: "
          f"{'ok' if stream_s <= 2 * ref_s else 'MISSED'}  (path: {replay_path(prep, build_policy_objects(prep))})")


def bench_presets(trace_path: Path, profile: str, repeats: int, with_events: bool) -> None:
    from moesim.simulator.config import SimConfig
    from moesim.simulator.presets import PRESETS, get_preset
    from moesim.simulator.run import build_policy_objects, load_profile_cached, load_trace_cached, prepare
    from moesim.simulator.run import replay_path, simulate

    trace = load_trace_cached(trace_path)
    activations = int((trace.phase == 1).sum()) * trace.meta.top_k
    print(f"\n2. {int((trace.phase == 1).sum()) // trace.meta.num_layers:,}-token decode of Mixtral-8x7B's shape "
          f"({activations:,} decode activations) on {profile}, bf16 experts, 4 cache slots per layer, memory budget "
          f"unbounded (speed only); one core, warm, best of {repeats}")
    print("   engine_s: the SimPy engine with clocked lanes (before); fast_s: the default path (after), which is the "
          "compiled replay where `path` says so")
    print(f"   {'preset':26s} {'path':9s} {'events_s':>8s} {'engine_s':>8s} {'fast_s':>7s} {'speed-up':>8s} "
          f"{'activations/s':>13s} {'sim_s':>8s}  goals <0.2s, >=1M/s")
    for name in PRESETS.names():
        config = SimConfig(get_preset(name), cache_experts=4, gpu_mem_bytes=1 << 40)
        r = simulate(trace, profile, config)
        if not r.feasible:
            print(f"   {name:26s} does not fit: {r.reason}")
            continue
        prep = prepare(trace, load_profile_cached(profile), config)
        path = replay_path(prep, build_policy_objects(prep))
        events = "-"
        if with_events:
            events = f"{best_of(repeats, lambda: simulate(trace, profile, config, exact_events=True))[0]:8.3f}"
        old_s, old = best_of(repeats, lambda: simulate(trace, profile, config, compiled=False))
        fast_s, fast = best_of(repeats, lambda: simulate(trace, profile, config))
        same = old.makespan_s == fast.makespan_s and old.hit_rate == fast.hit_rate
        rate = activations / fast_s
        print(f"   {name:26s} {path.split(':')[0]:9s} {events:>8s} {old_s:8.3f} {fast_s:7.3f} {old_s / fast_s:7.1f}x "
              f"{rate:13,.0f} {r.makespan_s:8.2f}  {'ok' if fast_s < 0.2 else 'MISSED'} "
              f"{'ok' if rate >= 1e6 else 'MISSED'}{'' if same else '  DIFFERENT RESULT'}"
              f"{'' if path == 'compiled' else '  (' + path.split(': ', 1)[1] + ')'}")


# The peak is the process's own VmHWM: ru_maxrss would carry over the benchmark's own peak through fork and exec.
MEMORY_CHILD = """
import sys, time
from moesim.simulator.config import SimConfig
from moesim.simulator.presets import get_preset
from moesim.simulator.run import simulate
def high_water():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
base = high_water()
t0 = time.perf_counter()
r = simulate(sys.argv[1], "rtx-4090", SimConfig(get_preset("lru"), cache_experts=4, gpu_mem_bytes=1 << 40))
print(time.perf_counter() - t0, high_water(), base, r.hit_rate)
"""


def _peak_of_simulate(activations: int, tmp: Path) -> tuple[int, float, int, int]:
    """(decode activations, wall s, peak RSS, RSS after imports) of one simulate of a synthetic Mixtral trace of
    about ``activations`` in a fresh process, its compiled-workload disk cache empty (the compile is in the run)."""
    import subprocess

    output = 500
    requests = max(1, round(activations / (output * 32 * 2)))
    trace = tmp / f"mixtral-{requests}x{output}.parquet"
    env = dict(os.environ, MOESIM_CACHE_DIR=str(tmp / f"cache-{requests}"))
    subprocess.run([sys.executable, "-m", "moesim.cli", "trace", "synth", "--routing", "mixtral-8x7b-published",
                    "--requests", str(requests), "--prompt-len", "16", "--output-len", str(output), "--out",
                    str(trace)], check=True, capture_output=True, env=env)
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(trace)], check=True, capture_output=True,
                         text=True, env=env).stdout.split()
    return requests * output * 32 * 2, float(out[0]), int(out[1]), int(out[2])


def bench_memory(activations: int, tmp: Path) -> None:
    """Peak RSS of ``simulate`` at ``activations`` and at half of it; below 32M, the goal's size is extrapolated
    along the slope between the two (bytes per further activation: a line through one size and the imports
    would count the fixed costs, numba's and the cost tables', as if they grew with the trace)."""
    n, wall, rss, base = _peak_of_simulate(activations, tmp)
    line = (f"{n:,} decode activations, compiled in the run: {rss / 2**30:.2f} GiB peak RSS ({base / 2**30:.2f} GiB "
            f"after imports), {wall:.1f} s")
    if n < 32_000_000:
        n0, _, rss0, _ = _peak_of_simulate(activations // 2, tmp)
        slope = (rss - rss0) / max(n - n0, 1)
        line += (f"; at {n0:,}: {rss0 / 2**30:.2f} GiB; {slope:.0f} bytes per further activation, so 32M: "
                 f"{(rss + slope * (32e6 - n)) / 2**30:.1f} GiB, extrapolated (measured directly with "
                 f"--memory-activations 32000000, ~8 min)")
    print(f"\n3. peak memory: lru on synthetic Mixtral traces of 500-token requests: {line}  goal 32M < 4 GiB")


def bench_help(repeats: int = 5) -> None:
    import subprocess

    moesim = Path(sys.executable).with_name("moesim")
    cmd = [str(moesim), "--help"] if moesim.exists() else [sys.executable, "-m", "moesim.cli", "--help"]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        best = min(best, time.perf_counter() - t0)
    print(f"\n4. `moesim --help`: {best:.3f} s (best of {repeats})  goal < 0.2 s: {'ok' if best < 0.2 else 'MISSED'}")


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
    print(f"\n5. sweep: {len(points)} configurations ({len(traces)} bundled traces x {len(policies)} presets x cache "
          f"sizes) on {jobs} worker(s): {wall:.1f} s wall, {fit} simulated, {len(points) - fit} did not fit")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--profile", default="rtx-4090")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reference-slots", type=int, default=32, help="LRU slots per layer for part 1")
    ap.add_argument("--memory-activations", type=int, default=2_000_000,
                    help="decode activations of part 3's synthetic trace (the goal is stated at 32,000,000)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--events", action="store_true", help="also time part 2 on the engine with an event per copy")
    ap.add_argument("--sweep", action="store_true", help="also time a 200-configuration sweep")
    ap.add_argument("--sweep-configs", type=int, default=200)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    bench_reference(args.profile, args.reference_slots, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        path = synthetic_mixtral_trace(Path(tmp) / "mixtral-synthetic.parquet", args.tokens)
        bench_presets(path, args.profile, args.repeats, args.events)
        if not args.skip_memory:
            bench_memory(args.memory_activations, Path(tmp))
    bench_help()
    if args.sweep:
        bench_sweep(args.sweep_configs, args.jobs)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
