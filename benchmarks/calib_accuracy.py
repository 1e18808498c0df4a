"""How well do fitted hardware profiles predict what they did not measure?

Prints, for a quick and a full calibration of the same machine (run here, or given as files):

1. every fitted model's leave-one-out error (each point predicted by a fit made without it);
2. the quick profile's predictions at the full calibration's points that the quick grid did not
   measure (held out), through the public profile API, against the full run's measurements;
3. with --cross-shape MODEL: the full profile (measured at --model-config's shape) predicting expert
   FFN times measured now at another model's shape (the roofline models' claim to generalise);
4. the roofline fits' leave-one-out error next to scikit-learn regressors' (gradient boosting and
   k-nearest neighbours on log FLOPs / log bytes) on the same points.

Examples::

    python benchmarks/calib_accuracy.py --device cpu                    # runs quick + full (~10 min here)
    python benchmarks/calib_accuracy.py --quick-profile Q.json --full-profile F.json
    python benchmarks/calib_accuracy.py --device cuda:0 --cross-shape qwen3-30b-a3b --out-dir /tmp/acc
    python benchmarks/calib_accuracy.py --grid-study calib/profiles/cpu-calibrated.json   # the quick grid's cost

On a shared machine both runs' timings move with the load (the table's drift column); --grid-study needs no new
measurement: it refits a full run's own points as the quick grid would have taken them, with and without the
quick policy's stop at the first compute-bound point, and predicts the rest of that run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from moesim.calib.calibrate import CalibOptions, calibrate, format_model_table, series_data, series_statistic
from moesim.calib.profile import HardwareProfile, MeasuredSeries, load_profile
from moesim.modelspec import ModelShape


HELD_OUT_BAR_PCT = 10.0  # #3's bar for the quick profile's mean held-out error


def load_text() -> str:
    import os

    try:
        return " / ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def predict_point(profile: HardwareProfile, series: MeasuredSeries, x: dict[str, float]) -> float:
    """The profile's prediction for one measured point of ``series`` (through the public API)."""
    key = series.key
    if key.startswith("copy/"):
        _, direction, tag, mode = key.split("/")
        return profile.copy_time(x["bytes"], direction, pinned=tag == "pinned", concurrent=mode == "concurrent")
    shape = series.model_shape()
    if key.startswith("expert/"):
        return profile.expert_time(shape, x["tokens"], key.split("/")[1])
    if key.startswith("cpu_expert/"):
        _, kernel, threads = key.split("/")
        return profile.cpu_expert_time(shape, x["tokens"], kernel, threads=int(threads.rstrip("t")))
    if key.endswith("/decode"):
        return profile.non_expert_time(shape, "decode", 1, x["context"], batch=x["batch"], kernel=key.split("/")[1])
    if key.endswith("/prefill"):
        return profile.non_expert_time(shape, "prefill", x["tokens"], x["tokens"], kernel=key.split("/")[1])
    if key == "head":
        return profile.head_time(shape, x["tokens"])
    raise KeyError(key)


def held_out_table(quick: HardwareProfile, full: HardwareProfile) -> tuple[str, list[float]]:
    """Per series: the quick profile's error at the full run's held-out points, next to the two runs'
    disagreement at the points both measured (the machine's run-to-run drift, which no fit can remove),
    and the held-out error once the quick prediction is scaled by that shared-point ratio (the fit's own
    error: how well the sparse grid and the model shape interpolate)."""
    stat = {s.key: series_statistic(s.key, full.fit_statistic) for s in full.measurements}
    quick_points = {s.key: {tuple(sorted(p.x.items())): p.value(stat.get(s.key, full.fit_statistic)) for p in s.points}
                    for s in quick.measurements}
    lines = [f"{'series':<30} {'held-out':>8} {'mean err':>9} {'max err':>8} {'<=10%':>6} {'drift':>7} "
             f"{'fit err':>8}   (quick predicts full's {full.fit_statistic}; drift: full / quick at shared points)"]
    all_errs: list[float] = []
    fit_errs: list[float] = []
    for s in full.measurements:
        if s.key == "overhead" or s.key not in quick_points:
            continue
        shared = quick_points[s.key]
        ratios = [p.value(stat[s.key]) / shared[k] for p in s.points
                  if (k := tuple(sorted(p.x.items()))) in shared]
        drift = float(np.median(ratios)) if ratios else 1.0
        errs, errs_fit = [], []
        for p in s.points:
            if tuple(sorted(p.x.items())) in shared:
                continue
            try:
                pred = predict_point(quick, s, p.x)
            except Exception as exc:  # e.g. a thread count the quick run did not measure
                lines.append(f"{s.key:<30} cannot predict: {exc}")
                break
            actual = p.value(stat[s.key])
            errs.append(abs(pred - actual) / actual)
            errs_fit.append(abs(pred * drift - actual) / actual)
        if errs:
            e, ef = np.array(errs), np.array(errs_fit)
            all_errs.extend(errs)
            fit_errs.extend(errs_fit)
            lines.append(f"{s.key:<30} {e.size:>8} {100 * e.mean():>8.1f}% {100 * e.max():>7.1f}% "
                         f"{100 * np.mean(e <= 0.10):>5.0f}% {drift:>7.2f} {100 * ef.mean():>7.1f}%")
    if all_errs:
        e, ef = np.array(all_errs), np.array(fit_errs)
        lines.append(f"{'ALL':<30} {e.size:>8} {100 * e.mean():>8.1f}% {100 * e.max():>7.1f}% "
                     f"{100 * np.mean(e <= 0.10):>5.0f}% {'':>7} {100 * ef.mean():>7.1f}%  (median {100 * np.median(e):.1f}%, "
                     f"after drift {100 * np.median(ef):.1f}%)")
    return "\n".join(lines), all_errs


def sklearn_table(profile: HardwareProfile) -> str:
    from sklearn.ensemble import GradientBoostingRegressor
    from sklearn.model_selection import LeaveOneOut, cross_val_predict
    from sklearn.neighbors import KNeighborsRegressor

    models = {"expert": profile.expert_models, "cpu": profile.cpu_expert_models}
    lines = [f"{'series':<30} {'roofline LOO':>12} {'GBR LOO':>8} {'kNN LOO':>8}"]
    for s in profile.measurements:
        if s.key == "overhead" or s.key.startswith("copy/") or len(s.points) < 5:
            continue
        d = series_data(s, profile.fit_statistic)
        feats = np.stack([np.log(d.flops), np.log(d.nbytes)], axis=1)
        y = np.log(d.times)
        scores = []
        for reg in (GradientBoostingRegressor(random_state=0, n_estimators=200, max_depth=2),
                    KNeighborsRegressor(n_neighbors=2, weights="distance")):
            pred = cross_val_predict(reg, feats, y, cv=LeaveOneOut())
            scores.append(float(np.mean(np.abs(np.exp(pred) - d.times) / d.times)))
        if s.key.startswith("expert/"):
            roof = models["expert"][s.key.split("/")[1]].model.loo_rel_error
        elif s.key.startswith("cpu_expert/"):
            _, k, t = s.key.split("/")
            roof = models["cpu"][k][int(t.rstrip("t"))].model.loo_rel_error
        elif s.key.startswith("non_expert/"):
            _, k, ph = s.key.split("/")
            roof = profile.non_expert_models[k][ph].loo_rel_error
        else:
            roof = profile.head_model.loo_rel_error
        lines.append(f"{s.key:<30} {100 * roof:>11.1f}% {100 * scores[0]:>7.1f}% {100 * scores[1]:>7.1f}%")
    lines.append("(scikit-learn models see only this one shape's points: they cannot extrapolate in tokens or "
                 "transfer to other shapes, which the roofline fits do by construction)")
    return "\n".join(lines)


def _stop_rule(points: list, work, min_points: int = 4) -> list:
    """The quick repeat policy's rule (moesim.calib.timing): stop adding costlier points after the first one
    whose time grew at least 0.8x as much as its work, keeping at least ``min_points``."""
    kept = []
    for p in points:
        if len(kept) >= min_points and len(kept) >= 2 and _compute_bound(kept[-2], kept[-1], work):
            break
        kept.append(p)
    return kept


def _compute_bound(prev, point, work) -> bool:
    growth = work(point.x) / work(prev.x)
    return growth >= 2 and point.median_s >= 0.8 * growth * prev.median_s


def grid_subset_profiles(full: HardwareProfile) -> dict[str, HardwareProfile]:
    """The full run's own points restricted to the quick grid, without and with the compute-bound stop, refitted.

    Both predict the rest of the same run, so there is no run-to-run drift: the error is what the sparser grid
    (and the stop) costs the fit. Budgets are not simulated."""
    import dataclasses

    import torch

    from moesim.calib import workload
    from moesim.calib.calibrate import refit
    from moesim.calib.measure import grids_for

    g = grids_for(torch.device("cuda" if full.device.kind == "cuda" else "cpu"), True, full.host.cpu_cores)
    out: dict[str, list] = {"quick grid": [], "quick grid + stop": []}
    for s in full.measurements:
        grid, work = None, (lambda x: x["tokens"])
        if s.key.startswith("expert/"):
            grid = g.expert_tokens
        elif s.key.startswith("cpu_expert/"):
            grid = g.cpu_expert_tokens
        elif s.key == "head":
            grid = g.head_tokens
        elif s.key.endswith("/prefill"):
            grid, shape = g.prefill_tokens, s.model_shape()
            work = lambda x, shape=shape: float(workload.prefill_work(shape, x["tokens"]).flops)  # noqa: E731
        by_tokens = {p.x.get("tokens"): p for p in s.points}
        picked = [by_tokens[float(t)] for t in (grid or ()) if float(t) in by_tokens]
        if len(picked) < 4:
            out["quick grid"].append(s)
            out["quick grid + stop"].append(s)
            continue
        out["quick grid"].append(dataclasses.replace(s, points=tuple(picked)))
        out["quick grid + stop"].append(dataclasses.replace(s, points=tuple(_stop_rule(picked, work))))
    return {name: refit(dataclasses.replace(full, measurements=tuple(series))) for name, series in out.items()}


def cross_shape_table(full: HardwareProfile, device: str, spec: str, quick: bool) -> str:
    import torch

    from moesim.calib.kernels import probe_kernels
    from moesim.calib.measure import expert_series, grids_for
    from moesim.calib.timing import Budget, RepeatPolicy, Timer
    from moesim.calib import facts
    from moesim.modelspec import load_model_shape

    dev = facts.resolve_device(device)
    shape: ModelShape = load_model_shape(spec)
    dtype = torch.bfloat16 if dev.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    ok, _ = probe_kernels(dev, dtype)
    grids = grids_for(dev, quick, facts.cpu_cores())
    timer = Timer(dev, RepeatPolicy.quick() if quick else RepeatPolicy())
    lines = [f"{full.name} (calibrated at {full.sources.get('model_config', '?')}) predicting {shape.model_id} experts "
             f"measured now", f"{'kernel':<8} {'tokens':>7} {'measured ms':>12} {'predicted ms':>13} {'error':>7}"]
    errs = []
    for kernel in full.expert_kernels:
        infos = [i for i in ok.get(kernel, []) if i.library == full.expert_models[kernel].library] or ok.get(kernel, [])
        if not infos:
            continue
        s = expert_series(f"expert/{kernel}", shape, infos[0], dev, dtype, grids.expert_tokens, timer,
                          Budget(grids.budget_expert_s), None)
        for p in s.points:
            actual = p.value(full.fit_statistic)
            pred = full.expert_time(shape, p.x["tokens"], kernel)
            errs.append(abs(pred - actual) / actual)
            lines.append(f"{kernel:<8} {int(p.x['tokens']):>7} {actual * 1e3:>12.3f} {pred * 1e3:>13.3f} "
                         f"{100 * (pred - actual) / actual:>6.1f}%")
    if errs:
        e = np.array(errs)
        lines.append(f"cross-shape: mean |error| {100 * e.mean():.1f}%, max {100 * e.max():.1f}%, "
                     f"{100 * np.mean(e <= 0.10):.0f}% of points within 10%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model-config", default="mixtral-8x7b")
    ap.add_argument("--quick-profile")
    ap.add_argument("--full-profile")
    ap.add_argument("--cross-shape", help="another model whose expert times the full profile should predict")
    ap.add_argument("--cross-quick", action="store_true", help="measure the cross-shape experts on the quick grid")
    ap.add_argument("--out-dir", default="calib-accuracy")
    ap.add_argument("--grid-study", nargs="*", metavar="FULL.json",
                    help="only: for each full profile, its own points on the quick grid with and without the "
                         "compute-bound stop, predicting the rest of the same run (no drift, no new measurement)")
    args = ap.parse_args(argv)
    if args.grid_study:
        for path in args.grid_study:
            full = load_profile(path)
            for name, derived in grid_subset_profiles(full).items():
                print(f"\n== {path} ({full.notes}; load before {full.host.facts.get('load_average_1min_before')}): "
                      f"{name}, fitted to its own points, predicting the rest")
                print(held_out_table(derived, full)[0])
        return 0
    out = Path(args.out_dir)
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr)
    if args.quick_profile:
        quick = load_profile(args.quick_profile)
    else:
        t0, c0 = time.perf_counter(), time.process_time()
        quick = calibrate(CalibOptions(device=args.device, model_config=args.model_config, quick=True, log=log))
        print(f"quick calibration: {time.perf_counter() - t0:.1f} s wall, {time.process_time() - c0:.1f} s CPU "
              f"(all threads; load average {load_text()}; bar: under 60 s wall on an idle machine)")
        quick.save(out / "quick.json")
    if args.full_profile:
        full = load_profile(args.full_profile)
    else:
        t0, c0 = time.perf_counter(), time.process_time()
        full = calibrate(CalibOptions(device=args.device, model_config=args.model_config, quick=False, log=log))
        print(f"full calibration: {time.perf_counter() - t0:.1f} s wall, {time.process_time() - c0:.1f} s CPU "
              f"(load average {load_text()})")
        full.save(out / "full.json")
    print(f"\n== leave-one-out errors, quick profile ({quick.notes})")
    print(format_model_table(quick))
    print(f"\n== leave-one-out errors, full profile ({full.notes})")
    print(format_model_table(full))
    print("\n== quick profile predicting the full calibration's held-out points")
    table, errs = held_out_table(quick, full)
    print(table)
    if errs:
        mean = 100 * float(np.mean(errs))
        print(f"bar: the quick profile predicts the full calibration's held-out points within {HELD_OUT_BAR_PCT:.0f}% "
              f"on average: {mean:.1f}% -> {'met' if mean <= HELD_OUT_BAR_PCT else 'NOT met'}")
    print("\n== roofline versus scikit-learn regressors (leave-one-out, full profile)")
    print(sklearn_table(full))
    if args.cross_shape:
        print("\n== cross-shape")
        print(cross_shape_table(full, args.device, args.cross_shape, quick=args.cross_quick or args.device == "cpu"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
