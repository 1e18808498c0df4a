"""Fitting cost models to measurements, each with its leave-one-out error.

* Copies: ``latency + bytes / bandwidth`` by least squares on relative error (non-negative).
* Compute: roofline-shaped ``latency + knee(flops / flop_rate, bytes / bandwidth) * correction(x)``,
  three candidates, the one with the lowest leave-one-out error wins (the simpler on a near tie):

  - ``roofline``: hard ``max`` knee, three parameters;
  - ``soft-roofline``: ``(a^p + b^p)^(1/p)`` knee with p fitted (real kernels bend smoothly);
  - ``soft-roofline+correction``: plus a measured factor versus the size variable, interpolated
    piecewise-linearly in log x between measured points and held at its edge values outside them
    (an interpolating regressor on the roofline's residuals, so it still generalises across shapes);
  - ``soft-roofline+attention`` (layers with attention only): attention's arithmetic over the KV cache
    at its own FLOP rate, added to a soft roofline of everything else (the KV cache's bytes stay in
    that roofline's memory side, where a GPU's memory-bound attention belongs). On a CPU, attention
    runs tens of times below the matrix products' FLOP rate, and one shared roofline then misses
    decode by a factor of several at long contexts. (Within one model's shape attention FLOPs and KV
    bytes grow together, so a second bandwidth could not be told apart from this rate.)

The leave-one-out error of a model is the mean |relative error| predicting each measured point from a
fit made without it (the whole fit, candidate parameters and correction included).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares, nnls

from moesim.calib.profile import CopyModel, MeasuredRange, MeasuredSeries, RooflineModel
from moesim.errors import MoesimError

NEAR_TIE = 0.005  # prefer the simpler model unless the richer one is better by half a percentage point


def rel_errors(pred: np.ndarray, actual: np.ndarray) -> np.ndarray:
    return np.abs(np.asarray(pred) - np.asarray(actual)) / np.asarray(actual)


# ------------------------------------------------------------------------------------------ copies


def _fit_linear(nbytes: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    a = np.stack([1.0 / t, nbytes / t], axis=1)
    (lat, inv_bw), _ = nnls(a, np.ones_like(t))
    if inv_bw <= 0:
        inv_bw = float(np.min(t / nbytes))
    return float(lat), float(1.0 / inv_bw)


def fit_copy(series: MeasuredSeries, statistic: str = "median") -> CopyModel:
    n = np.array([p.x["bytes"] for p in series.points], dtype=np.float64)
    t = np.array([p.value(statistic) for p in series.points], dtype=np.float64)
    if n.size < 3:
        raise MoesimError(f"series {series.key}: {n.size} points, need at least 3 to fit latency + bytes/bandwidth")
    lat, bw = _fit_linear(n, t)
    errs = []
    for i in range(n.size):
        keep = np.arange(n.size) != i
        l_i, b_i = _fit_linear(n[keep], t[keep])
        errs.append(abs(l_i + n[i] / b_i - t[i]) / t[i])
    return CopyModel(latency_s=lat, bytes_per_s=bw, low_bytes=float(n.min()), high_bytes=float(n.max()),
                     extrapolation="roofline", method="linear", loo_rel_error=float(np.mean(errs)),
                     loo_max_rel_error=float(np.max(errs)), n_points=int(n.size))


# ------------------------------------------------------------------------------------------ roofline


@dataclass(frozen=True)
class RooflineData:
    """Measured times with the FLOPs and bytes of each point, and the query variables for ranges/corrections."""

    flops: np.ndarray
    nbytes: np.ndarray
    times: np.ndarray
    x: dict[str, np.ndarray]
    attention_flops: np.ndarray | None = None  # the attention share of flops (None: no attention)

    def subset(self, keep: np.ndarray) -> "RooflineData":
        x = {k: v[keep] for k, v in self.x.items()}
        af = None if self.attention_flops is None else self.attention_flops[keep]
        return RooflineData(self.flops[keep], self.nbytes[keep], self.times[keep], x, af)

    @property
    def has_attention(self) -> bool:
        return self.attention_flops is not None and bool(np.any(self.attention_flops > 0))

    def parts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(FLOPs other than attention's, all bytes, attention FLOPs)."""
        af = np.zeros_like(self.flops) if self.attention_flops is None else self.attention_flops
        return self.flops - af, self.nbytes, af

    @property
    def size(self) -> int:
        return int(self.times.size)


def _knee(a: np.ndarray, b: np.ndarray, p: float | None) -> np.ndarray:
    if p is None:
        return np.maximum(a, b)
    m = np.maximum(np.maximum(a, b), 1e-300)
    return m * ((a / m) ** p + (b / m) ** p) ** (1.0 / p)


def _fit_base(d: RooflineData, soft: bool, attention: bool = False):
    """(latency, flop rate, bandwidth, sharpness, attention flop rate) by least squares on log time; the
    attention rate is None unless ``attention``."""
    t = d.times
    flops, nbytes, af = d.parts() if attention else (d.flops, d.nbytes, None)
    small = np.argsort(flops)[: max(2, d.size // 4)]
    big = np.argsort(flops)[-max(2, d.size // 4):]
    bw0 = float(np.median(nbytes[small] / t[small]))
    fl0 = float(np.max(flops[big] / t[big]))
    lat0 = float(np.min(t)) * 0.05
    x0 = [np.log(max(lat0, 1e-9)), np.log(fl0 * 1.2), np.log(bw0 * 1.2)]
    lo = [np.log(1e-9), np.log(fl0 * 0.5), np.log(bw0 * 0.5)]
    hi = [np.log(max(float(np.min(t)), 2e-9)), np.log(fl0 * 1e4), np.log(bw0 * 1e4)]
    if soft:
        x0.append(np.log(3.0))
        lo.append(0.0)
        hi.append(np.log(32.0))
    if attention:
        heavy = np.argsort(af / np.maximum(flops, 1e-300))[-max(2, d.size // 4):]
        afl0 = float(np.median(af[heavy] / t[heavy]))
        x0.append(np.log(afl0 * 2.0))
        lo.append(np.log(afl0 * 0.5))
        hi.append(np.log(afl0 * 1e6))

    def unpack(theta):
        lat, fl, bw = np.exp(theta[:3])
        p = float(np.exp(theta[3])) if soft else None
        afl = float(np.exp(theta[-1])) if attention else None
        return float(lat), float(fl), float(bw), p, afl

    def resid(theta):
        lat, fl, bw, p, afl = unpack(theta)
        pred = lat + _knee(flops / fl, nbytes / bw, p)
        if attention:
            pred = pred + af / afl
        return np.log(pred) - np.log(t)

    x0 = np.clip(x0, np.array(lo) + 1e-9, np.array(hi) - 1e-9)
    res = least_squares(resid, x0, bounds=(lo, hi), method="trf", x_scale="jac", max_nfev=400 if not attention else 800)
    return unpack(res.x)


def _correction(d: RooflineData, var: str, lat: float, fl: float, bw: float, p: float | None):
    base = _knee(d.flops / fl, d.nbytes / bw, p)
    factor = np.maximum(d.times - lat, 1e-12) / base
    xs = d.x[var]
    knots = np.unique(xs)
    fac = np.array([np.median(factor[xs == k]) for k in knots])
    return tuple(float(k) for k in knots), tuple(float(f) for f in fac)


def _fit_candidate(d: RooflineData, method: str, corr_var: str) -> RooflineModel:
    soft = method != "roofline"
    attention = method.endswith("+attention")
    lat, fl, bw, p, afl = _fit_base(d, soft, attention)
    cx: tuple[float, ...] = ()
    cf: tuple[float, ...] = ()
    var = ""
    if method.endswith("+correction"):
        var = corr_var
        cx, cf = _correction(d, corr_var, lat, fl, bw, p)
    return RooflineModel(latency_s=lat, flops_per_s=fl, bytes_per_s=bw, sharpness=p, correction_var=var,
                         correction_x=cx, correction_factor=cf, method=method, attention_flops_per_s=afl)


def _predict(m: RooflineModel, d: RooflineData) -> np.ndarray:
    if m.attention_flops_per_s is not None:
        flops, nbytes, af = d.parts()
        return (m.latency_s + _knee(flops / m.flops_per_s, nbytes / m.bytes_per_s, m.sharpness)
                + af / m.attention_flops_per_s)
    base = _knee(d.flops / m.flops_per_s, d.nbytes / m.bytes_per_s, m.sharpness)
    corr = 1.0
    if m.correction_var:
        x = np.maximum(d.x[m.correction_var], 1e-12)
        corr = np.interp(np.log(x), np.log(np.asarray(m.correction_x)), np.asarray(m.correction_factor))
    return m.latency_s + base * corr


def loo_errors(d: RooflineData, method: str, corr_var: str) -> np.ndarray:
    errs = np.empty(d.size)
    for i in range(d.size):
        keep = np.arange(d.size) != i
        m = _fit_candidate(d.subset(keep), method, corr_var)
        errs[i] = rel_errors(_predict(m, d.subset(np.array([i]))), d.times[i:i + 1])[0]
    return errs


def fit_roofline(d: RooflineData, corr_var: str = "", extrapolation: str = "roofline",
                 methods: tuple[str, ...] | None = None) -> RooflineModel:
    """Fit the candidates, keep the best by leave-one-out error, record the others' errors."""
    if d.size < 4:
        raise MoesimError(f"{d.size} measured points: need at least 4 to fit a roofline model")
    if methods is None:
        methods = ("roofline", "soft-roofline")
        if corr_var and np.unique(d.x[corr_var]).size >= 5:
            methods += ("soft-roofline+correction",)
        if d.has_attention and d.size >= 5:
            methods += ("soft-roofline+attention",)
    scores: dict[str, np.ndarray] = {m: loo_errors(d, m, corr_var) for m in methods}
    best = methods[0]
    for m in methods[1:]:
        if scores[m].mean() < scores[best].mean() - NEAR_TIE:
            best = m
    model = _fit_candidate(d, best, corr_var)
    ranges = tuple(MeasuredRange(k, float(v.min()), float(v.max())) for k, v in d.x.items())
    return RooflineModel(
        latency_s=model.latency_s, flops_per_s=model.flops_per_s, bytes_per_s=model.bytes_per_s,
        sharpness=model.sharpness, correction_var=model.correction_var, correction_x=model.correction_x,
        correction_factor=model.correction_factor, ranges=ranges, extrapolation=extrapolation, method=best,
        attention_flops_per_s=model.attention_flops_per_s,
        loo_rel_error=float(scores[best].mean()), n_points=d.size, loo_max_rel_error=float(scores[best].max()),
        alternatives=tuple((m, float(s.mean())) for m, s in scores.items() if m != best),
    )
