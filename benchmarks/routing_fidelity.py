"""Routing synthesizer: held-out fidelity on real traces, the Mixtral model against published statistics,
synthesis speed and determinism, and bad-input handling (issue #12). Prints every figure.

    python benchmarks/routing_fidelity.py [--gsm8k-trace T.parquet] [--seeds 3] [--fit-seeds 3]
                                          [--only heldout|mixtral|speed|bad]

Held-out fidelity: each bundled BigMoeOnEdge trace is split by decode position (fit on the prefill and the
first half of decode; the second half is held out); a trace of the demo model on GSM8K prompts is split by
request (fit on the first half of the requests). A model is fitted on the fitting part only, the held-out
part's shape is synthesized, and the two are compared (decode accesses counted). For the decode split the
synthetic request has the whole request's shape (prompt, all decode steps) and the same held-out positions
are compared, since the real held-out half continues a request that had a prompt and a first half.
Figures are means over --seeds synthetic seeds of each of --fit-seeds fits (fit seeds 0..N-1: the fit's damped
rounds circle its fixed point, so one fit is one draw, and single fits differ by 0.5-1 point; the range over fit
seeds is printed). The same comparison is made for two naive baselines fitted to the same part: uniform
random routing, and per-layer popularity only; and, where the fit found more than one request group, for the
full model with one set of parameters for all requests ("without groups").

A last row, "real fit part", compares no model at all: the real fitting part itself (its decode half of the
same length, or its requests) against the held-out part. It is what a model that reproduced the fitting
part exactly would score, so where it misses a bar, the held-out part differs from the fitting part by
more than the bar and no model fitted on the fitting part alone can be expected to meet it. "model vs
itself" sets two synthetic seeds of the full model (fit seed 0) against each other at the held-out shape:
what a model that were the real process would score against a sample of this size, the bars' other floor.

For the demo-model trace, each request group the fit finds is then set against its own training requests
(in sample, its synthetic requests tiled 20 times to take out sampling noise): decode entropy per layer, and
the share of the synthetic decode on experts the group's real decode routes under 0.5% of the time. It shows
which group the held-out entropy gap comes from. Last, the positions around the phase boundary, real against
synthetic: how much of each cell the cell before holds, and how far the position's expert shares lie from its
whole phase's (total variation). The prompts end on the chat template's tokens and the first output tokens route
unlike the rest of decode: the routing model's phase edges (tracer/routing.py).

The demo-model trace (--gsm8k-trace, default benchmarks/data/demo-gsm8k.parquet) holds 256 GSM8K test
prompts, 47 decode steps each (see benchmarks/data/README.md for how it was recorded).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BARS = "bars: LRU per-layer and global <= 3.0 pts at every capacity, Belady <= 5.0, reuse lags 1-4 <= 3.0, " \
       "per-layer entropy <= 0.020"
# the naive baselines leave the phase edges out too: with them, "popularity only" would have a popularity per
# position next to the boundary, no longer per-layer popularity alone
NAIVE = ("locality", "drift", "cross-layer", "phase-boundary", "request-groups")
BASELINES = (("full model", ()), ("without groups", ("request-groups",)), ("popularity only", NAIVE),
             ("uniform random", ("popularity",) + NAIVE))


def _row(label: str, g: dict, extra: str = "") -> None:
    met = {"LRU/layer": g["lru_layer"] <= 0.03, "LRU global": g["lru_global"] <= 0.03,
           "Belady": g["belady"] <= 0.05, "reuse": g["reuse"] <= 0.03, "entropy": g["entropy_max"] <= 0.02}
    print(f"  {label:<16} {g['lru_layer'] * 100:>8.1f}p {g['lru_global'] * 100:>8.1f}p "
          f"{g['belady'] * 100:>6.1f}p {g['reuse'] * 100:>5.1f}p {g['entropy_max']:>6.3f} "
          f"{g['entropy_mean']:>7.3f}  {', '.join(k for k, v in met.items() if v) or 'none'}{extra}")


GAP_FIELDS = ("lru_layer", "lru_global", "belady", "reuse", "entropy_max", "entropy_mean")


def heldout(name: str, train, test_select, prompt_lens, output_lens, seeds: int, fit_seeds: int, fit_part=None):
    """Prints the comparison; returns the full model of fit seed 0."""
    from moesim.tracer.compare import caching_stats, format_side_by_side, gaps
    from moesim.tracer.routing_fit import fit_routing
    from moesim.tracer.synth import synthetic_trace

    real = caching_stats(test_select(None), "held-out real")
    print(f"\n== {name}: held-out {int(real.lru_layer.size - 1)} experts/layer, {real.layers} layers, "
          f"top-{real.top_k} ==")
    print(f"  {'model':<16} {'LRU/layer':>9} {'LRU glob':>9} {'Belady':>7} {'reuse':>6} {'H max':>6} "
          f"{'H mean':>7}  bars met")
    side, noise, grouped, per_fit = None, None, True, []  # noise: {gap field: seed-to-seed gap}
    for label, disabled in BASELINES:
        if disabled == ("request-groups",) and not grouped:
            print(f"  {label:<16} (the fit found one request group: the full model)")
            continue
        # the baselines without locality or drift are not moment-matched: their fit draws nothing from its seed
        matched = "locality" not in disabled or "drift" not in disabled
        rows, fit_s, groups = [], [], set()
        for fit_seed in range(fit_seeds if matched else 1):
            t0 = time.perf_counter()
            model = fit_routing([train], name, disabled=disabled, seed=fit_seed)
            fit_s.append(time.perf_counter() - t0)
            if not disabled and fit_seed == 0:
                grouped = bool(model.groups)
            groups.add(len(model.groups))
            first = fit_seed == 0 and not disabled
            if first:
                full_model = model
            stats = [caching_stats(test_select(synthetic_trace(model, prompt_lens, output_lens, seed=100 + seed,
                                                               disabled=disabled)),
                                   f"synthetic ({label})", with_next_layer=first and seed == 0)
                     for seed in range(seeds)]
            if first:
                side = format_side_by_side(real, stats[0], "decode")
            fit_rows = [gaps(real, st) for st in stats]
            if first and len(stats) > 1:
                # two seeds of one model differ this much: what a model that were the real process would score
                # against a sample of this size (its sampling noise)
                pairs = [gaps(a, b) for a, b in zip(stats[:-1], stats[1:])]
                noise = {f: float(np.mean([getattr(g, f) for g in pairs])) for f in GAP_FIELDS}
            if not disabled:
                per_fit.append({f: float(np.mean([getattr(g, f) for g in fit_rows])) for f in GAP_FIELDS})
            rows += fit_rows
        n_groups = "/".join(str(g) for g in sorted(groups))
        extra = f", {n_groups} request groups" if groups != {0} else ""
        _row(label, {f: float(np.mean([getattr(g, f) for g in rows])) for f in GAP_FIELDS},
             f"   (fit {np.mean(fit_s):.0f} s{extra})")
    if fit_part is not None:
        own = gaps(real, caching_stats(fit_part, "real fit part", with_next_layer=False))
        _row("real fit part", {f: getattr(own, f) for f in GAP_FIELDS}, "   (no model: the bars' floor)")
    if noise is not None:
        _row("model vs itself", noise, "   (full model, fit seed 0, seed against seed: sampling noise at this size)")
    print(f"  (largest |synthetic - real| over capacities / lags / layers, mean of {seeds} synthetic seeds of "
          f"{fit_seeds} fit seed(s); H = normalized entropy per layer)")
    if len(per_fit) > 1:
        def span(field: str, scale: float, digits: int) -> str:
            values = [r[field] * scale for r in per_fit]
            return f"{min(values):.{digits}f}-{max(values):.{digits}f}"

        print(f"  full model, fit seed to fit seed: LRU/layer {span('lru_layer', 100, 1)}, LRU global "
              f"{span('lru_global', 100, 1)}, Belady {span('belady', 100, 1)}, reuse {span('reuse', 100, 1)}, "
              f"H max {span('entropy_max', 1, 3)}")
    print("\n  full model, seed 0, side by side (moesim trace stats --against):")
    print("\n".join(("  " + line).rstrip() for line in side.rstrip().splitlines()))
    return full_model


def bigmoe_heldout(seeds: int, fit_seeds: int) -> None:
    from moesim.tracer import DECODE, read_trace
    from moesim.tracer.routing_fit import phase_shape
    from moesim.traces import resolve_trace

    for name in ("qwen3-30b-a3b-bigmoeonedge", "gemma-4-26b-a4b-bigmoeonedge", "gpt-oss-120b-bigmoeonedge"):
        tr = read_trace(resolve_trace(name))
        dec = tr.position[tr.phase == DECODE]
        mid = int(dec.min() + dec.max() + 1) // 2
        train = tr.select(~((tr.phase == DECODE) & (tr.position >= mid)))

        def select(t, mid=mid, tr=tr):
            t = tr if t is None else t
            return t.select((t.phase == DECODE) & (t.position >= mid))

        held = int(dec.max()) + 1 - mid  # the fitting part's last decode positions, as many as are held out
        fit_part = tr.select((tr.phase == DECODE) & (tr.position < mid) & (tr.position >= mid - held))
        heldout(f"{name}, decode positions >= {mid} held out", train, select, phase_shape(tr.cells, 0),
                phase_shape(tr.cells, 1), seeds, fit_seeds, fit_part=fit_part)


def gsm8k_heldout(path: Path, seeds: int, fit_seeds: int) -> None:
    from moesim.tracer import read_trace
    from moesim.tracer.routing_fit import phase_shape

    if not path.is_file():
        print(f"\n== demo model on GSM8K: {path} not found; make it with\n"
              f"   moesim demo-model --out out/demo250 --stop-at-step 250 && moesim trace --prompts "
              f"../shared/data/gsm8k/test.jsonl --model out/demo250 --limit 256 --max-new-tokens 48 --ignore-eos "
              f"--device cpu --out {path}")
        return
    tr = read_trace(path)
    reqs = np.unique(tr.request)
    half = reqs[: reqs.size // 2]
    train = tr.select(np.isin(tr.request, half))
    test = tr.select(~np.isin(tr.request, half))

    def select(t, test=test):
        return test if t is None else t

    model = heldout(f"demo model on GSM8K ({path.name}): requests {reqs.size // 2}..{reqs.size - 1} held out",
                    train, select, phase_shape(test.cells, 0), phase_shape(test.cells, 1), seeds, fit_seeds,
                    fit_part=train)
    groups_in_sample(train, model)
    boundary_positions(train, model)


def boundary_positions(train, model, copies: int = 5) -> None:
    """The positions around the phase boundary, real against the full model (fit seed 0, the training shapes x
    ``copies``): a prompt ends on the chat template's tokens and the first output tokens route unlike the rest of
    decode, which the model's phase edges reproduce."""
    from moesim.tracer.routing import edge_positions
    from moesim.tracer.routing_fit import boundary_profile, phase_shape
    from moesim.tracer.synth import synthetic_trace

    decode_len = int(phase_shape(train.cells, 1).min())
    offsets = (-2, -1, 0, 1, 2, 3, 4, decode_len // 2)
    syn = synthetic_trace(model, np.tile(phase_shape(train.cells, 0), copies),
                          np.tile(phase_shape(train.cells, 1), copies), seed=7)
    print(f"\n  positions around the phase boundary (fitting requests; synthetic: full model, fit seed 0, x{copies}; "
          f"means over layers):")
    fits = [(f"group {g}", grp) for g, grp in enumerate(model.groups)] or [("all requests", model)]
    print("  phase edges of the fit: " + "; ".join(
        "{}: the prompt's last {}, decode's first {}".format(label, *edge_positions(fit)) for label, fit in fits))
    print(f"  {'position (0: first decode)':<42}" + "".join(f"{d:>7}" for d in offsets))
    for label, trace in (("real", train), ("synthetic", syn)):
        profile = boundary_profile(trace.cells, offsets, model.num_experts)
        print(f"  {label + ', reuse of the position before':<42}" + "".join(f"{v:>7.2f}" for v in profile.reuse))
        print(f"  {label + ', distance from its phase':<42}" + "".join(f"{v:>7.2f}" for v in profile.distance))


def groups_in_sample(train, model, copies: int = 20) -> None:
    """Each request group of ``model`` (fitted to ``train`` with seed 0) against its own training requests:
    decode entropy per layer, and the share of the synthetic decode on experts the group's real decode never
    routes (under 0.5% of its accesses). ``copies`` tiled copies of the group's request shapes take the
    synthesis's sampling noise out."""
    import dataclasses

    from moesim.tracer import DECODE
    from moesim.tracer.compare import layer_entropy
    from moesim.tracer.routing_fit import access_counts, find_request_groups, phase_shape, request_features
    from moesim.tracer.synth import synthetic_trace

    if not model.groups:
        return
    labels = find_request_groups(request_features(train.cells)[0], seed=0)  # the fit's own grouping
    reqs = np.unique(train.request)
    print(f"\n  request groups in sample (fit seed 0, each group's synthetic decode x{copies} its requests):")
    print(f"  {'group':<8} {'requests':>8} {'carry':>6}  {'decode H real':<28} {'synthetic':<28} "
          f"{'on never-routed experts':>23}")
    for g, group in enumerate(model.groups):
        real = train.select(np.isin(train.request, reqs[labels == g]))
        alone = dataclasses.replace(model, groups=(dataclasses.replace(group, share=1.0),))
        syn = synthetic_trace(alone, np.tile(phase_shape(real.cells, 0), copies),
                              np.tile(phase_shape(real.cells, 1), copies), seed=7)
        counts = access_counts(real.cells, DECODE, model.num_layers, model.num_experts)
        never = counts < 0.005 * counts.sum(axis=1, keepdims=True)  # [L, E]
        dec = syn.cells.phase == DECODE
        on_never = never[syn.cells.layer[dec][:, None], syn.cells.experts[dec]].mean()
        h_real, h_syn = layer_entropy(real), layer_entropy(syn)
        print(f"  {g:<8} {group.fitted_requests:>8} {group.phase('decode').carry:>6.3f}  "
              f"{' '.join(f'{h:.3f}' for h in h_real):<28} {' '.join(f'{h:.3f}' for h in h_syn):<28} "
              f"{on_never:>22.1%}")


def _mixtral_frequencies():
    from moesim.tracer.mixtral_published import FREQUENCIES

    path = REPO.parent / "shared" / FREQUENCIES
    if not path.is_file():
        return None
    freq = np.load(path)
    return freq / freq.sum(axis=1, keepdims=True)


def mixtral() -> None:
    from moesim.tracer.mixtral_published import (FIRST_CHOICE_REPETITION, FIRST_OR_SECOND_REPETITION,
                                                  HYBRIMOE_LRU, MOE_INFINITY_WORKING_SET, REPORTED_LAYERS,
                                                  decode_arrays, measure, per_layer_target)
    from moesim.tracer.routing import read_routing
    from moesim.tracer.stats import lru_hit_curve
    from moesim.tracer.synth import synthetic_trace

    m = read_routing("mixtral-8x7b-published")
    L = m.num_layers
    R, P, G = 256, 16, 64
    ex = decode_arrays(m, seed=12345, requests=R, prompt=P, output=G)  # a seed the fit did not use
    st = measure(ex)
    st_p = measure(decode_arrays(m, seed=12345, requests=R, prompt=P, output=G, disabled=("locality",)))
    b1, b2 = per_layer_target(FIRST_CHOICE_REPETITION, L), per_layer_target(FIRST_OR_SECOND_REPETITION, L)
    print("\n== Mixtral-8x7B routing model (bundled mixtral-8x7b-published) vs the statistics it was fitted to ==")
    print(f"  synthetic: {R} requests x ({P} prefill + {G} decode), seed 12345; repetition over decode steps")
    print(f"  {'layer':>5} {'first choice: paper':>20} {'synth':>6} {'diff':>6}   {'first or second: paper':>23} "
          f"{'synth':>6} {'diff':>6}   {'popularity-only synth (1st / 1st-or-2nd)':>40}")
    for l in REPORTED_LAYERS:
        print(f"  {l:>5} {b1[l] * 100:>19.1f}% {st.first_choice[l] * 100:>5.1f}% "
              f"{(st.first_choice[l] - b1[l]) * 100:>+6.1f}   {b2[l] * 100:>22.1f}% {st.first_or_second[l] * 100:>5.1f}% "
              f"{(st.first_or_second[l] - b2[l]) * 100:>+6.1f}   {st_p.first_choice[l] * 100:>19.1f}% / "
              f"{st_p.first_or_second[l] * 100:.1f}%")
    d1 = np.abs(st.first_choice - b1)[list(REPORTED_LAYERS)].max() * 100
    d2 = np.abs(st.first_or_second - b2)[list(REPORTED_LAYERS)].max() * 100
    print(f"  largest gap at the shown layers: first choice {d1:.1f} pts, first or second {d2:.1f} pts "
          f"(bar 2.0); over all 32 layers (interpolated targets): {np.abs(st.first_choice - b1).max() * 100:.1f} / "
          f"{np.abs(st.first_or_second - b2).max() * 100:.1f} pts")
    freq = _mixtral_frequencies()
    if freq is not None:
        print(f"  synthetic expert shares vs the 32 x 8 frequencies they were fitted to: largest gap "
              f"{np.abs(st.share - freq).max() * 100:.2f} pts")
    tr = synthetic_trace(m, np.full(R, P), np.full(R, G), seed=12345)
    ll, lg = lru_hit_curve(tr, "layer", "decode"), lru_hit_curve(tr, "global", "decode")
    for c, target in HYBRIMOE_LRU.items():
        got = ll.hit_rate(c)
        print(f"  HybriMoE LRU at {c}/8 cached ({c / 8:.0%}): paper {target * 100:.1f}%, synthetic per-layer LRU "
              f"{got * 100:.1f}% ({(got - target) * 100:+.1f} pts, bar 5.0), global LRU {lg.hit_rate(c * L) * 100:.1f}%")
    print("  synthetic LRU hit rate (decode) by slots per layer:")
    print("    slots/layer: " + " ".join(f"{c:>6}" for c in range(1, 9)))
    print("    per-layer  : " + " ".join(f"{ll.hit_rate(c) * 100:>5.1f}%" for c in range(1, 9)))
    print("    global     : " + " ".join(f"{lg.hit_rate(c * L) * 100:>5.1f}%" for c in range(1, 9)))
    # MoE-Infinity: share of (layer, expert) pairs a request activates during decode
    used = np.zeros((R, L, 8), dtype=bool)
    for j in range(2):
        np.put_along_axis(used, ex[:, :, :, j].transpose(0, 2, 1), True, axis=2)
    ws = used.mean()
    used8 = np.zeros((R, L, 8), dtype=bool)
    for j in range(2):
        np.put_along_axis(used8, ex[:, :8, :, j].transpose(0, 2, 1), True, axis=2)
    print(f"  working set per request (MoE-Infinity reports ~{MOE_INFINITY_WORKING_SET:.0%}, not fitted): "
          f"{ws * 100:.0f}% of experts over {G} decode steps, {used8.mean() * 100:.0f}% over the first 8; "
          f"top-2 of 8 with the paper's repetition cannot stay near 25% beyond ~2 steps")


def speed_and_determinism() -> None:
    print("\n== speed and determinism (moesim trace synth) ==")
    cases = (("mixtral-8x7b-published", 125, 61, 64), ("qwen3-30b-a3b-bigmoeonedge", 31, 48, 64))
    with tempfile.TemporaryDirectory() as tmp:
        for name, R, P, G in cases:
            paths = [Path(tmp) / f"{name}-{i}.parquet" for i in range(2)]
            times = []
            for p in paths:
                t0 = time.perf_counter()
                out = subprocess.run([sys.executable, "-m", "moesim.cli", "trace", "synth", "--routing", name,
                                      "--requests", str(R), "--prompt-len", str(P), "--output-len", str(G),
                                      "--seed", "7", "--out", str(p)], capture_output=True, text=True)
                times.append(time.perf_counter() - t0)
                if out.returncode:
                    print(f"  {name}: failed: {out.stderr.strip()}")
                    return
            msg = out.stdout.strip().split(" in ")[-1]
            same = paths[0].read_bytes() == paths[1].read_bytes()
            print(f"  {name}: {out.stdout.strip().split(': ', 1)[1].split(', synthetic')[0]}")
            print(f"    synthesis + write {msg} (whole command {min(times):.1f} s with start-up); two runs, same "
                  f"seed: {'byte-identical' if same else 'DIFFERENT'} files ({paths[0].stat().st_size} bytes)")


def bad_inputs() -> None:
    import json

    print("\n== bad input (one line, exit 2, no file written) ==")
    from moesim.tracer.routing import resolve_routing

    with tempfile.TemporaryDirectory() as tmp:
        good = json.loads(resolve_routing("mixtral-8x7b-published").read_text())
        old = dict(good, version=99)
        (Path(tmp) / "v99.json").write_text(json.dumps(old))
        other = json.loads(resolve_routing("gpt-oss-120b-bigmoeonedge").read_text())
        (Path(tmp) / "gptoss.json").write_text(json.dumps(other))
        out = str(Path(tmp) / "out.parquet")
        shape = ["--prompt-len", "4", "--output-len", "4", "--out", out]
        cases = (
            ("routing file of another version", ["--routing", str(Path(tmp) / "v99.json"), "--requests", "2"]),
            ("routing for another expert count", ["--routing", str(Path(tmp) / "gptoss.json"), "--model-config",
                                                  "mixtral-8x7b", "--requests", "2"]),
            ("model config that does not match", ["--routing", "mixtral-8x7b-published", "--model-config",
                                                  "qwen3-30b-a3b", "--requests", "2"]),
            ("request count of 0", ["--routing", "mixtral-8x7b-published", "--requests", "0"]),
        )
        for label, args in cases:
            full = ["trace", "synth", *args, *shape]
            r = subprocess.run([sys.executable, "-m", "moesim.cli", *full], capture_output=True, text=True)
            lines = [x for x in r.stderr.splitlines() if x.strip() and "Warning" not in x and "warn" not in x]
            print(f"  {label}: exit {r.returncode}, file written: {Path(out).exists()}, "
                  f"stderr: {lines[-1] if lines else ''}")


def main() -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--gsm8k-trace", default=str(REPO / "benchmarks" / "data" / "demo-gsm8k.parquet"),
                    help="a trace of the demo model on GSM8K prompts, split by request")
    ap.add_argument("--seeds", type=int, default=3, help="synthetic traces per fitted model")
    ap.add_argument("--fit-seeds", type=int, default=3,
                    help="fits per moment-matched model (seeds 0..N-1): one fit is one draw, 0.5-1 point apart")
    ap.add_argument("--only", choices=("heldout", "mixtral", "speed", "bad"), default=None)
    args = ap.parse_args()
    print(BARS)
    if args.only in (None, "heldout"):
        bigmoe_heldout(args.seeds, args.fit_seeds)
        gsm8k_heldout(Path(args.gsm8k_trace), args.seeds, args.fit_seeds)
    if args.only in (None, "mixtral"):
        mixtral()
    if args.only in (None, "speed"):
        speed_and_determinism()
    if args.only in (None, "bad"):
        bad_inputs()
    return 0


if __name__ == "__main__":
    sys.exit(main())
