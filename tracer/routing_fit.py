"""Fit a :class:`~moesim.tracer.routing.RoutingModel` to traces (``moesim trace fit``).

Per phase and layer:

- popularity: maximum likelihood with half a pseudo-count per expert (the Jeffreys prior of a categorical),
  so an expert unseen in a short trace can still appear;
- token classes (cross-layer correlation): a mixture of per-layer categoricals over the token's experts at
  all layers, fitted by EM (maximum likelihood), each class shrunk toward the layer popularity;
- routing weights: the total by its mean and standard deviation, the sorted shares by a Dirichlet whose
  mean and top-share variance match the trace (method of moments);
- which rank a copy takes from its source (``copy_rank``): counted directly, pooled over layers, from the
  pairs of cells K or fewer positions apart that share an expert;
- locality and drift by moment matching through the generator itself: synthesize the training shape,
  compare, correct, repeat. The matched moments are reuse per (layer, rank) at each lag 1..K (the source
  probabilities take the level of each lag pooled over layers, the fidelities each layer's and rank's
  departure from it; past what tokens can carry, SOURCE_CAP, the fidelities rise); the variance over tokens
  of the share of a token's experts reused from the token before (how much reuse comes in whole recurring
  tokens) for the share of layers that follow the token's source; and the share of first uses of an expert
  in a request (how far a request strays beyond its working set) for the drift concentration and the
  recalls of older tokens; and reuse at lags 1..K where the earlier cell lies in the previous phase (a
  decode token against the prompt's last tokens), pooled, for the phase boundary's ``carry``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from moesim.errors import MoesimError
from moesim.tracer.format import DECODE, PREFILL, Trace, TraceCells, sha256_of_file, utc_now_iso
from moesim.tracer.routing import PhaseModel, RoutingModel, WeightModel
from moesim.tracer.synth import check_parts, synthesize

POPULARITY_PSEUDO_COUNT = 0.5  # per expert (Jeffreys)
CLASS_PRIOR_STRENGTH = 4.0  # pseudo-counts per layer pulling each token class toward the layer popularity
TOKENS_PER_CLASS = 64  # one more token class for every 64 tokens of the phase, up to MAX_CLASSES
MAX_CLASSES = 4
SHRINK_CELLS = 32.0  # a layer's moments count as this many cells of the all-layer ones
FIT_ITERATIONS = 12
FIT_MIN_CELLS = 2048  # the fit's synthetic copies hold at least this many cells per layer and phase
LAGS = 4  # source lags 1..LAGS each have their own probability
FAR_LAG = 64  # a recall reaches back at most this far
STEP = 0.5  # damped fixed-point steps
# Each request gives the phase boundary one sample (its first decode tokens against its prompt's last), and
# a single boundary is mostly the chat template's: below this many requests with a prompt, carry stays 1
# (version 2's routing) rather than being fitted to one template.
MIN_BOUNDARY_REQUESTS = 8
SOURCE_CAP = 0.9  # tokens with a source, at most: past it, reuse is carried by higher fidelity


# ------------------------------------------------------------------------------------------------
# What a trace says (the fitted moments)
# ------------------------------------------------------------------------------------------------
def request_grid(cells: TraceCells) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every request's cells by position: experts [R, T, L, k] (-1 where a cell is missing), the phase of each
    position [R, T] (255 where the request has none) and the request ids [R]."""
    reqs, r = np.unique(cells.request, return_inverse=True)
    L = int(cells.layer.max()) + 1 if len(cells) else 1
    T = int(cells.position.max()) + 1 if len(cells) else 1
    k = cells.experts.shape[1]
    grid = np.full((reqs.size, T, L, k), -1, dtype=np.int64)
    grid[r, cells.position, cells.layer] = cells.experts
    phase = np.full((reqs.size, T), 255, dtype=np.int64)
    phase[r, cells.position] = cells.phase
    return grid, phase, reqs


@dataclass(frozen=True)
class PhaseMoments:
    near: np.ndarray  # [L, k, K] share of rank j's experts also in the cell d = 1..K positions back
    lag1_var: float  # variance over tokens of the share of a token's experts also in the token before
    first: np.ndarray  # [L] share of accesses that are an expert's first use in the request
    cells: np.ndarray  # [L]
    share: np.ndarray  # [L, E] share of accesses per expert
    rank_pairs: np.ndarray  # [k, k] counts: rank j's expert was at rank j' in a cell 1..K back
    cross: float = float("nan")  # reuse at lags 1..K where the earlier cell is of another phase (nan: none)


MOMENT_CHUNK = 20_000_000  # expert comparisons held in memory at once (requests are taken in chunks)


def _lag_counts(cells: TraceCells, phase: int, L: int, lags: int):
    """Reuse hits and pairs per (layer, rank, lag), rank pairs, and each token's lag-1 reuse share."""
    grid, phase_of, _ = request_grid(cells)
    T = phase_of.shape[1]
    k = cells.experts.shape[1]
    grid = np.pad(grid, ((0, 0), (0, 0), (0, max(L - grid.shape[2], 0)), (0, 0)), constant_values=-1)
    here = (phase_of == phase)[:, :, None] & (grid[..., 0] >= 0)  # [R, T, L] counted cells
    hits, pairs, rank_pairs, frac = np.zeros((L, k, lags)), np.zeros((L, lags)), np.zeros((k, k)), np.zeros(0)
    cross = np.zeros(2)  # hits, slots where the earlier cell is of another phase
    for d in range(1, min(lags, T - 1) + 1):
        a, b = grid[:, d:], grid[:, :-d]
        ok = here[:, d:] & (b[..., 0] >= 0)  # [R, T-d, L]
        same = (a[..., :, None] == b[..., None, :]) & ok[..., None, None]  # [R, T-d, L, k, k]
        hit = same.any(axis=-1)  # [R, T-d, L, k]
        other = ok & (phase_of[:, :-d] != phase)[:, :, None]
        cross += (float((hit & other[..., None]).sum()), float(other.sum() * k))
        hits[:, :, d - 1] = hit.sum(axis=(0, 1))
        pairs[:, d - 1] = ok.sum(axis=(0, 1))
        rank_pairs += same.sum(axis=(0, 1, 2))
        if d == 1:
            n_tok = ok.sum(axis=2)  # [R, T-1] layers counted per token
            frac = hit.sum(axis=(2, 3))[n_tok > 0] / (n_tok[n_tok > 0] * k)
    return hits, pairs, rank_pairs, frac, cross


def phase_moments(cells: TraceCells, phase: int, L: int, E: int, lags: int = LAGS) -> PhaseMoments:
    k = cells.experts.shape[1]
    reqs = np.unique(cells.request)
    per_request = (int(cells.position.max()) + 1 if len(cells) else 1) * L * k * k
    chunks = np.array_split(reqs, max(1, int(np.ceil(reqs.size * per_request / MOMENT_CHUNK))))
    hits, pairs, rank_pairs, fracs = np.zeros((L, k, lags)), np.zeros((L, lags)), np.zeros((k, k)), []
    cross = np.zeros(2)
    for chunk in chunks:
        part = cells if len(chunks) == 1 else cells.take(np.flatnonzero(np.isin(cells.request, chunk)))
        h, p, rp, f, c = _lag_counts(part, phase, L, lags)
        hits, pairs, rank_pairs, cross = hits + h, pairs + p, rank_pairs + rp, cross + c
        fracs.append(f)
    frac = np.concatenate(fracs)
    rows = cells.phase == phase
    layer = cells.layer[rows].astype(np.int64)
    n = np.bincount(layer, minlength=L).astype(np.float64)
    counts = np.zeros((L, E))
    np.add.at(counts, (np.repeat(layer, k), cells.experts[rows].astype(np.int64).reshape(-1)), 1.0)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    return PhaseMoments(near=hits / np.maximum(pairs, 1)[:, None, :], lag1_var=float(frac.var()) if frac.size > 1
                        else 0.0, first=first_use_share(cells, phase, L, E), cells=n, share=share,
                        rank_pairs=rank_pairs, cross=cross[0] / cross[1] if cross[1] else float("nan"))


def first_use_share(cells: TraceCells, phase: int, L: int, E: int) -> np.ndarray:
    """Per layer, the share of ``phase`` accesses whose expert was not used before in the request."""
    k = cells.experts.shape[1]
    key = ((cells.request.astype(np.int64) * L + cells.layer) * E)[:, None] + cells.experts.astype(np.int64)
    pos = np.repeat(cells.position.astype(np.int64), k)
    key = key.reshape(-1)
    order = np.lexsort((pos, key))
    first = np.zeros(key.size, dtype=bool)
    first[order] = np.diff(key[order], prepend=-1) != 0
    rows = np.repeat(cells.phase == phase, k)
    layer = np.repeat(cells.layer.astype(np.int64), k)
    n = np.bincount(layer[rows], minlength=L)
    return np.bincount(layer[rows], weights=first[rows], minlength=L) / np.maximum(n, 1)


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


def _shrunk(per_layer: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Each layer's moment (first axis) pulled toward the all-layer one, weighted by the layer's cells ``n``."""
    w = n.reshape((-1,) + (1,) * (per_layer.ndim - 1))
    pooled = (per_layer * w).sum(axis=0) / max(float(n.sum()), 1.0)
    return (per_layer * w + SHRINK_CELLS * pooled[None]) / (w + SHRINK_CELLS)


def _init_phase(cells, phase, L, E, k, far_lag, classes: Optional[int], seed: int, parts: frozenset):
    """Initial parameters (no locality yet) and the fit's targets for one phase."""
    mom = phase_moments(cells, phase, L, E, LAGS)
    counts = mom.share * (mom.cells[:, None] * k)
    pseudo = POPULARITY_PSEUDO_COUNT
    pop = (counts + pseudo) / (counts.sum(axis=1, keepdims=True) + pseudo * E)
    tokens = np.unique(cells.request[cells.phase == phase].astype(np.int64) * (1 << 32)
                       + cells.position[cells.phase == phase]).size
    C = classes if classes is not None else int(np.clip(tokens // TOKENS_PER_CLASS, 1, MAX_CLASSES))
    if "cross-layer" in parts:
        C = 1
    if "popularity" in parts:
        pop = np.full((L, E), 1.0 / E)
    prior, theta = fit_token_classes(cells, phase, L, E, pop, C, seed=seed)
    target = dataclasses.replace(mom, near=_shrunk(mom.near, mom.cells),
                                 first=_shrunk(mom.first, mom.cells), share=pop)
    copy_rank = (mom.rank_pairs + 0.5) / (mom.rank_pairs + 0.5).sum(axis=1, keepdims=True)
    drift = None if "drift" in parts else np.full(L, float(E))
    pm = PhaseModel(class_prior=prior, class_popularity=theta, source=np.zeros(LAGS + 1), far_lag=far_lag,
                    fidelity=np.zeros((L, k)), copy_rank=copy_rank, weights=fit_weights(cells, phase, L),
                    drift=drift, source_sharing=0.0 if "cross-layer" in parts else 1.0)
    return pm, target


def _correct(pm: PhaseModel, target: PhaseMoments, got: PhaseMoments) -> PhaseModel:
    """One damped step of the moment matching (see the module docstring)."""
    err_near = target.near - got.near  # [L, k, K]
    pooled_near = err_near.mean(axis=(0, 1))
    fid = pm.fidelity
    mean_fid = max(float(fid.mean()), 0.05)
    source = pm.source.copy()
    source[:-1] += STEP * pooled_near / mean_fid
    source[-1] += STEP * float((got.first - target.first).mean()) / (mean_fid * max(float(got.first.mean()), 0.01))
    source = np.maximum(source, 0.0)
    if source.sum() > SOURCE_CAP:
        # tokens have one source each: more reuse than the sources can carry comes from higher fidelity
        fid = np.clip(fid * source.sum() / SOURCE_CAP, 0.0, 1.0)
        source *= SOURCE_CAP / source.sum()
    departure = (err_near - pooled_near).sum(axis=2)
    fid = np.clip(fid + STEP * departure / max(float(pm.source[:-1].sum()), 0.02), 0.0, 1.0)
    sharing = pm.source_sharing
    if sharing > 0 or target.lag1_var > got.lag1_var:
        # layers following one source together make lag-1 reuse vary more from token to token
        sharing = float(np.clip(sharing + STEP * (target.lag1_var - got.lag1_var) / max(got.lag1_var, 1e-4), 0, 1))
    drift = pm.drift
    if drift is not None:
        # a smaller concentration keeps a request on fewer experts: more reuse at long lags
        drift = np.clip(drift * (np.maximum(target.first, 1e-4) / np.maximum(got.first, 1e-4)), 0.01, 1e5)
    carry = pm.carry
    if np.isfinite(target.cross) and np.isfinite(got.cross):
        # decode tokens that reuse the prompt's last tokens less than a kept source would: drop more of it
        near_copy = max(float(pm.source[:-1].sum()) * mean_fid, 0.05)
        carry = float(np.clip(carry + STEP * (target.cross - got.cross) / near_copy, 0.0, 1.0))
    return dataclasses.replace(pm, source=source, fidelity=fid, drift=drift, source_sharing=sharing, carry=carry)


def _start_locality(pm: PhaseModel, target: PhaseMoments, got: PhaseMoments) -> PhaseModel:
    """Copies explain only the reuse that popularity, token classes and the urn do not already produce:
    start the near sources at the excess of the trace's reuse over a synthesis without copies."""
    fid = 0.8
    source = np.append(np.maximum((target.near - got.near).mean(axis=(0, 1)) / fid, 0.0), 0.0)
    if source.sum() > 0.9:
        source *= 0.9 / source.sum()
    return dataclasses.replace(pm, source=source, fidelity=np.full_like(pm.fidelity, fid))


def fit_routing_cells(cells: TraceCells, shape_meta, name: str, *, classes: Optional[int] = None,
                      iterations: int = FIT_ITERATIONS, seed: int = 0, sources: Sequence[dict] = (),
                      disabled: Sequence[str] = (), log=None) -> RoutingModel:
    """Fit to ``cells`` (one or more requests, rows in execution order); ``shape_meta`` a TraceMeta.

    ``disabled`` parts are left out of the model (no locality: no sources; no drift: None; no cross-layer:
    one token class and a source per layer; no popularity: uniform), as the naive baselines need.
    """
    parts = check_parts(disabled)
    meta = shape_meta
    L, E, k = meta.num_layers, meta.num_experts, meta.top_k
    has = {ph: bool((cells.phase == ph).any()) for ph in (PREFILL, DECODE)}
    if not has[DECODE]:
        raise MoesimError(f"{name}: the trace has no decode rows to fit")
    prompt_lens, output_lens = phase_shape(cells, PREFILL), phase_shape(cells, DECODE)
    far_lag = int(np.clip((prompt_lens + output_lens).max() - 1, LAGS + 1, FAR_LAG))
    phases, targets = {}, {}
    for ph in (PREFILL, DECODE):
        if has[ph]:
            phases[ph], targets[ph] = _init_phase(cells, ph, L, E, k, far_lag, classes, seed, parts)
    boundaries = int(((prompt_lens > 0) & (output_lens > 0)).sum())
    keep_boundary = "phase-boundary" in parts or boundaries < MIN_BOUNDARY_REQUESTS
    per_layer_cells = max(int(prompt_lens.sum() + output_lens.sum()), 1)
    copies = int(np.ceil(FIT_MIN_CELLS / per_layer_cells))
    P, G = np.tile(prompt_lens, copies), np.tile(output_lens, copies)

    def model_of(ph: dict) -> RoutingModel:
        return RoutingModel(name=name, model=meta.model, dtype=meta.dtype, expert_bytes=tuple(meta.expert_bytes),
                            non_expert_bytes=int(meta.non_expert_bytes), decode=ph[DECODE],
                            prefill=ph.get(PREFILL), fitted_to={}, created="")

    def moments_of(res, ph) -> PhaseMoments:
        return phase_moments(res.cells, ph, L, E, LAGS)

    if "locality" not in parts:
        res = synthesize(model_of(phases), P, G, seed=seed + 1, disabled=("locality",))
        for ph in phases:
            phases[ph] = _start_locality(phases[ph], targets[ph], moments_of(res, ph))
    if "locality" in parts and "drift" in parts:
        iterations = 0  # nothing is moment-matched: popularity stays the maximum-likelihood fit
    for it in range(iterations):
        res = synthesize(model_of(phases), P, G, seed=seed + 1)  # same draws every round: a steady fixed point
        err = 0.0
        for ph in phases:
            got = moments_of(res, ph)
            err = max(err, float(np.abs(got.near - targets[ph].near).mean(axis=(0, 1)).max()))
            phases[ph] = _correct(phases[ph], targets[ph], got)
            if "cross-layer" in parts:
                phases[ph] = dataclasses.replace(phases[ph], source_sharing=0.0)
            if keep_boundary:
                phases[ph] = dataclasses.replace(phases[ph], carry=1.0)
            if "locality" in parts:
                phases[ph] = dataclasses.replace(phases[ph], source=np.zeros(LAGS + 1), fidelity=np.zeros((L, k)))
        if log:
            log(f"  fit round {it + 1}/{iterations}: largest gap in reuse at a lag 1-{LAGS}, mean of layers {err:.4f}")
    fitted_to = {
        "parts_left_out": sorted(parts),
        "method": "popularity: ML with 0.5 pseudo-count; token classes: EM; weights: moments; copy ranks: counted; "
                  f"locality (reuse per layer and rank at lags 1-{LAGS}; variance over tokens of lag-1 reuse for "
                  "the source sharing; reuse of the previous phase's last tokens for the phase boundary's carry) "
                  "and drift (share of first uses of an expert in a request): moment "
                  f"matching through the generator, {iterations} rounds",
        "sources": list(sources),
        "phase_boundary": (f"carry fitted on {boundaries} requests with a prompt" if boundaries >= MIN_BOUNDARY_REQUESTS
                           else f"carry kept at 1: {boundaries} request(s) with a prompt, fewer than "
                                f"{MIN_BOUNDARY_REQUESTS} boundaries to fit it on"),
        "requests": int(prompt_lens.size),
        "prefill_cells_per_layer": int(prompt_lens.sum()),
        "decode_cells_per_layer": int(output_lens.sum()),
        "token_classes": {("prefill" if ph == PREFILL else "decode"): int(phases[ph].num_classes) for ph in phases},
        "drift": "Polya-urn concentration per layer, moment-matched to the share of first uses in a request",
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
