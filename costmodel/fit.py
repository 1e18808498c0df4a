"""Fitting the cost model: simulate a sample of configurations, compare corrections, write the artifact.

Steps (``moesim costmodel fit``):

1. the fit plan (:func:`moesim.costmodel.dataset.make_plan`): every bundled trace x profile, every preset
   ``per_preset`` times, Latin hypercube over cache size, formats and batch;
2. the simulator runs (parallel, cached on disk; a rerun after a change reruns only what changed);
3. features and backbone for every run (:class:`~moesim.costmodel.context.TraceProfileContext`);
4. for TPOT and TTFT separately, 5-fold cross-validation on the fit runs of: the backbone alone, a ridge
   correction, a gradient-boosted correction, and a gradient-boosted model of the target itself without
   the backbone (``direct``, for comparison); the correction with the lowest cross-validated MAPE is
   fitted on all runs and stored (``direct`` is reported, never stored: the backbone is what carries the
   model to traces and profiles it was not fitted on);
5. the artifact, with the hashes of everything it was fitted on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from moesim.costmodel.context import FEATURE_NAMES, TraceProfileContext
from moesim.costmodel.correction import GbmSettings, NoCorrection, fit_gbm, fit_ridge
from moesim.costmodel.dataset import RunSet, finite, make_plan, moesim_hash, run_plan
from moesim.costmodel.model import CANDIDATES, TARGETS, CostModel, mape

SAMPLING_METHOD = ("stratified over trace x profile x preset (each preset per_preset times per group), Latin "
                   "hypercube over cache size (log-uniform 0..E), expert format, non-expert format and batch")
DEFAULT_SEED = 1
DEFAULT_PER_PRESET = 3
TEST_SEED = 2


@dataclass
class Samples:
    """Simulated configurations with their backbone predictions and correction features."""

    trace: np.ndarray  # object [n]
    profile: np.ndarray
    policy: np.ndarray
    X: np.ndarray  # [n, F]
    backbone: dict[str, np.ndarray]  # target -> [n]
    simulated: dict[str, np.ndarray]
    peak_predicted: np.ndarray
    peak_simulated: np.ndarray
    tokens_simulated: np.ndarray
    keys: list[tuple]

    def __len__(self) -> int:
        return len(self.policy)

    def take(self, idx) -> "Samples":
        idx = np.asarray(idx)
        return Samples(self.trace[idx], self.profile[idx], self.policy[idx], self.X[idx],
                       {k: v[idx] for k, v in self.backbone.items()}, {k: v[idx] for k, v in self.simulated.items()},
                       self.peak_predicted[idx], self.peak_simulated[idx], self.tokens_simulated[idx],
                       [self.keys[i] for i in idx.tolist()])


def collect(runsets: Sequence[RunSet]) -> Samples:
    tr, pr, po, X, bt, bf, st, sf, pm, sm, tk, keys = [], [], [], [], [], [], [], [], [], [], [], []
    for rs in runsets:
        ctx = TraceProfileContext(rs.trace, rs.profile)
        ev = ctx.evaluate(rs.configs)
        for i, row in enumerate(rs.rows):
            if not row.get("feasible") or not ev.valid[i]:
                continue
            if not (finite(row.get("tpot_mean_s")) and finite(row.get("ttft_mean_s"))):
                continue
            cfg = rs.configs.row(i)
            tr.append(rs.trace)
            pr.append(rs.profile)
            po.append(cfg[0])
            X.append(ev.features[i])
            bt.append(ev.tpot_s[i])
            bf.append(ev.ttft_s[i])
            st.append(row["tpot_mean_s"])
            sf.append(row["ttft_mean_s"])
            pm.append(ev.peak_gpu_bytes[i])
            sm.append(row["peak_gpu_mib"] * 2**20)
            tk.append(row["tokens_per_s"])
            keys.append((rs.trace, rs.profile) + cfg)
    obj = lambda v: np.asarray(v, dtype=object)  # noqa: E731
    return Samples(obj(tr), obj(pr), obj(po), np.nan_to_num(np.asarray(X, dtype=np.float64).reshape(-1, len(FEATURE_NAMES))),
                   {"tpot": np.asarray(bt), "ttft": np.asarray(bf)}, {"tpot": np.asarray(st), "ttft": np.asarray(sf)},
                   np.asarray(pm, dtype=np.float64), np.asarray(sm, dtype=np.float64), np.asarray(tk, dtype=np.float64),
                   keys)


_BB_COLUMNS = [FEATURE_NAMES.index("log_bb_tpot"), FEATURE_NAMES.index("log_bb_ttft")]


def _fit_kind(kind: str, X: np.ndarray, y_ratio: np.ndarray, y_log: np.ndarray, settings: GbmSettings):
    if kind == "none":
        return NoCorrection()
    if kind == "ridge":
        return fit_ridge(X, y_ratio)
    if kind == "gbm":
        return fit_gbm(X, y_ratio, settings)
    if kind == "direct":
        keep = [i for i in range(X.shape[1]) if i not in _BB_COLUMNS]
        return _Direct(fit_gbm(X[:, keep], y_log, settings), keep)
    raise ValueError(kind)


@dataclass(frozen=True)
class _Direct:
    """A model of log(target) from the features without the backbone (comparison only)."""

    model: object
    keep: list[int]

    def predict_log(self, X: np.ndarray) -> np.ndarray:
        return self.model.predict(X[:, self.keep])


def predict_target(model, X: np.ndarray, backbone: np.ndarray) -> np.ndarray:
    if isinstance(model, _Direct):
        return np.exp(model.predict_log(X))
    return backbone * np.exp(model.predict(X))


def cross_validate(s: Samples, folds: int = 5, seed: int = 0, settings: GbmSettings = GbmSettings(),
                   kinds: Sequence[str] = CANDIDATES) -> dict[str, dict[str, float]]:
    """Cross-validated MAPE per target and candidate."""
    rng = np.random.default_rng(seed)
    fold = rng.permutation(len(s)) % folds
    out: dict[str, dict[str, float]] = {}
    for t in TARGETS:
        y_ratio = np.log(s.simulated[t] / s.backbone[t])
        y_log = np.log(s.simulated[t])
        out[t] = {}
        for kind in kinds:
            pred = np.empty(len(s))
            for f in range(folds):
                tr, te = fold != f, fold == f
                model = _fit_kind(kind, s.X[tr], y_ratio[tr], y_log[tr], settings)
                pred[te] = predict_target(model, s.X[te], s.backbone[t][te])
            out[t][kind] = mape(pred, s.simulated[t])
    return out


def fit_model(s: Samples, choice: dict[str, str], settings: GbmSettings = GbmSettings(),
              meta: Optional[dict] = None) -> CostModel:
    corrections = {}
    for t in TARGETS:
        kind = choice[t]
        if kind == "direct":
            raise ValueError("the direct model is for comparison; store a correction")
        corrections[t] = _fit_kind(kind, s.X, np.log(s.simulated[t] / s.backbone[t]), np.log(s.simulated[t]),
                                   settings)
    return CostModel(corrections, FEATURE_NAMES, meta or {})


@dataclass(frozen=True)
class FitReport:
    runs: int
    samples: int
    cross_validation: dict[str, dict[str, float]]
    choice: dict[str, str]


def fit_costmodel(traces: Sequence[str], profiles: Sequence[str], presets: Sequence[str],
                  per_preset: int = DEFAULT_PER_PRESET, seed: int = DEFAULT_SEED, jobs: int = 0,
                  settings: GbmSettings = GbmSettings(), log: Callable[[str], None] = lambda m: None
                  ) -> tuple[CostModel, FitReport]:
    from moesim import __version__
    from moesim.costmodel.dataset import profile_hash, trace_hash
    plans = make_plan(traces, profiles, presets, per_preset, seed)
    runs = sum(len(p.configs) for p in plans)
    log(f"fit plan: {runs} configurations ({len(traces)} traces x {len(profiles)} profiles x {len(presets)} "
        f"presets x {per_preset})")
    runsets = run_plan(plans, jobs=jobs, log=log)
    samples = collect(runsets)
    log(f"{len(samples)} runs with timings; cross-validating corrections")
    cv = cross_validate(samples, settings=settings)
    choice = {t: min((k for k in CANDIDATES if k != "direct"), key=lambda k: cv[t][k]) for t in TARGETS}
    meta = {
        "moesim_version": __version__,
        "moesim_sha256": moesim_hash(),
        "fitted_on": {"traces": {t: trace_hash(t) for t in traces},
                      "profiles": {p: profile_hash(p) for p in profiles}},
        "sampling": {"method": SAMPLING_METHOD, "seed": seed, "per_preset": per_preset, "presets": list(presets),
                     "runs": runs, "runs_with_timings": len(samples)},
        "gbm": {"n_estimators": settings.n_estimators, "max_depth": settings.max_depth,
                "learning_rate": settings.learning_rate, "subsample": settings.subsample,
                "min_samples_leaf": settings.min_samples_leaf, "loss": "huber"},
        "cross_validation_mape": {t: {k: round(v, 6) for k, v in cv[t].items()} for t in TARGETS},
        "chosen": choice,
    }
    model = fit_model(samples, choice, settings, meta)
    return model, FitReport(runs, len(samples), cv, choice)


def format_cv(cv: dict[str, dict[str, float]], choice: dict[str, str]) -> str:
    lines = [f"{'target':<6}  " + "  ".join(f"{k:>9}" for k in CANDIDATES) + "   chosen"]
    for t in TARGETS:
        cells = "  ".join(f"{100 * cv[t][k]:8.2f}%" if not math.isnan(cv[t][k]) else f"{'-':>9}" for k in CANDIDATES)
        lines.append(f"{t:<6}  {cells}   {choice[t]}")
    return "\n".join(lines)
