"""Sample routing traces from a :class:`~moesim.tracer.routing.RoutingModel` (see its module docstring).

The generator is sequential in token position only: at each position, every (request, layer) stream is
advanced at once with numpy. For each stream it keeps the time each expert was last used (its recency
stack); at each cell it draws the k experts in rank order (copy from a depth of the stack, or draw a fresh
expert by the Gumbel-max trick over the popularity of the token's class and the request's drift, never
an expert already in the cell), then marks them used in rank order, as the LRU of ``tracer/stats.py``
inserts them. It also returns, for every access, its depth in the stack before the cell (-1 if the
expert was not used yet in the request): the per-request stack distance the fit matches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

from moesim.errors import MoesimError
from moesim.modelspec import ModelShape
from moesim.tracer.format import DECODE, PREFILL, Trace, TraceCells, TraceMeta, TraceSource
from moesim.tracer.routing import PARTS, PhaseModel, RoutingModel

BUCKET_PSEUDO_USES = 0.5  # an expert's weight inside its depth bucket: its uses in the request + this
_LOG_FLOOR = -60.0  # log-probability given to experts of zero fitted popularity (never drawn in practice)


@dataclass
class SynthResult:
    cells: TraceCells  # rows in execution order
    depth: np.ndarray  # int [rows, k]: depth in the (request, layer) recency stack before the cell, -1 unused


def check_parts(disabled: Iterable[str]) -> frozenset[str]:
    parts = frozenset(disabled)
    unknown = sorted(parts - set(PARTS))
    if unknown:
        raise MoesimError(f"--disable {unknown[0]}: expected some of {', '.join(PARTS)}")
    return parts


def _phase_arrays(pm: PhaseModel, disabled: frozenset[str], L: int, E: int):
    """(class prior, log class popularity [C, L, E], per-depth cumulative copy [L, k, E], drift or None)."""
    if "popularity" in disabled:
        prior = np.ones(1)
        logpop = np.zeros((1, L, E))
    elif "cross-layer" in disabled:
        prior = np.ones(1)
        logpop = np.log(np.maximum(pm.popularity(), 1e-300))[None]
    else:
        prior = pm.class_prior
        logpop = np.log(np.maximum(pm.class_popularity, 1e-300))
    logpop = np.maximum(logpop, _LOG_FLOOR)
    copy = pm.copy_per_depth()
    if "locality" in disabled:
        copy = np.zeros_like(copy)
    cum = np.cumsum(copy, axis=2)
    drift = None if ("drift" in disabled or "popularity" in disabled) else pm.drift
    return prior, logpop, cum, drift


def _row_cumsum(p: np.ndarray) -> np.ndarray:
    """Cumulative sums along the last axis of a 2-D array (one flat cumsum: much faster than per row)."""
    flat = np.cumsum(p, axis=None).reshape(p.shape)
    before = np.concatenate([[0.0], flat[:-1, -1]])
    return flat - before[:, None]


def _draw_fresh(rng, cum: np.ndarray, taken: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For each stream in ``rows``, an expert drawn from its popularity (cumulative ``cum`` [S, E]) among
    those not ``taken`` (by redrawing a taken one, then by an exact masked draw for the few left)."""
    out = np.empty(rows.size, dtype=np.int64)
    todo = np.arange(rows.size)
    E = cum.shape[1]
    for _ in range(8):
        if todo.size == 0:
            return out
        r = rows[todo]
        c = cum[r]
        v = rng.random(todo.size) * c[:, -1]
        e = np.minimum((c <= v[:, None]).sum(axis=1), E - 1)
        ok = ~taken[r, e]
        out[todo[ok]] = e[ok]
        todo = todo[~ok]
    if todo.size:
        r = rows[todo]
        p = np.diff(cum[r], axis=1, prepend=0.0)
        p = np.where(taken[r], 0.0, np.maximum(p, 0.0)) + np.where(taken[r], 0.0, 1e-300)
        c = np.cumsum(p, axis=1)
        v = rng.random(todo.size) * c[:, -1]
        out[todo] = np.minimum((c <= v[:, None]).sum(axis=1), E - 1)
    return out


def _by_uses_within_bucket(rng, d: np.ndarray, bucket_of: np.ndarray, edges: np.ndarray,
                           uses_by_depth: np.ndarray) -> np.ndarray:
    """Re-draw a copy depth inside its bucket in proportion to the uses (so far in the request) of the expert
    at each depth: the bucket's mass is what the fit matched; inside it, experts a request keeps coming back
    to come back more (its working set), not a uniformly random one of those last used about as long ago."""
    E = uses_by_depth.shape[1]
    lo, hi = edges[:-1][bucket_of[np.minimum(d, E - 1)]], edges[1:][bucket_of[np.minimum(d, E - 1)]]
    rows = np.flatnonzero((d < E) & (hi - lo > 1))
    if rows.size == 0:
        return d
    pos = np.arange(E)[None, :]
    w = np.where((pos >= lo[rows, None]) & (pos < hi[rows, None]), uses_by_depth[rows], 0.0)
    c = np.cumsum(w, axis=1)
    v = rng.random(rows.size) * c[:, -1]
    out = d.copy()
    out[rows] = np.minimum((c <= v[:, None]).sum(axis=1), hi[rows] - 1)
    return out


def _run_phase(rng, pm: PhaseModel, disabled, lengths: np.ndarray, state: "_Stacks", k: int):
    """Advance every (request, layer) stream through ``lengths[r]`` cells of one phase.

    Returns experts [R, T, L, k] and depth [R, T, L, k]; ``state`` is updated in place.
    """
    R, L, E = state.R, state.L, state.E
    S = R * L
    T = int(lengths.max()) if R else 0
    prior, logpop, cum_copy, drift = _phase_arrays(pm, disabled, L, E)
    pop_class = np.exp(logpop)  # [C, L, E]
    if drift is not None:
        # Polya urn: weight drift[l] * popularity + the request's own counts so far, tilted toward the token's
        # class by theta_c / theta (so a request's counts of another class's experts do not wash out the class)
        marginal = np.einsum("c,cle->le", prior, pop_class)
        tilt = pop_class / np.maximum(marginal, 1e-300)[None]  # [C, L, E]
        base = marginal * np.asarray(drift, dtype=np.float64)[:, None]  # [L, E]
    classes = rng.choice(prior.shape[0], size=(R, T), p=prior) if prior.shape[0] > 1 else np.zeros((R, T), int)
    cum_copy = np.tile(cum_copy, (R, 1, 1))  # [S, k, E]: stream s = r * L + l
    edges = pm.depth_edges
    bucket_of = np.repeat(np.arange(len(edges) - 1), np.diff(edges))  # depth -> bucket
    experts = np.zeros((R, T, L, k), dtype=np.int16)
    depth = np.zeros((R, T, L, k), dtype=np.int16)
    streams = np.arange(S)
    const_cum = None
    if prior.shape[0] == 1 and drift is None:
        const_cum = _row_cumsum(np.tile(pop_class[0], (R, 1)))
    for t in range(T):
        active = np.repeat(t < lengths, L)  # [S]
        if const_cum is not None:
            cum = const_cum
        else:
            if drift is not None:
                urn = np.tile(base, (R, 1)) + state.counts
                cum = _row_cumsum(tilt[classes[:, t]].reshape(S, E) * urn)
            else:
                cum = _row_cumsum(pop_class[classes[:, t]].reshape(S, E))
        taken = np.zeros((S, E), dtype=bool)
        chosen = np.empty((S, k), dtype=np.int64)
        uses_by_depth = np.take_along_axis(state.counts, state.order, axis=1) + BUCKET_PSEUDO_USES
        for j in range(k):
            u = rng.random(S)
            d = (u[:, None] >= cum_copy[:, j, :]).sum(axis=1)  # E means "draw a fresh expert"
            d = _by_uses_within_bucket(rng, d, bucket_of, edges, uses_by_depth)
            cand = state.order[streams, np.minimum(d, E - 1)]
            use_copy = (d < E) & ~taken[streams, cand]
            e = cand.copy()
            need = np.flatnonzero(~use_copy)
            e[need] = _draw_fresh(rng, cum, taken, need)
            taken[streams, e] = True
            chosen[:, j] = e
            dep = np.where(use_copy, d, 0)
            if need.size:
                dep[need] = (state.order[need] == e[need, None]).argmax(axis=1)
            dep = np.where(state.used[streams, e], dep, -1)
            experts[:, t, :, j] = e.reshape(R, L)
            depth[:, t, :, j] = dep.reshape(R, L)
        state.move_to_front(chosen, taken, active)
    return experts, depth


class _Stacks:
    """Recency stack of every (request, layer) stream: ``order[s]`` lists experts most recent first."""

    def __init__(self, order: np.ndarray, R: int, L: int):
        self.R, self.L, self.E = R, L, order.shape[1]
        self.order = order
        self.used = np.zeros(order.shape, dtype=bool)  # used yet in the request
        self.counts = np.zeros(order.shape)  # times used in the request

    def move_to_front(self, chosen: np.ndarray, taken: np.ndarray, active: np.ndarray) -> None:
        """The cell's experts go on top in rank order (rank k-1 most recent), the rest keep their order."""
        S, k = chosen.shape
        keep = ~np.take_along_axis(taken, self.order, axis=1)
        rest = self.order[keep].reshape(S, self.E - k)
        new = np.concatenate([chosen[:, ::-1], rest], axis=1)
        self.order = np.where(active[:, None], new, self.order)
        self.used |= taken & active[:, None]
        self.counts += taken & active[:, None]


def _weights(rng, pm: PhaseModel, disabled, layer: np.ndarray, k: int) -> np.ndarray:
    n = layer.shape[0]
    if "weights" in disabled:
        return np.full((n, k), 1.0 / k, dtype=np.float32)
    w = pm.weights
    alpha = np.maximum(w.share_alpha[layer], 1e-3)
    g = rng.standard_gamma(alpha)
    shares = g / np.maximum(g.sum(axis=1, keepdims=True), 1e-300)
    shares = -np.sort(-shares, axis=1)
    total = w.sum_mean[layer] + w.sum_std[layer] * rng.standard_normal(n)
    total = np.maximum(total, 1e-3)
    return (shares * total[:, None]).astype(np.float32)


def synthesize(model: RoutingModel, prompt_lens: np.ndarray, output_lens: np.ndarray, seed: int = 0,
               disabled: Iterable[str] = ()) -> SynthResult:
    """Requests r = 0..R-1 with ``prompt_lens[r]`` prefill and ``output_lens[r]`` decode cells per layer.

    Decode positions continue from the prompt (position P .. P+G-1). Same inputs and seed, same arrays.
    """
    disabled = check_parts(disabled)
    prompt_lens = np.asarray(prompt_lens, dtype=np.int64)
    output_lens = np.asarray(output_lens, dtype=np.int64)
    R = int(prompt_lens.shape[0])
    L, E, k = model.num_layers, model.num_experts, model.top_k
    rng = np.random.default_rng(seed)
    # Each request's stack starts in an order drawn from the popularity (Plackett-Luce by Gumbel keys),
    # all "not used yet" (negative), so a copy from deep in a fresh stack is a popularity draw.
    pop0 = model.phase("prefill" if prompt_lens.max(initial=0) > 0 else "decode").popularity()
    if "popularity" in disabled:
        pop0 = np.full((L, E), 1.0 / E)
    keys = np.log(np.maximum(pop0, 1e-300))[None] + rng.gumbel(size=(R, L, E))
    state = _Stacks(np.argsort(-keys, axis=2, kind="stable").reshape(R * L, E), R, L)
    parts = []
    for phase_id, name, lens, offset in ((PREFILL, "prefill", prompt_lens, np.zeros(R, np.int64)),
                                          (DECODE, "decode", output_lens, prompt_lens)):
        if R == 0 or lens.max(initial=0) == 0:
            continue
        pm = model.phase(name)
        ex, dep = _run_phase(rng, pm, disabled, lens, state, k)
        T = ex.shape[1]
        # rows of active (request, step, layer) in (request, step, layer) order
        valid = np.broadcast_to((np.arange(T)[None, :] < lens[:, None])[:, :, None], (R, T, L))
        rr, tt, ll = np.nonzero(valid)
        weights = _weights(rng, pm, disabled, ll, k)
        parts.append(dict(request=rr.astype(np.int32), phase=np.full(rr.shape[0], phase_id, np.uint8),
                          position=(offset[rr] + tt).astype(np.int32), layer=ll.astype(np.int16),
                          experts=ex[rr, tt, ll], weights=weights, depth=dep[rr, tt, ll]))
    if not parts:
        raise MoesimError("nothing to synthesize: every request has a prompt and output length of 0")
    cat = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    cells = TraceCells(request=cat["request"], phase=cat["phase"], position=cat["position"], layer=cat["layer"],
                       experts=cat["experts"], weights=cat["weights"])
    order = cells.execution_order()
    return SynthResult(cells=cells.take(order), depth=cat["depth"][order])


def synthetic_meta(model: RoutingModel, shape: Optional[ModelShape] = None, *, routing_path: str = "",
                   routing_sha256: str = "", details: Optional[dict] = None) -> TraceMeta:
    """Trace metadata saying the trace is synthetic and from which routing model.

    ``created`` is the routing model's own creation time, so the same inputs give the same file bytes.
    """
    shape = shape or model.model
    same_shape = shape == model.model
    return TraceMeta(
        model=shape,
        dtype=model.dtype if same_shape else "bfloat16",
        expert_bytes=tuple(model.expert_bytes) if same_shape else tuple([shape.expert_bytes()] * shape.num_moe_layers),
        non_expert_bytes=int(model.non_expert_bytes) if same_shape else shape.non_expert_bytes(),
        source=TraceSource(kind="synthetic", path=routing_path, sha256=routing_sha256,
                           format=f"moesim-routing-v{model.version}",
                           details={"routing": model.name, "fitted_to": model.fitted_to, **(details or {})}),
        created=model.created or "1970-01-01T00:00:00+00:00",
    )


def synthetic_trace(model: RoutingModel, prompt_lens, output_lens, seed: int = 0, disabled: Iterable[str] = (),
                    meta: Optional[TraceMeta] = None) -> Trace:
    res = synthesize(model, prompt_lens, output_lens, seed=seed, disabled=disabled)
    return Trace(meta=meta or synthetic_meta(model), cells=res.cells)
