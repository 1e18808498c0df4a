"""Fit a :class:`~moesim.tracer.routing.RoutingModel` to traces (``moesim trace fit``).

Per phase and layer:

- popularity: the posterior mean under a symmetric Dirichlet whose pseudo-count per expert maximizes the
  evidence of every layer's counts (empirical Bayes, :func:`popularity_pseudo_count`), so an expert unseen
  in a short trace can still appear without a fixed prior flattening a peaked router; then turned into the
  weights of draws without replacement whose top-k picks hold those shares (:func:`draw_weights`);
- token classes (cross-layer correlation): a mixture of per-layer categoricals over the token's experts at
  all layers, fitted by EM (maximum likelihood), each class shrunk toward the layer popularity;
- routing weights: the total by its mean and standard deviation, the sorted shares by a Dirichlet whose
  mean and top-share variance match the trace (method of moments);
- which rank a copy takes from its source (``copy_rank``): counted directly, pooled over layers, from the
  pairs of cells K or fewer positions apart that share an expert;
- locality and drift by moment matching through the generator itself: synthesize the training shape,
  compare, correct, repeat. The matched moments are reuse per (layer, rank) at each lag 1..K (the source
  probabilities take the level of each lag pooled over layers, half from the reuse at that lag and half from
  the reuse whose latest use was that lag back, the fidelities each layer's and rank's departure from it;
  past what tokens can carry, SOURCE_CAP, the fidelities rise); the variance over tokens of the share of a
  token's experts reused from the token before (how much reuse comes in whole recurring tokens) for the
  share of layers that follow the token's source; the share of first uses of an expert in a request
  (how far a request strays beyond its working set) for the recalls of older tokens, and for the drift
  concentration where the phase has fewer than SPREAD_MIN_REQUESTS requests; with that many or more, the
  drift follows the spread of the requests' own expert shares around the phase's (:func:`request_spread`),
  which says directly how much requests differ (a prompt covers most experts, so decode's first uses are
  too few to fit it on: the demo trace's 0.1-0.7% drove two layers' drift to its floor, each request's
  decode onto a few experts, and its held-out entropy 0.014-0.020 under the real); and reuse at lags 1..K
  where the earlier cell lies in the previous phase (a decode token against the prompt's last tokens), pooled,
  for the phase boundary's ``carry``. The damped steps can circle the fixed point, so the round whose synthesis
  came closest (:func:`_moment_gap`) is kept, judged on a second synthesis with other draws than the one the
  corrections use.

Phase edges (where 8 or more requests have a prompt): the positions next to the boundary, one after the other,
whose expert shares lie further from their phase's (total variation, mean of layers) than 3x a position inside
the phase does and than 0.1 (:func:`find_edge`), up to 8 a side; their popularity is the posterior mean of their
counts (the phase's pseudo-count), and the phase's own popularity and token classes are fitted to the cells off
the edges; each edge position's copy chance is moment-matched to its reuse of the cell before. Decode with an
edge has carry 0: the reuse across the boundary is the edges'.

Request groups: each request's reuse at lags 1 and 4 (per phase), a Gaussian mixture over requests with
the number of groups chosen by BIC; each group is then fitted as above on its own requests, its share the
fraction of requests in it. The model's top-level phases stay the fit to all requests.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from moesim.errors import MoesimError
from moesim.tracer.format import DECODE, PREFILL, Trace, TraceCells, sha256_of_file, utc_now_iso
from moesim.tracer.routing import PhaseModel, RequestGroup, RoutingModel, WeightModel
from moesim.tracer.synth import check_parts, synthesize

PSEUDO_COUNT_BOUNDS = (0.01, 1.0)  # per expert: the empirical-Bayes pseudo-count is sought in this range
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
SPREAD_MIN_REQUESTS = 8  # below this many requests in a phase, its drift follows the first-use share instead
SPREAD_STEP_CLIP = 4.0  # a round moves the drift by (spread ratio)^2 within this factor^2 either way
SOURCE_CAP = 0.9  # tokens with a source, at most: past it, reuse is carried by higher fidelity
MAX_EDGE = 8  # phase edge positions, at most
EDGE_NOISE_POSITIONS = 16  # positions inside a phase (from 2 * MAX_EDGE on) whose distance gives the noise level
EDGE_NOISE_FACTOR = 3.0  # an edge position lies this many times further from its phase's shares than the noise
EDGE_MIN_DISTANCE = 0.1  # ... and further than this (total variation, mean of layers)
EDGE_MIN_REQUESTS = MIN_BOUNDARY_REQUESTS  # requests a position needs to count
MAX_GROUPS = 4  # request groups, at most
GROUP_MIN_REQUESTS = 8  # requests per request group the BIC search may ask for, at least (on average)
GROUP_MIN_CELLS = 16  # a phase's positions every request needs for its reuse to be a grouping feature (fewer: noise)
GROUP_MIN_SPREAD = 0.05  # requests whose reuse shares all lie within this form one group
GROUP_REG_COVAR = 1e-3  # variance floor of the mixture (sd 0.03): reuse within a few points is one regime


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
    latest: Optional[np.ndarray] = None  # [L, k, K] share of rank j's experts last used d = 1..K positions back
    spread: Optional[np.ndarray] = None  # [L] request_spread (None: too few requests in the phase)


MOMENT_CHUNK = 20_000_000  # expert comparisons held in memory at once (requests are taken in chunks)


def _lag_counts(cells: TraceCells, phase: int, L: int, lags: int):
    """Reuse hits and pairs per (layer, rank, lag), rank pairs, and each token's lag-1 reuse share."""
    grid, phase_of, _ = request_grid(cells)
    T = phase_of.shape[1]
    k = cells.experts.shape[1]
    grid = np.pad(grid, ((0, 0), (0, 0), (0, max(L - grid.shape[2], 0)), (0, 0)), constant_values=-1)
    here = (phase_of == phase)[:, :, None] & (grid[..., 0] >= 0)  # [R, T, L] counted cells
    hits, pairs, rank_pairs, frac = np.zeros((L, k, lags)), np.zeros((L, lags)), np.zeros((k, k)), np.zeros(0)
    latest = np.zeros((L, k, lags))
    seen = np.zeros(grid.shape, dtype=bool)  # [R, T, L, k]: the expert was in a cell fewer than d back
    cross = np.zeros(2)  # hits, slots where the earlier cell is of another phase
    for d in range(1, min(lags, T - 1) + 1):
        a, b = grid[:, d:], grid[:, :-d]
        ok = here[:, d:] & (b[..., 0] >= 0)  # [R, T-d, L]
        same = (a[..., :, None] == b[..., None, :]) & ok[..., None, None]  # [R, T-d, L, k, k]
        hit = same.any(axis=-1)  # [R, T-d, L, k]
        other = ok & (phase_of[:, :-d] != phase)[:, :, None]
        cross += (float((hit & other[..., None]).sum()), float(other.sum() * k))
        hits[:, :, d - 1] = hit.sum(axis=(0, 1))
        latest[:, :, d - 1] = (hit & ~seen[:, d:]).sum(axis=(0, 1))
        seen[:, d:] |= hit
        pairs[:, d - 1] = ok.sum(axis=(0, 1))
        rank_pairs += same.sum(axis=(0, 1, 2))
        if d == 1:
            n_tok = ok.sum(axis=2)  # [R, T-1] layers counted per token
            frac = hit.sum(axis=(2, 3))[n_tok > 0] / (n_tok[n_tok > 0] * k)
    return hits, pairs, rank_pairs, frac, cross, latest


def phase_moments(cells: TraceCells, phase: int, L: int, E: int, lags: int = LAGS) -> PhaseMoments:
    k = cells.experts.shape[1]
    reqs = np.unique(cells.request)
    per_request = (int(cells.position.max()) + 1 if len(cells) else 1) * L * k * k
    chunks = np.array_split(reqs, max(1, int(np.ceil(reqs.size * per_request / MOMENT_CHUNK))))
    hits, pairs, rank_pairs, fracs = np.zeros((L, k, lags)), np.zeros((L, lags)), np.zeros((k, k)), []
    cross, latest = np.zeros(2), np.zeros((L, k, lags))
    for chunk in chunks:
        part = cells if len(chunks) == 1 else cells.take(np.flatnonzero(np.isin(cells.request, chunk)))
        h, p, rp, f, c, lt = _lag_counts(part, phase, L, lags)
        hits, pairs, rank_pairs, cross, latest = hits + h, pairs + p, rank_pairs + rp, cross + c, latest + lt
        fracs.append(f)
    frac = np.concatenate(fracs)
    n = np.bincount(cells.layer[cells.phase == phase].astype(np.int64), minlength=L).astype(np.float64)
    counts = access_counts(cells, phase, L, E)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    return PhaseMoments(near=hits / np.maximum(pairs, 1)[:, None, :], lag1_var=float(frac.var()) if frac.size > 1
                        else 0.0, first=first_use_share(cells, phase, L, E), cells=n, share=share,
                        rank_pairs=rank_pairs, cross=cross[0] / cross[1] if cross[1] else float("nan"),
                        latest=latest / np.maximum(pairs, 1)[:, None, :], spread=request_spread(cells, phase, L, E))


def request_spread(cells: TraceCells, phase: int, L: int, E: int) -> Optional[np.ndarray]:
    """[L] how far a request's own expert shares in ``phase`` lie from the phase's pooled shares: the mean over
    requests of the squared distance (None below SPREAD_MIN_REQUESTS requests in the phase)."""
    counts = access_counts(cells, phase, L, E, by_request=True)  # [R, L, E]
    if counts.shape[0] < SPREAD_MIN_REQUESTS:
        return None
    seen = counts.sum(axis=2, keepdims=True)
    share = counts / np.maximum(seen, 1)
    pooled = counts.sum(axis=0) / np.maximum(seen.sum(axis=0), 1)
    has = seen[..., 0] > 0  # [R, L]
    dist = ((share - pooled[None]) ** 2).sum(axis=2)
    return (dist * has).sum(axis=0) / np.maximum(has.sum(axis=0), 1)


def access_counts(cells: TraceCells, phase: int, L: int, E: int, by_request: bool = False) -> np.ndarray:
    """[L, E] how many of ``phase``'s cells hold each expert; ``by_request``: [R, L, E], one row per request
    that has cells in the phase (in request-id order)."""
    rows = cells.phase == phase
    k = cells.experts.shape[1]
    index = (np.repeat(cells.layer[rows].astype(np.int64), k), cells.experts[rows].astype(np.int64).reshape(-1))
    if by_request:
        reqs, r = np.unique(cells.request[rows], return_inverse=True)
        counts = np.zeros((reqs.size, L, E))
        index = (np.repeat(r, k),) + index
    else:
        counts = np.zeros((L, E))
    np.add.at(counts, index, 1.0)
    return counts


@dataclass(frozen=True)
class BoundaryProfile:
    """Cells at offsets from each request's first decode position (-1: the prompt's last), across requests."""

    requests: np.ndarray  # int [n] requests that have the offset
    reuse: np.ndarray  # [n] share of a cell's experts also in the cell one position before (mean of layers)
    distance: np.ndarray  # [n] total variation of the offset's expert shares from its phase's (mean of layers)
    shares: np.ndarray  # [n, L, E] expert counts at the offset (not normalized)


def boundary_profile(cells: TraceCells, offsets: Sequence[int], E: int) -> BoundaryProfile:
    grid, phase, _ = request_grid(cells)  # [R, T, L, k]
    L = grid.shape[2]
    first_decode = (phase == PREFILL).sum(axis=1)
    decode_len = (phase == DECODE).sum(axis=1)

    def counts(c: np.ndarray) -> np.ndarray:  # cells [n, L, k] -> [L, E]
        out = np.zeros((L, E))
        np.add.at(out, (np.broadcast_to(np.arange(L)[None, :, None], c.shape), c), 1.0)
        return out

    def normalized(c: np.ndarray) -> np.ndarray:
        return c / np.maximum(c.sum(axis=1, keepdims=True), 1.0)

    whole = {ph: normalized(counts(grid[phase == ph])) for ph in (PREFILL, DECODE)}
    n, reuse, distance, shares = [], [], [], []
    for d in offsets:
        has = (d < decode_len) if d >= 0 else (first_decode + d >= 0)
        rows = np.flatnonzero(has)
        pos = first_decode[rows] + d
        now = grid[rows, pos]
        c = counts(now)
        later = pos >= 1  # a cell before it exists
        before = grid[rows[later], pos[later] - 1]
        n.append(rows.size)
        reuse.append(float((now[later][..., :, None] == before[..., None, :]).any(axis=-1).mean())
                     if later.any() else 0.0)
        distance.append(float(0.5 * np.abs(normalized(c) - whole[DECODE if d >= 0 else PREFILL]).sum(axis=1).mean())
                        if rows.size else 0.0)
        shares.append(c)
    return BoundaryProfile(requests=np.asarray(n, dtype=np.int64),
                           reuse=np.asarray(reuse), distance=np.asarray(distance),
                           shares=np.asarray(shares).reshape(len(offsets), L, E))


def edge_offsets(phase: int, B: int) -> list[int]:
    """A phase's B edge positions as offsets from the first decode position, edge index 0 first."""
    return list(range(-B, 0)) if phase == PREFILL else list(range(B))


def find_edge(cells: TraceCells, phase: int, E: int) -> int:
    """How many positions at ``phase``'s side of the boundary route unlike the rest of the phase: the positions
    next to the boundary, one after the other, whose expert shares lie further from the phase's (total
    variation) than EDGE_NOISE_FACTOR times a position inside the phase does (the noise of as many requests'
    cells), and than EDGE_MIN_DISTANCE; each with at least EDGE_MIN_REQUESTS requests. 0: no edge."""
    # offsets from the first decode position, outward from the boundary (-1: the prompt's last)
    outward = (lambda i: -1 - i) if phase == PREFILL else (lambda i: i)
    near = [outward(i) for i in range(MAX_EDGE)]
    inside = [outward(2 * MAX_EDGE + i) for i in range(EDGE_NOISE_POSITIONS)]
    profile = boundary_profile(cells, near + inside, E)
    counted = profile.requests[MAX_EDGE:] >= EDGE_MIN_REQUESTS
    if not counted.any():
        return 0  # no position inside the phase to tell an edge from noise
    threshold = max(EDGE_MIN_DISTANCE, EDGE_NOISE_FACTOR * float(np.median(profile.distance[MAX_EDGE:][counted])))
    beyond = (profile.distance[:MAX_EDGE] > threshold) & (profile.requests[:MAX_EDGE] >= EDGE_MIN_REQUESTS)
    return int(np.argmin(beyond)) if not beyond.all() else MAX_EDGE


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


def popularity_pseudo_count(counts: np.ndarray) -> float:
    """The pseudo-count per expert that maximizes the Dirichlet-multinomial evidence of the layers' access
    counts ``counts`` [L, E] under one symmetric Dirichlet (empirical Bayes). A fixed Jeffreys 0.5 adds 64
    pseudo-accesses per layer at 128 experts: on gpt-oss's 64 decode tokens (top-2, 128 accesses per layer) a
    third of the fitted popularity was spread evenly over every expert. A router that concentrates gets a
    small pseudo-count, a flat one a large one.
    (A cell's k experts are distinct, not k independent draws: the evidence is an approximation.)"""
    from scipy.optimize import minimize_scalar
    from scipy.special import gammaln

    counts = np.asarray(counts, dtype=np.float64)
    E = counts.shape[1]
    n = counts.sum(axis=1)

    def negative_evidence(log_a: float) -> float:
        a = float(np.exp(log_a))
        return -float((gammaln(E * a) - gammaln(n + E * a)).sum() + (gammaln(counts + a) - gammaln(a)).sum())

    lo, hi = np.log(PSEUDO_COUNT_BOUNDS[0]), np.log(PSEUDO_COUNT_BOUNDS[1])
    found = minimize_scalar(negative_evidence, bounds=(lo, hi), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(found.x))


def draw_weights(share: np.ndarray, k: int) -> np.ndarray:
    """Weights of successive draws without replacement (last axis) whose top-``k`` picks hold each expert
    ``share`` of the time (shares of a cell's k slots, so k * share is the chance an expert is in a cell).

    A cell holds k different experts, so drawing them one by one from the shares themselves under-picks the
    popular ones (with 8 experts, top-2 and a 36% expert, by up to 4 points). Rosen's approximation of
    successive sampling, pi_e = 1 - exp(-tau w_e), inverts in closed form: w_e ~ -ln(1 - k share_e); it leaves
    up to 1.2 points at top-2 of 8 and under 0.1 at top-6 of 128. Top-2 (Mixtral, gpt-oss) has an exact
    inclusion chance, which a few fixed-point steps from Rosen's start then match (checked by sampling in the
    tests)."""
    if k <= 1:
        return share
    target = np.minimum(k * np.asarray(share, dtype=np.float64), 1.0 - 1e-9)
    w = -np.log1p(-target)
    w = w / np.maximum(w.sum(axis=-1, keepdims=True), 1e-300)
    if k == 2:
        # top-2 has an exact inclusion chance, pi_e = w_e (1 + sum_f w_f / (1 - w_f) - w_e / (1 - w_e)):
        # a few multiplicative steps take Rosen's start the rest of the way
        for _ in range(60):
            odds = w / np.maximum(1.0 - w, 1e-12)
            pi = w * (1.0 + odds.sum(axis=-1, keepdims=True) - odds)
            w = w * np.sqrt(np.maximum(target, 1e-300) / np.maximum(pi, 1e-300))
            w = np.minimum(w / np.maximum(w.sum(axis=-1, keepdims=True), 1e-300), 1.0 - 1e-9)
    return w


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


def _init_phase(cells, phase, L, E, k, far_lag, classes: Optional[int], seed: int, parts: frozenset,
                steady: Optional[TraceCells] = None):
    """Initial parameters (no locality yet) and the fit's targets for one phase. ``steady``: the cells off the
    phase edges, which the popularity and token classes are fitted to (None: all cells)."""
    mom = phase_moments(cells, phase, L, E, LAGS)
    cells = cells if steady is None else steady
    counts = access_counts(cells, phase, L, E)
    pseudo = popularity_pseudo_count(counts)
    pop = (counts + pseudo) / (counts.sum(axis=1, keepdims=True) + pseudo * E)
    tokens = np.unique(cells.request[cells.phase == phase].astype(np.int64) * (1 << 32)
                       + cells.position[cells.phase == phase]).size
    C = classes if classes is not None else int(np.clip(tokens // TOKENS_PER_CLASS, 1, MAX_CLASSES))
    if "cross-layer" in parts:
        C = 1
    if "popularity" in parts:
        pop = np.full((L, E), 1.0 / E)
    prior, theta = fit_token_classes(cells, phase, L, E, pop, C, seed=seed)
    # the classes keep their tilts; the marginal becomes weights whose top-k draws hold the trace's shares
    marginal = np.einsum("c,cle->le", prior, theta)
    theta = theta * (draw_weights(marginal, k) / np.maximum(marginal, 1e-300))[None]
    theta = theta / theta.sum(axis=2, keepdims=True)
    target = dataclasses.replace(mom, near=_shrunk(mom.near, mom.cells), latest=_shrunk(mom.latest, mom.cells),
                                 first=_shrunk(mom.first, mom.cells), share=pop)
    copy_rank = (mom.rank_pairs + 0.5) / (mom.rank_pairs + 0.5).sum(axis=1, keepdims=True)
    drift = None if "drift" in parts else np.full(L, float(E))
    pm = PhaseModel(class_prior=prior, class_popularity=theta, source=np.zeros(LAGS + 1), far_lag=far_lag,
                    fidelity=np.zeros((L, k)), copy_rank=copy_rank, weights=fit_weights(cells, phase, L),
                    drift=drift, source_sharing=0.0 if "cross-layer" in parts else 1.0)
    return pm, target, pseudo


def _correct(pm: PhaseModel, target: PhaseMoments, got: PhaseMoments) -> PhaseModel:
    """One damped step of the moment matching (see the module docstring)."""
    err_near = target.near - got.near  # [L, k, K]
    pooled_near = err_near.mean(axis=(0, 1))
    # reuse at lag d says how much comes back from d tokens ago, but a token that repeats the one before also
    # reuses the one two back through it; reuse whose latest use was d back says which lag a repeat comes
    # from. Matched on either alone, repeats of the token before spread over every lag (a near-certain repeat
    # left at 0.8 a request), or the per-lag levels drift (gemma-4 held out): the sources follow both
    pooled_lag = 0.5 * (pooled_near + (target.latest - got.latest).mean(axis=(0, 1)))
    fid = pm.fidelity
    mean_fid = max(float(fid.mean()), 0.05)
    source = pm.source.copy()
    source[:-1] += STEP * pooled_lag / mean_fid
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
        if target.spread is not None and got.spread is not None:
            # with requests enough, how far each request's experts stray from the others' says it directly
            # (squared: sampling noise the drift cannot move is part of the spread; with the plain ratio the
            # demo's held-out LRU/layer gap was 0.81 points over 6 fit seeds, squared 0.73)
            ratio = np.clip(got.spread / np.maximum(target.spread, 1e-6), 1 / SPREAD_STEP_CLIP, SPREAD_STEP_CLIP) ** 2
        else:
            ratio = np.maximum(target.first, 1e-4) / np.maximum(got.first, 1e-4)
        drift = np.clip(drift * ratio, 0.01, 1e5)
    carry = pm.carry
    if np.isfinite(target.cross) and np.isfinite(got.cross):
        # decode tokens that reuse the prompt's last tokens less than a kept source would: drop more of it
        near_copy = max(float(pm.source[:-1].sum()) * mean_fid, 0.05)
        carry = float(np.clip(carry + STEP * (target.cross - got.cross) / near_copy, 0.0, 1.0))
    return dataclasses.replace(pm, source=source, fidelity=fid, drift=drift, source_sharing=sharing, carry=carry)


def _on_edge(cells: TraceCells, edges: dict[int, int]) -> np.ndarray:
    """Which rows lie on a phase edge: the prompt's last ``edges[PREFILL]`` positions, decode's first
    ``edges[DECODE]``."""
    reqs, r = np.unique(cells.request, return_inverse=True)
    prompt = np.zeros(reqs.size, dtype=np.int64)  # each request's prompt length: its first decode position
    pre = cells.phase == PREFILL
    np.maximum.at(prompt, r[pre], cells.position[pre].astype(np.int64) + 1)
    offset = cells.position.astype(np.int64) - prompt[r]
    return ((cells.phase == PREFILL) & (offset >= -edges.get(PREFILL, 0))) | \
        ((cells.phase == DECODE) & (offset < edges.get(DECODE, 0)))


def _fit_edges(cells: TraceCells, phases: dict, edges: dict[int, int], pseudo: dict, E: int, k: int,
               parts: frozenset) -> dict:
    """Gives each phase with an edge of ``edges[phase]`` positions (:func:`find_edge`) its edge popularity (the
    posterior mean of the edge positions' expert counts, as draw weights) and a first edge copy (the positions'
    reuse of the cell before); decode with an edge gets carry 0. Returns each such phase's edge reuse, the
    target of :func:`_correct_edge`."""
    targets = {}
    for ph, B in edges.items():
        profile = boundary_profile(cells, edge_offsets(ph, B), E)
        share = (profile.shares + pseudo[ph]) / (profile.shares.sum(axis=2, keepdims=True) + pseudo[ph] * E)
        targets[ph] = profile.reuse
        phases[ph] = dataclasses.replace(
            phases[ph], edge_popularity=draw_weights(share, k),
            edge_copy=np.zeros(B) if "locality" in parts else profile.reuse.copy(),
            carry=0.0 if ph == DECODE else phases[ph].carry)
    return targets


def _correct_edge(pm: PhaseModel, phase: int, target: np.ndarray, synthetic: TraceCells, E: int,
                  parts: frozenset) -> PhaseModel:
    """One damped step of the edge copies toward the trace's reuse of the cell before, position by position;
    decode's carry stays 0 (the reuse across the boundary is the edges')."""
    carry = 0.0 if phase == DECODE else pm.carry
    if "locality" in parts:
        return dataclasses.replace(pm, carry=carry)
    got = boundary_profile(synthetic, edge_offsets(phase, pm.edge_positions), E).reuse
    return dataclasses.replace(pm, edge_copy=np.clip(pm.edge_copy + STEP * (target - got), 0.0, 1.0), carry=carry)


def _moment_gap(target: PhaseMoments, got: PhaseMoments, boundary: bool = True) -> float:
    """How far a synthesis is from the trace on the matched moments: the largest reuse gap over lags 1..K
    (mean of layers and ranks), plus the mean first-use gap and, where ``boundary`` is fitted, the
    phase-boundary reuse gap."""
    gap = float(np.abs(got.near - target.near).mean(axis=(0, 1)).max()) + float(np.abs(got.first - target.first).mean())
    if boundary and np.isfinite(target.cross) and np.isfinite(got.cross):
        gap += abs(float(target.cross - got.cross))
    return gap


def _start_locality(pm: PhaseModel, target: PhaseMoments, got: PhaseMoments) -> PhaseModel:
    """Copies explain only the reuse that popularity, token classes and the urn do not already produce:
    start the near sources at the excess of the trace's reuse over a synthesis without copies."""
    fid = 0.8
    source = np.append(np.maximum((target.near - got.near).mean(axis=(0, 1)) / fid, 0.0), 0.0)
    if source.sum() > 0.9:
        source *= 0.9 / source.sum()
    return dataclasses.replace(pm, source=source, fidelity=np.full_like(pm.fidelity, fid))


def _fit_phases(cells: TraceCells, meta, name: str, *, classes: Optional[int], iterations: int, seed: int,
                parts: frozenset, min_boundaries: int = MIN_BOUNDARY_REQUESTS, log=None):
    """One set of phase models for every request in ``cells``: ({phase: PhaseModel}, what it rests on).

    ``min_boundaries``: below this many requests with both phases, carry stays 1 (version 2's routing); a
    request group's fit asks for one, where the fit to all requests had enough to fit its own."""
    L, E, k = meta.num_layers, meta.num_experts, meta.top_k
    has = {ph: bool((cells.phase == ph).any()) for ph in (PREFILL, DECODE)}
    if not has[DECODE]:
        raise MoesimError(f"{name}: the trace has no decode rows to fit")
    prompt_lens, output_lens = phase_shape(cells, PREFILL), phase_shape(cells, DECODE)
    far_lag = int(np.clip((prompt_lens + output_lens).max() - 1, LAGS + 1, FAR_LAG))
    boundaries = int(((prompt_lens > 0) & (output_lens > 0)).sum())
    keep_boundary = "phase-boundary" in parts or boundaries < max(min_boundaries, 1)
    edges = {} if keep_boundary else {ph: find_edge(cells, ph, E) for ph in (PREFILL, DECODE) if has[ph]}
    edges = {ph: B for ph, B in edges.items() if B}
    # popularity and token classes are the steady phase's: the edge positions have their own
    steady = cells.take(np.flatnonzero(~_on_edge(cells, edges))) if edges else None
    phases, targets, pseudo = {}, {}, {}
    for ph in (PREFILL, DECODE):
        if has[ph]:
            phases[ph], targets[ph], pseudo[ph] = _init_phase(cells, ph, L, E, k, far_lag, classes, seed, parts,
                                                              steady=steady)
    if keep_boundary:
        phases = {ph: dataclasses.replace(pm, carry=1.0) for ph, pm in phases.items()}
    edge_reuse = _fit_edges(cells, phases, edges, pseudo, E, k, parts)
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
    best, best_gap = dict(phases), np.inf
    # phases weighted by their cells: a short prompt's few lags should not pick the round for the decode
    weight = {ph: float(targets[ph].cells.sum()) for ph in phases}
    total_weight = max(sum(weight.values()), 1.0)
    for it in range(iterations + 1):
        # the round is judged on a draw of its own: judged on the draw its corrections come from, the pick
        # favoured rounds whose draw happened to sit near the trace (held-out per-layer LRU gap over fit
        # seeds 0-5: qwen3 3.7 -> 3.5 points, gemma-4 2.2 -> 1.9)
        check = synthesize(model_of(phases), P, G, seed=seed + 2)
        judged = {ph: moments_of(check, ph) for ph in phases}
        # a boundary the fit leaves alone (carry pinned at 1) only adds its draw's noise to the pick: judged on it,
        # gemma-4's fit seed 2 kept a round 3.6 points short of the held-out LRU at 6 per layer
        gap = sum(weight[ph] * _moment_gap(targets[ph], judged[ph], boundary=not keep_boundary)
                  for ph in phases) / total_weight
        if gap < best_gap:
            # the damped steps can circle the fixed point rather than settle on it: keep the closest round
            best, best_gap = dict(phases), gap
        if log:
            log(f"  fit round {it}/{iterations}: moment gap {gap:.4f} (largest reuse gap at a lag 1-{LAGS}, mean of "
                f"layers, plus the first-use and phase-boundary gaps; phases weighted by cells)")
        if it == iterations:
            break
        res = synthesize(model_of(phases), P, G, seed=seed + 1)  # same draws every round: a steady fixed point
        got = {ph: moments_of(res, ph) for ph in phases}
        for ph in phases:
            phases[ph] = _correct(phases[ph], targets[ph], got[ph])
            if "cross-layer" in parts:
                phases[ph] = dataclasses.replace(phases[ph], source_sharing=0.0)
            if keep_boundary:
                phases[ph] = dataclasses.replace(phases[ph], carry=1.0)
            if ph in edge_reuse:
                phases[ph] = _correct_edge(phases[ph], ph, edge_reuse[ph], res.cells, E, parts)
            if "locality" in parts:
                phases[ph] = dataclasses.replace(phases[ph], source=np.zeros(LAGS + 1), fidelity=np.zeros((L, k)))
    phases = best
    facts = {
        "phase_boundary": ("carry kept at 1: the phase boundary is left out" if "phase-boundary" in parts
                           else f"carry kept at 1: {boundaries} request(s) with a prompt, fewer than "
                                f"{max(min_boundaries, 1)} boundaries to fit it on" if keep_boundary
                           else f"carry fitted on {boundaries} requests with a prompt"),
        "requests": int(prompt_lens.size),
        "boundaries": boundaries,
        "prefill_cells_per_layer": int(prompt_lens.sum()),
        "decode_cells_per_layer": int(output_lens.sum()),
        "phase_edges": {("prefill" if ph == PREFILL else "decode"): int(phases[ph].edge_positions) for ph in phases},
        "token_classes": {("prefill" if ph == PREFILL else "decode"): int(phases[ph].num_classes) for ph in phases},
        "popularity_pseudo_count": {("prefill" if ph == PREFILL else "decode"): round(pseudo[ph], 4) for ph in phases},
    }
    return phases, facts


# ------------------------------------------------------------------------------------------------
# Request groups
# ------------------------------------------------------------------------------------------------
def request_features(cells: TraceCells) -> tuple[np.ndarray, np.ndarray]:
    """Each request's locality, the features request groups are found by: per phase that every request has
    at least GROUP_MIN_CELLS positions of, the mean over layers of the share of a cell's experts also in the
    cell 1 and 4 positions back. Reuse shares, unlike working-set sizes, do not grow with a request's length,
    so requests of one regime but different lengths land together. Returns (features [R, F], request ids)."""
    grid, phase_of, reqs = request_grid(cells)
    columns = []
    for ph in (PREFILL, DECODE):
        here = phase_of == ph  # [R, T]
        if here.size == 0 or here.sum(axis=1).min() < GROUP_MIN_CELLS:
            continue
        for d in (1, 4):
            a, b = grid[:, d:], grid[:, :-d]
            ok = here[:, d:] & here[:, :-d]
            ok = ok[:, :, None] & (a[..., 0] >= 0) & (b[..., 0] >= 0)  # [R, T-d, L]
            hit = ((a[..., :, None] == b[..., None, :]).any(axis=-1) & ok[..., None]).sum(axis=(1, 2, 3))
            columns.append(hit / np.maximum(ok.sum(axis=(1, 2)) * grid.shape[3], 1))
    return (np.stack(columns, axis=1) if columns else np.zeros((reqs.size, 0))), reqs


def find_request_groups(features: np.ndarray, seed: int = 0, groups: Optional[int] = None) -> np.ndarray:
    """Group label of each request (0 = the largest group): a Gaussian mixture of the features, with the
    number of groups chosen by BIC among 1..MAX_GROUPS (at most one per GROUP_MIN_REQUESTS requests), or
    ``groups`` when given. Labels are ordered by group size, then by first request, so they do not depend
    on the mixture's internal order."""
    from sklearn.mixture import GaussianMixture

    R = features.shape[0]
    most = min(MAX_GROUPS, R // GROUP_MIN_REQUESTS) if groups is None else min(groups, R)
    if most <= 1 or features.shape[1] == 0 or np.ptp(features, axis=0).max(initial=0.0) < GROUP_MIN_SPREAD:
        return np.zeros(R, dtype=np.int64)
    best, best_bic = None, np.inf
    for G in ([most] if groups is not None else range(1, most + 1)):
        gm = GaussianMixture(n_components=G, covariance_type="diag", reg_covar=GROUP_REG_COVAR, n_init=4,
                             random_state=seed).fit(features)
        bic = gm.bic(features)
        if bic < best_bic - 1e-9:
            best, best_bic = gm.predict(features), bic
    labels = np.unique(best, return_inverse=True)[1]
    sizes = np.bincount(labels)
    first = np.array([np.flatnonzero(labels == g)[0] for g in range(sizes.size)])
    order = np.lexsort((first, -sizes))
    return np.argsort(order)[labels]


# ------------------------------------------------------------------------------------------------
# The fit
# ------------------------------------------------------------------------------------------------
def fit_routing_cells(cells: TraceCells, shape_meta, name: str, *, classes: Optional[int] = None,
                      iterations: int = FIT_ITERATIONS, seed: int = 0, sources: Sequence[dict] = (),
                      disabled: Sequence[str] = (), groups: Optional[int] = None, log=None) -> RoutingModel:
    """Fit to ``cells`` (one or more requests, rows in execution order); ``shape_meta`` a TraceMeta.

    ``disabled`` parts are left out of the model (no locality: no sources; no drift: None; no cross-layer:
    one token class and a source per layer; no popularity: uniform; no request groups: one set of
    parameters for all requests), as the naive baselines need. ``groups``: how many request groups
    (None: chosen by BIC; 1: none).
    """
    parts = check_parts(disabled)
    meta = shape_meta
    if groups is not None and groups < 1:
        raise MoesimError(f"--request-groups {groups}: expected a positive integer or 'auto'")
    kw = dict(classes=classes, iterations=iterations, seed=seed, parts=parts)
    phases, facts = _fit_phases(cells, meta, name, log=log, **kw)
    found = []
    if "request-groups" not in parts and groups != 1:
        features, reqs = request_features(cells)
        labels = find_request_groups(features, seed=seed, groups=groups)
        n_groups = int(labels.max(initial=0)) + 1
        # a group's boundary is fitted on however few of its requests have one, where all requests together
        # had enough for the fit to all of them to fit its own
        whole = facts["boundaries"] >= MIN_BOUNDARY_REQUESTS and "phase-boundary" not in parts
        for g in range(n_groups if n_groups > 1 else 0):
            members = reqs[labels == g]
            if log:
                log(f"request group {g + 1}: {members.size} of {reqs.size} requests")
            part = cells.take(np.flatnonzero(np.isin(cells.request, members)))
            g_phases, _ = _fit_phases(part, meta, f"{name} group {g + 1}", log=log,
                                      min_boundaries=1 if whole else MIN_BOUNDARY_REQUESTS, **kw)
            found.append(RequestGroup(share=members.size / reqs.size, decode=g_phases[DECODE],
                                      prefill=g_phases.get(PREFILL), fitted_requests=int(members.size)))
    fitted_to = {
        "parts_left_out": sorted(parts),
        "method": "popularity: posterior mean, pseudo-count per expert by empirical Bayes (Dirichlet-multinomial "
                  "evidence), as draw weights of top-k cells; token classes: EM; weights: moments; copy ranks: "
                  "counted; "
                  f"locality (reuse per layer and rank at lags 1-{LAGS}; variance over tokens of lag-1 reuse for "
                  "the source sharing; reuse of the previous phase's last tokens for the phase boundary's carry) "
                  "and drift (the spread of each request's expert shares around the phase's, or with fewer than "
                  f"{SPREAD_MIN_REQUESTS} requests the share of first uses of an expert in a request): moment "
                  f"matching through the generator, {iterations} rounds; phase edges: the positions next to the "
                  "boundary whose expert shares lie beyond 3x the noise from their phase's, their popularity the "
                  "posterior mean of their counts, their copies moment-matched to their reuse of the cell before",
        "sources": list(sources),
        **facts,
        "drift": "Polya-urn concentration per layer, moment-matched to the spread of the requests' expert shares "
                 f"(phases of {SPREAD_MIN_REQUESTS} or more requests) or else to the share of first uses in a request",
        "request_groups": (
            f"{len(found)} groups of {', '.join(str(g.fitted_requests) for g in found)} requests: a Gaussian mixture "
            f"(BIC) of each request's reuse at lags 1 and 4, each group fitted on its own requests"
            if found else "none: " + ("left out" if "request-groups" in parts or groups == 1 else
                                      "one group fits best (BIC), or too few requests to split")),
    }
    return RoutingModel(name=name, model=meta.model, dtype=meta.dtype, expert_bytes=tuple(meta.expert_bytes),
                        non_expert_bytes=int(meta.non_expert_bytes), decode=phases[DECODE],
                        prefill=phases.get(PREFILL), fitted_to=fitted_to, created=utc_now_iso(), groups=tuple(found))


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
