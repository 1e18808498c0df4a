"""Cost model and search figures (the issue's "done when"), measured in one run.

1. Accuracy on configurations never used in fitting: the test plan (its own seed; any configuration that
   is also in the fit plan is dropped) over every bundled trace x profile x preset, simulated; MAPE of
   TPOT, TTFT and peak GPU memory for the bundled artifact, and for the backbone alone. Also how it carries
   over: the correction refitted without one profile (or one trace) and scored on that profile's (trace's)
   test configurations.
2. Speed: predicting 10,000 configurations (after the per-(trace, profile) tables are built, timed apart).
3. Search on bundled cases: the configuration ``search`` returns against the exhaustive-simulation optimum
   of the same space, and the share of the space it simulated.
4. An impossible constraint (nothing fits in 1 GiB): what search says.

Simulator runs are cached under ``$MOESIM_CACHE_DIR/costmodel`` (default ~/.cache/moesim), so a rerun is quick.

    python benchmarks/costmodel_accuracy.py [--jobs N] [--skip-search]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import numpy as np


def _mape(pred, true) -> float:
    pred, true = np.asarray(pred, dtype=float), np.asarray(true, dtype=float)
    return float(np.mean(np.abs(pred / true - 1.0)))


def accuracy(jobs: int) -> None:
    from moesim.calib.profile import bundled_profiles
    from moesim.costmodel.dataset import make_plan, run_plan
    from moesim.costmodel.fit import DEFAULT_PER_PRESET, DEFAULT_SEED, TEST_SEED, collect, fit_model
    from moesim.costmodel.model import CostModel
    from moesim.simulator.presets import PRESETS
    from moesim.traces import bundled_traces

    model = CostModel.load()
    stale = model.stale_reasons()
    print(f"cost model: {model.path}")
    print("  status: " + ("up to date" if not stale else "STALE: " + "; ".join(stale)))
    traces = sorted(bundled_traces())
    profiles = sorted(bundled_profiles())
    presets = list(PRESETS.names())
    s = model.meta.get("sampling", {})
    per, seed = s.get("per_preset", DEFAULT_PER_PRESET), s.get("seed", DEFAULT_SEED)
    t0 = time.perf_counter()
    fit_plans = make_plan(traces, profiles, presets, per, seed)
    fit_keys = {(g.trace, g.profile): set(g.configs.rows()) for g in fit_plans}
    test_plans = make_plan(traces, profiles, presets, 1, TEST_SEED, exclude=fit_keys)
    log = lambda m: print(f"  [{time.perf_counter() - t0:6.1f}s] {m}", file=sys.stderr)  # noqa: E731
    fit_runs = run_plan(fit_plans, jobs=jobs, log=log)
    test_runs = run_plan(test_plans, jobs=jobs, log=log)
    fit = collect(fit_runs)
    test = collect(test_runs)
    print(f"\n1. Accuracy on {len(test)} configurations never used in fitting "
          f"({len(traces)} traces x {len(profiles)} profiles x {len(presets)} presets; fitted on {len(fit)} runs)")
    # the artifact's predictions for the test configurations
    pred = {"tpot": np.empty(len(test)), "ttft": np.empty(len(test))}
    for t in ("tpot", "ttft"):
        pred[t] = test.backbone[t] * np.exp(model.corrections[t].predict(test.X))
    mem_err = _mape(test.peak_predicted, test.peak_simulated)
    print(f"   {'':24} {'TPOT MAPE':>10} {'TTFT MAPE':>10} {'memory MAPE':>12}   (bars: 5%, 10%, 2%)")
    print(f"   {'backbone alone':24} {100 * _mape(test.backbone['tpot'], test.simulated['tpot']):9.2f}% "
          f"{100 * _mape(test.backbone['ttft'], test.simulated['ttft']):9.2f}% {100 * mem_err:11.3f}%")
    print(f"   {'backbone x correction':24} {100 * _mape(pred['tpot'], test.simulated['tpot']):9.2f}% "
          f"{100 * _mape(pred['ttft'], test.simulated['ttft']):9.2f}% {100 * mem_err:11.3f}%  <- the artifact "
          f"({model.meta.get('chosen', {}).get('tpot')}/{model.meta.get('chosen', {}).get('ttft')})")
    err_t = np.abs(pred["tpot"] / test.simulated["tpot"] - 1)
    err_f = np.abs(pred["ttft"] / test.simulated["ttft"] - 1)
    print(f"   TPOT error p50 {100 * np.median(err_t):.2f}%, p95 {100 * np.percentile(err_t, 95):.2f}%, "
          f"max {100 * err_t.max():.1f}%; TTFT p95 {100 * np.percentile(err_f, 95):.2f}%, max {100 * err_f.max():.1f}%")
    print("   memory is the simulator's own arithmetic (simulator/memory.py), so its error is zero by construction")
    cv = model.meta.get("cross_validation_mape")
    if cv:
        print("   the artifact's correction was chosen by 5-fold cross-validation on the fit runs (MAPE): "
              + "; ".join(f"{t}: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in cv[t].items()) for t in cv))
    for label, key in (("trace", test.trace), ("profile", test.profile), ("preset", test.policy)):
        print(f"   by {label}:")
        for name in sorted(set(key.tolist())):
            m = key == name
            print(f"     {name:30} n={int(m.sum()):3d}  TPOT {100 * _mape(pred['tpot'][m], test.simulated['tpot'][m]):6.2f}%"
                  f"  TTFT {100 * _mape(pred['ttft'][m], test.simulated['ttft'][m]):6.2f}%")

    print("\n   carry-over (correction refitted without the held-out profile or trace; scored on its test runs):")
    choice = model.meta.get("chosen", {"tpot": "gbm", "ttft": "gbm"})
    rows = []
    for label, fkey, tkey, names in (("profile", fit.profile, test.profile, profiles), ("trace", fit.trace, test.trace,
                                                                                        traces)):
        for name in names:
            sub = fit.take(np.flatnonzero(fkey != name))
            m = np.flatnonzero(tkey == name)
            held = test.take(m)
            cm = fit_model(sub, choice)
            e = {t: _mape(held.backbone[t] * np.exp(cm.corrections[t].predict(held.X)), held.simulated[t])
                 for t in ("tpot", "ttft")}
            rows.append((label, name, len(m), e["tpot"], e["ttft"]))
            print(f"     without {label} {name:28} n={len(m):3d}  TPOT {100 * e['tpot']:6.2f}%  TTFT {100 * e['ttft']:6.2f}%")
    worst = max(rows, key=lambda r: r[3])
    print(f"   worst held-out group: {worst[0]} {worst[1]}, TPOT {100 * worst[3]:.2f}%")


def speed() -> None:
    from moesim.costmodel.context import TraceProfileContext
    from moesim.costmodel.model import CostModel
    from moesim.costmodel.search import build_space, default_space

    model = CostModel.load()
    ctx = TraceProfileContext("qwen3-30b-a3b-bigmoeonedge", "rtx-3060")
    space = build_space(default_space(ctx), ctx.E)
    t0 = time.perf_counter()
    model.predict(ctx, space)
    tables = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    times = []
    for _ in range(5):
        sub = space.take(np.sort(rng.choice(len(space), 10_000, replace=False)))
        t0 = time.perf_counter()
        model.predict(ctx, sub)
        times.append(time.perf_counter() - t0)
    print(f"\n2. Speed (qwen3-30b-a3b on rtx-3060, search space of {len(space):,} configurations)")
    print(f"   per-(trace, profile) tables, built once: {tables:.2f} s")
    print(f"   predicting 10,000 configurations: median {statistics.median(times):.3f} s, best {min(times):.3f} s "
          f"(5 runs; bar: under 1 s)")


CASES = (
    # (trace, profile, objective, max_gpu_mem, max_tpot)
    ("qwen3-30b-a3b-bigmoeonedge", "rtx-3060", "tpot", None, None),
    ("gpt-oss-120b-bigmoeonedge", "rtx-4090", "tokens-per-s", 16 * 2**30, None),
    ("gemma-4-26b-a4b-bigmoeonedge", "l4", "memory", None, 0.068),
)
CASE_SIZES = (0, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
CASE_FORMATS = (None, "8", "4", "2")


def search_cases(jobs: int) -> None:
    from moesim.costmodel.dataset import cache_root, moesim_hash
    from moesim.costmodel.model import CostModel
    from moesim.costmodel.search import Constraints, SpaceSpec, build_space, default_space, search
    from moesim.costmodel.context import TraceProfileContext
    from moesim.costmodel.space import sweep_point
    from moesim.simulator.presets import PRESETS
    from moesim.simulator.sweep import run_sweep

    model = CostModel.load()
    print("\n3. Search against exhaustive simulation on the bundled cases")
    policies = tuple(p for p in PRESETS.names() if p != "belady")
    for trace, profile, objective, mem, tpot in CASES:
        ctx = TraceProfileContext(trace, profile)
        spec = SpaceSpec(policies, CASE_SIZES, CASE_FORMATS, (None,), (1,))
        space = build_space(spec, ctx.E)
        c = Constraints(max_gpu_mem=mem, max_tpot=tpot)
        res = search(trace, profile, objective, c, model=model, space=spec, jobs=jobs)
        limit = c.memory_limit(int(ctx.profile.device.memory_bytes))
        points = [sweep_point(trace, profile, space.row(i), limit) for i in range(len(space))]
        rows = run_sweep(points, cache_root() / "bench" / moesim_hash()[:16] / f"{trace}-{profile}-{limit}",
                         jobs=jobs, progress=False)
        best, best_row = math.inf, None
        key = {"tpot": "tpot_mean_s", "tokens-per-s": "tokens_per_s", "memory": "peak_gpu_mib", "ttft": "ttft_mean_s"}
        for r in rows:
            if not r.get("feasible"):
                continue
            if tpot is not None and not r["tpot_mean_s"] <= tpot:
                continue
            v = r[key[objective]] * (-1 if objective == "tokens-per-s" else 1)
            if v < best:
                best, best_row = v, r
        feasible = sum(1 for r in rows if r.get("feasible"))
        full = len(build_space(default_space(ctx), ctx.E))
        print(f"   {trace} on {profile}, objective {objective}; {c.describe(int(ctx.profile.device.memory_bytes))}")
        if best_row is None:
            print(f"     no configuration of the space meets the constraints; search says: "
                  f"{res.infeasible_reason or 'found ' + str(res.chosen.config)}")
            continue
        print(f"     space {len(space)} configurations ({feasible} fit); exhaustive simulation optimum: "
              f"{best_row['policy']} cache {best_row['cache_experts']} {best_row['expert_format']} -> "
              f"{abs(best):.4g} {'MiB' if objective == 'memory' else ('tokens/s' if objective == 'tokens-per-s' else 's')}")
        if res.chosen is None:
            print(f"     search found nothing: {res.infeasible_reason}")
            continue
        got = res.chosen.value(objective) * (-1 if objective == "tokens-per-s" else 1)
        gap = (got - best) / abs(best)
        print(f"     search: {res.chosen.config[0]} cache {res.chosen.config[1]} "
              f"{res.chosen.simulated['expert_format']} -> {abs(got):.4g}; shortfall against the optimum "
              f"{100 * gap:+.2f}% (bar: within 2%)")
        print(f"     simulator calls: search {res.simulator_calls} vs exhaustive {len(space)} "
              f"(ratio {res.simulator_calls / len(space):.3f}; 1 in {len(space) / res.simulator_calls:.0f})")
        full_res = search(trace, profile, objective, c, model=model, jobs=jobs)
        if full_res.chosen is not None:
            fg = full_res.chosen.value(objective) * (-1 if objective == "tokens-per-s" else 1)
            print(f"     over the full default space ({full:,} configurations) search ran {full_res.simulator_calls} "
                  f"simulations ({100 * full_res.simulator_calls / full:.2f}%) and found {abs(fg):.4g} "
                  f"({100 * (fg - best) / abs(best):+.2f}% against the grid's exhaustive optimum; negative is better: "
                  f"the full space holds every cache size)")


def impossible(jobs: int) -> None:
    from moesim.costmodel.search import Constraints, format_result, search

    print("\n4. Impossible constraint: qwen3-30b-a3b on rtx-3060 with --max-gpu-mem 1GiB")
    res = search("qwen3-30b-a3b-bigmoeonedge", "rtx-3060", "tpot", Constraints(max_gpu_mem=2**30), jobs=jobs)
    text = format_result(res)
    start = text.index("NO CONFIGURATION") if "NO CONFIGURATION" in text else 0
    for line in text[start:].splitlines():
        print("   " + line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=0)
    ap.add_argument("--skip-search", action="store_true")
    ap.add_argument("--skip-accuracy", action="store_true")
    args = ap.parse_args()
    if not args.skip_accuracy:
        accuracy(args.jobs)
    speed()
    if not args.skip_search:
        search_cases(args.jobs)
    impossible(args.jobs)


if __name__ == "__main__":
    main()
