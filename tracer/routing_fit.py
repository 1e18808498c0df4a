"""Fit a :class:`~moesim.tracer.routing.RoutingModel` to traces (``moesim trace fit``).

Per phase and layer:

- popularity: maximum likelihood with half a pseudo-count per expert (the Jeffreys prior of a categorical),
  so an expert unseen in a short trace can still appear;
- token classes (cross-layer correlation): a mixture of per-layer categoricals over the token's experts at
  all layers, fitted by EM (maximum likelihood), each class shrunk toward the layer popularity;
- routing weights: the total by its mean and standard deviation, the sorted shares by a Dirichlet whose
  mean and top-share variance match the trace (method of moments);
- locality and drift by moment matching through the generator itself: synthesize the training shape,
  compare, correct, repeat. The matched moments are the per-(layer, rank) histogram of the per-request
  LRU stack distance in the buckets of ``depth_edges`` (which fixes reuse at every lag and the LRU curve
  at every capacity) for the copy probabilities, and the entropy of a request's expert counts per layer
  (how much a request concentrates on its own working set) for the drift concentration. Copies start at
  the reuse a synthesis without them falls short of, so they explain only what popularity cannot.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from moesim.errors import MoesimError
from moesim.tracer.format import DECODE, PREFILL, Trace, TraceCells, sha256_of_file, utc_now_iso
from moesim.tracer.routing import PhaseModel, RoutingModel, WeightModel, default_depth_edges
from moesim.tracer.stats import stack_distances
from moesim.tracer.synth import check_parts, synthesize

POPULARITY_PSEUDO_COUNT = 0.5  # per expert (Jeffreys)
CLASS_PRIOR_STRENGTH = 4.0  # pseudo-counts per layer pulling each token class toward the layer popularity
TOKENS_PER_CLASS = 64  # one more token class for every 64 tokens of the phase, up to MAX_CLASSES
MAX_CLASSES = 4
SHRINK_CELLS = 32.0  # a layer's depth histogram counts as this many cells of the all-layer histogram
FIT_ITERATIONS = 12
FIT_MIN_CELLS = 2048  # the fit's synthetic copies hold at least this many cells per layer and phase


# ------------------------------------------------------------------------------------------------
# What a trace says (the fitted moments)
# ------------------------------------------------------------------------------------------------
def request_depths(cells: TraceCells, num_layers: int) -> np.ndarray:
    """Depth [rows, k] of each routed expert in its (request, layer) LRU stack before its cell, -1 for an
    expert not used before in the request: the stack distance of ``tracer/stats.py`` with the cache
    emptied at every request (what the generator's per-request stacks produce)."""
    n, k = cells.experts.shape
    depth = np.full((n, k), -1, dtype=np.int64)
    group = cells.request.astype(np.int64) * num_layers + cells.layer.astype(np.int64)
    order = np.argsort(group, kind="stable")  # keeps execution order inside a (request, layer) stream
    bounds = np.flatnonzero(np.diff(group[order], prepend=-1, append=-2))
    for a, b in zip(bounds[:-1], bounds[1:]):
        rows = order[a:b]
        keys = cells.experts[rows].astype(np.int64).reshape(-1)
        start = np.repeat(np.arange(rows.size, dtype=np.int64) * k, k)
        depth[rows] = stack_distances(keys, start).reshape(-1, k)
    return depth


def depth_buckets(depth: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bucket of each depth (index into edges), len(edges)-1 for -1 (not used before)."""
    b = np.searchsorted(edges, depth, side="right") - 1
    return np.where(depth < 0, len(edges) - 1, b)


@dataclass(frozen=True)
class PhaseMoments:
    hist: np.ndarray  # [L, k, B+1] share of each (layer, rank)'s cells in each depth bucket; last = first use
    cells: np.ndarray  # [L]
    share: np.ndarray  # [L, E] share of accesses per expert
    entropy: np.ndarray  # [L] normalized entropy of each request's expert counts, mean over requests


def phase_moments(cells: TraceCells, depth: np.ndarray, phase: int, L: int, E: int,
                  edges: np.ndarray) -> PhaseMoments:
    rows = cells.phase == phase
    k = cells.experts.shape[1]
    B = len(edges) - 1
    layer = cells.layer[rows].astype(np.int64)
    bucket = depth_buckets(depth[rows], edges)
    hist = np.zeros((L, k, B + 1))
    for j in range(k):
        np.add.at(hist, (layer, j, bucket[:, j]), 1.0)
    n = np.bincount(layer, minlength=L).astype(np.float64)
    hist /= np.maximum(n, 1)[:, None, None]
    counts = np.zeros((L, E))
    np.add.at(counts, (np.repeat(layer, k), cells.experts[rows].astype(np.int64).reshape(-1)), 1.0)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    reqs, ridx = np.unique(cells.request[rows], return_inverse=True)
    per = np.zeros((reqs.size, L, E))
    np.add.at(per, (np.repeat(ridx, k), np.repeat(layer, k), cells.experts[rows].astype(np.int64).reshape(-1)), 1.0)
    p = per / np.maximum(per.sum(axis=2, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=2) / np.log(E)
    return PhaseMoments(hist=hist, cells=n, share=share, entropy=h.mean(axis=0))



# ------------------------------------------------------------------------------------------------
# Direct fits
# ------------------------------------------------------------------------------------------------
def fit_weights(cells: TraceCells, phase: int, L: int) -> WeightModel:
    rows = cells.phase == phase
    w = cells.weights[rows].astype(np.float64)
    layer = cells.layer[rows].astype(np.int64)
    k = w.shape[1]
    total = w.sum(axis=1)
    shares = -np.sort(-(w / np.maximum(total, 1e-12)[:, None]), axis=1)
    sum_mean, sum_std, alpha = np.ones(L), np.zeros(L), np.ones((L, k))
    for l in range(L):
        sel = layer == l
        if not sel.any():
            continue
        sum_mean[l] = total[sel].mean()
        sum_std[l] = total[sel].std()
        m = shares[sel].mean(axis=0)
        if k == 1:
            continue
        var0 = shares[sel, 0].var()
        # Dirichlet moments: var(x0) = m0 (1 - m0) / (a0 + 1)
        a0 = m[0] * (1 - m[0]) / var0 - 1 if var0 > 0 else 1e4
        alpha[l] = np.clip(a0, 0.5, 1e4) * np.maximum(m, 1e-4)
    return WeightModel(sum_mean=sum_mean, sum_std=sum_std, share_alpha=alpha)


def fit_token_classes(cells: TraceCells, phase: int, L: int, E: int, popularity: np.ndarray,
                      num_classes: int, seed: int = 0, iterations: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """EM for a mixture of per-layer categoricals over each token's experts; (prior [C], theta [C, L, E])."""
    rows = cells.phase == phase
    token = cells.request[rows].astype(np.int64) * (1 << 32) + cells.position[rows].astype(np.int64)
    uniq, tidx = np.unique(token, return_inverse=True)
    k = cells.experts.shape[1]
    X = np.zeros((uniq.size, L * E))
    flat = cells.layer[rows].astype(np.int64)[:, None] * E + cells.experts[rows].astype(np.int64)
    np.add.at(X, (np.repeat(tidx, k), flat.reshape(-1)), 1.0)
    C = num_classes
    if C <= 1:
        return np.ones(1), popularity[None].copy()
    rng = np.random.default_rng(seed)
    # start from a random hard split of the tokens
    resp = np.eye(C)[rng.integers(0, C, uniq.size)]
    prior_counts = CLASS_PRIOR_STRENGTH * popularity.reshape(-1)
    for _ in range(iterations):
        theta = resp.T @ X + prior_counts[None]
        theta = theta.reshape(C, L, E)
        theta /= theta.sum(axis=2, keepdims=True)
        pi = (resp.sum(axis=0) + 1.0) / (uniq.size + C)
        ll = X @ np.log(theta.reshape(C, -1)).T + np.log(pi)[None]
        ll -= ll.max(axis=1, keepdims=True)
        resp = np.exp(ll)
        resp /= resp.sum(axis=1, keepdims=True)
    theta = (resp.T @ X + prior_counts[None]).reshape(C, L, E)
    theta /= theta.sum(axis=2, keepdims=True)
    pi = (resp.sum(axis=0) + 1.0) / (uniq.size + C)
    return pi, theta


def phase_shape(cells: TraceCells, phase: int) -> np.ndarray:
    """Cells per layer of each request in ``phase`` (distinct positions), indexed by request 0..R-1."""
    reqs = np.unique(cells.request)
    out = np.zeros(reqs.size, dtype=np.int64)
    rows = cells.phase == phase
    for i, r in enumerate(reqs):
        out[i] = np.unique(cells.position[rows & (cells.request == r)]).size
    return out


# ------------------------------------------------------------------------------------------------
# The fit
# ------------------------------------------------------------------------------------------------
def _merge(traces: Sequence[Trace]) -> TraceCells:
    parts, offset = [], 0
    for tr in traces:
        c = tr.cells
        _, req = np.unique(c.request, return_inverse=True)
        parts.append(dataclasses.replace(c, request=(req + offset).astype(np.int32), next_layer_guess=None,
                                         token_id=None, recorded_hit=None))
        offset += int(req.max()) + 1
    cat = TraceCells(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in
                        ("request", "phase", "position", "layer", "experts", "weights")})
    return cat.take(cat.execution_order())


def _init_phase(cells, depth, phase, L, E, k, edges, classes: Optional[int], seed: int, parts: frozenset,
                prior_pop: Optional[np.ndarray] = None):
    """Initial parameters and the fit's targets for one phase. ``prior_pop`` [L, E]: where the popularity's
    pseudo-counts go (uniform when None)."""
    mom = phase_moments(cells, depth, phase, L, E, edges)
    counts = mom.share * (mom.cells[:, None] * k)
    base = np.full((L, E), 1.0 / E) if prior_pop is None else prior_pop
    pseudo = POPULARITY_PSEUDO_COUNT * E * base
    pop = (counts + pseudo) / (counts.sum(axis=1, keepdims=True) + pseudo.sum(axis=1, keepdims=True))
    tokens = np.unique(cells.request[cells.phase == phase].astype(np.int64) * (1 << 32)
                       + cells.position[cells.phase == phase]).size
    C = classes if classes is not None else int(np.clip(tokens // TOKENS_PER_CLASS, 1, MAX_CLASSES))
    if "cross-layer" in parts:
        C = 1
    if "popularity" in parts:
        pop = np.full((L, E), 1.0 / E)
    prior, theta = fit_token_classes(cells, phase, L, E, pop, C, seed=seed)
    # shrink each layer's depth histogram toward the all-layer one (a layer has few cells)
    pooled = (mom.hist * mom.cells[:, None, None]).sum(axis=0) / max(mom.cells.sum(), 1)
    n = mom.cells[:, None, None]
    target = (mom.hist * n + SHRINK_CELLS * pooled[None]) / (n + SHRINK_CELLS)
    target_mom = dataclasses.replace(mom, hist=target, share=pop)
    copy = np.zeros_like(target[:, :, :-1])  # set from the excess reuse in fit_routing_cells
    drift = None if "drift" in parts else np.full(L, float(E))
    pm = PhaseModel(class_prior=prior, class_popularity=theta, depth_edges=edges, copy=copy,
                    weights=fit_weights(cells, phase, L), drift=drift)
    return pm, target_mom


def _correct(pm: PhaseModel, target: PhaseMoments, got: PhaseMoments, parts: frozenset) -> PhaseModel:
    if "locality" in parts and "popularity" in parts:
        return pm
    copy = pm.copy
    if "locality" not in parts:
        copy = np.maximum(pm.copy + (target.hist[:, :, :-1] - got.hist[:, :, :-1]), 0.0)
    total = copy.sum(axis=2, keepdims=True)
    copy = np.where(total > 0.995, copy * (0.995 / np.maximum(total, 1e-12)), copy)
    if "popularity" in parts or pm.drift is not None:
        # with the urn on, the popularity stays the maximum-likelihood fit: the urn's concentration alone is
        # matched (correcting both lets a sharp popularity and a strong urn trade off against each other)
        return _correct_drift(dataclasses.replace(pm, copy=copy), target, got)
    ratio = np.sqrt(np.maximum(target.share, 1e-9) / np.maximum(got.share, 1e-9))
    theta = pm.class_popularity * ratio[None]
    theta /= theta.sum(axis=2, keepdims=True)
    return dataclasses.replace(pm, copy=copy, class_popularity=theta)


def _correct_drift(pm: PhaseModel, target: PhaseMoments, got: PhaseMoments) -> PhaseModel:
    drift = pm.drift
    if drift is not None:
        # a request concentrates on its own working set through the urn's counts: a request's expert counts
        # more spread out (higher entropy) than the trace's -> lower the concentration
        drift = np.clip(drift * np.exp(8.0 * (target.entropy - got.entropy)), 0.01, 1e5)
    return dataclasses.replace(pm, drift=drift)


def fit_routing_cells(cells: TraceCells, shape_meta, name: str, *, classes: Optional[int] = None,
                      iterations: int = FIT_ITERATIONS, seed: int = 0, sources: Sequence[dict] = (),
                      disabled: Sequence[str] = (), log=None) -> RoutingModel:
    """Fit to ``cells`` (one or more requests, rows in execution order); ``shape_meta`` a TraceMeta.

    ``disabled`` parts are left out of the model (no locality: copy 0; no drift: None; no cross-layer: one
    token class; no popularity: uniform), as the naive baselines need.
    """
    parts = check_parts(disabled)
    meta = shape_meta
    L, E, k = meta.num_layers, meta.num_experts, meta.top_k
    edges = default_depth_edges(E, k)
    depth = request_depths(cells, L)
    has = {ph: bool((cells.phase == ph).any()) for ph in (PREFILL, DECODE)}
    if not has[DECODE]:
        raise MoesimError(f"{name}: the trace has no decode rows to fit")
    phases, targets = {}, {}
    for ph in (PREFILL, DECODE):
        if has[ph]:
            phases[ph], targets[ph] = _init_phase(cells, depth, ph, L, E, k, edges, classes, seed, parts)
    prompt_lens, output_lens = phase_shape(cells, PREFILL), phase_shape(cells, DECODE)
    per_layer_cells = max(int(prompt_lens.sum() + output_lens.sum()), 1)
    copies = int(np.ceil(FIT_MIN_CELLS / per_layer_cells))
    P, G = np.tile(prompt_lens, copies), np.tile(output_lens, copies)

    def model_of(ph: dict) -> RoutingModel:
        return RoutingModel(name=name, model=meta.model, dtype=meta.dtype, expert_bytes=tuple(meta.expert_bytes),
                            non_expert_bytes=int(meta.non_expert_bytes), decode=ph[DECODE],
                            prefill=ph.get(PREFILL), fitted_to={}, created="")

    if "locality" not in parts:
        # copies explain only the reuse that popularity, token classes and the urn do not already produce:
        # start them at the excess of the trace's depth histogram over a synthesis without copies
        res = synthesize(model_of(phases), P, G, seed=seed + 1, disabled=("locality",))
        for ph in phases:
            got = phase_moments(res.cells, res.depth, ph, L, E, edges)
            excess = np.maximum(targets[ph].hist[:, :, :-1] - got.hist[:, :, :-1], 0.0)
            phases[ph] = dataclasses.replace(phases[ph], copy=excess)
    if "locality" in parts and "drift" in parts:
        iterations = 0  # nothing is moment-matched: popularity stays the maximum-likelihood fit
    for it in range(iterations):
        res = synthesize(model_of(phases), P, G, seed=seed + 1)  # same draws every round: a steady fixed point
        err = 0.0
        for ph in phases:
            got = phase_moments(res.cells, res.depth, ph, L, E, edges)
            err = max(err, float(np.abs(got.hist - targets[ph].hist).sum(axis=2).max()) / 2)
            phases[ph] = _correct(phases[ph], targets[ph], got, parts)
        if log:
            log(f"  fit round {it + 1}/{iterations}: largest depth-histogram distance (total variation) {err:.4f}")
    fitted_to = {
        "parts_left_out": sorted(parts),
        "method": "popularity: ML with 0.5 pseudo-count; token classes: EM; weights: moments; locality (per-request "
                  "LRU stack-distance histogram per layer and rank) and drift (entropy of a request's expert counts "
                  f"per layer): moment matching through the generator, {iterations} rounds",
        "sources": list(sources),
        "requests": int(prompt_lens.size),
        "prefill_cells_per_layer": int(prompt_lens.sum()),
        "decode_cells_per_layer": int(output_lens.sum()),
        "token_classes": {("prefill" if ph == PREFILL else "decode"): int(phases[ph].num_classes) for ph in phases},
        "drift": "Polya-urn concentration per layer, moment-matched to the entropy of a request's expert counts",
    }
    m = model_of(phases)
    return dataclasses.replace(m, fitted_to=fitted_to, created=utc_now_iso())


def fit_routing(traces: Sequence[Trace], name: str, **kw) -> RoutingModel:
    if not traces:
        raise MoesimError("trace fit: expected at least one TRACE")
    first = traces[0].meta
    for tr in traces[1:]:
        m = tr.meta
        if (m.num_layers, m.num_experts, m.top_k) != (first.num_layers, first.num_experts, first.top_k):
            raise MoesimError(
                f"{tr.path}: {m.num_layers} layers x {m.num_experts} experts top-{m.top_k}, expected "
                f"{first.num_layers} x {first.num_experts} top-{first.top_k} like {traces[0].path}")
    sources = [{"path": Path(tr.path).name if tr.path else "", "sha256": sha256_of_file(tr.path) if tr.path else "",
                "model_id": tr.meta.model.model_id, "rows": len(tr)} for tr in traces]
    return fit_routing_cells(_merge(traces), first, name, sources=sources, **kw)
