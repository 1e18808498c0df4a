"""Sample routing traces from a :class:`~moesim.tracer.routing.RoutingModel` (see its module docstring).

The generator is sequential in token position only: at each position, every (request, layer) stream is
advanced at once with numpy. Each token picks its source (an earlier token of the request, or none); at
each cell the k experts are drawn in rank order: copy one of the source cell's experts (rank by
``copy_rank``, never one already in the cell) with the layer's fidelity, or draw a fresh expert from the
popularity of the token's class and the request's urn (never an expert already in the cell, nor, with the
layer's ``avoid``, one of the source's; :func:`_count_fresh` says what the urn counts). The history
of every request is kept whole, so a source may lie in the prompt when the token is a decode step; the
decode phase keeps such a source, and its share of the prompt's urn counts, by its ``carry``. A model with
request groups routes each request by its group's phases (:func:`group_counts` requests per group).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

from moesim.errors import MoesimError
from moesim.modelspec import ModelShape
from moesim.tracer.format import DECODE, PREFILL, Trace, TraceCells, TraceMeta, TraceSource
from moesim.tracer.routing import PARTS, PhaseModel, RoutingModel

_LOG_FLOOR = -60.0  # log-probability given to experts of zero fitted popularity (never drawn in practice)


@dataclass
class SynthResult:
    cells: TraceCells  # rows in execution order


def check_parts(disabled: Iterable[str]) -> frozenset[str]:
    parts = frozenset(disabled)
    unknown = sorted(parts - set(PARTS))
    if unknown:
        raise MoesimError(f"--disable {unknown[0]}: expected some of {', '.join(PARTS)}")
    return parts


def _phase_arrays(pm: PhaseModel, disabled: frozenset[str], L: int, E: int):
    """(class prior, log class popularity [C, L, E], cumulative source probabilities [K+1], drift or None)."""
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
    source = np.zeros_like(pm.source) if "locality" in disabled else pm.source
    drift = None if ("drift" in disabled or "popularity" in disabled) else pm.drift
    return prior, logpop, np.cumsum(source), drift


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


def _urn_shares(cum: np.ndarray) -> np.ndarray:
    """[S, E] each stream's fresh-draw shares, from its cumulative weights: what :func:`_count_fresh` credits."""
    return np.maximum(np.diff(cum, axis=1, prepend=0.0), 0.0) / np.maximum(cum[:, -1:], 1e-300)


def _count_fresh(counts: np.ndarray, shares: np.ndarray, barred: np.ndarray, rows: np.ndarray, drawn: np.ndarray,
                 add: np.ndarray) -> None:
    """Adds fresh draws to the urn ``counts`` [S, E] so that each adds, in expectation, the urn's own
    ``shares`` (:func:`_urn_shares`).

    A fresh draw never takes an expert already in its cell, and copies fill cells with the popular experts
    first, so counting the drawn expert alone would feed the urn the less popular ones: a request's routing
    would flatten token by token (a synthetic gemma-4 decode lost 2.8 points of lag-4 reuse over 1,024 tokens,
    with nothing in the fit asking for it). Each barred expert is credited its share q_e of the urn instead,
    and the drawn one the rest, 1 - q(barred): the same unit a draw, whose expectation is q."""
    q = np.where(barred[rows], shares[rows], 0.0)
    counts[rows] += q * add[:, None]
    counts[rows, drawn] += add * (1.0 - q.sum(axis=1))


def _source_positions(rng, cum_source: np.ndarray, far_lag: int, now: np.ndarray) -> np.ndarray:
    """For tokens at request positions ``now``, the position of each one's source token, -1 for none."""
    K = cum_source.shape[0] - 1
    pick = (rng.random(now.shape[0])[:, None] >= cum_source[None]).sum(axis=1)  # 0..K-1 near, K far, K+1 none
    lag = pick + 1
    reach = np.minimum(far_lag, now) - K  # how many tokens K+1 .. far_lag back exist
    far = K + 1 + np.floor(rng.random(now.shape[0]) * np.maximum(reach, 0)).astype(np.int64)
    lag = np.where(pick == K, far, lag)
    ok = (pick < K) | ((pick == K) & (reach > 0))
    pos = now - lag
    return np.where(ok & (pos >= 0), pos, -1)


def _copy_from_source(rng, src_cells: np.ndarray, taken: np.ndarray, rank_weights: np.ndarray) -> np.ndarray:
    """For each stream, an expert of its source cell (``src_cells`` [S, k], -1: no source) not yet taken,
    drawn by ``rank_weights`` [k] over the source's ranks; -1 where none is left."""
    S = src_cells.shape[0]
    avail = (src_cells >= 0) & ~taken[np.arange(S)[:, None], np.maximum(src_cells, 0)]
    c = np.cumsum(np.where(avail, rank_weights[None], 0.0), axis=1)
    v = rng.random(S) * c[:, -1]
    pick = np.minimum((c <= v[:, None]).sum(axis=1), src_cells.shape[1] - 1)
    return np.where(c[:, -1] > 0, src_cells[np.arange(S), pick], -1)


class _Edges:
    """A phase's edge positions in one synthesis (the routing model's phase edges): the phase's last B steps
    (``at_end``: the prefill) or its first B."""

    def __init__(self, pm: PhaseModel, disabled, lengths: np.ndarray, at_end: bool, E: int):
        self.B = 0 if "phase-boundary" in disabled else pm.edge_positions
        if self.B:
            pop = np.full_like(pm.edge_popularity, 1.0 / E) if "popularity" in disabled else pm.edge_popularity
            self.cum = np.cumsum(pop, axis=2)  # [B, L, E]
            self.copy = np.zeros(self.B) if "locality" in disabled else np.asarray(pm.edge_copy, dtype=np.float64)
            self.start = lengths - self.B if at_end else np.zeros_like(lengths)  # each request's step of edge index 0
            self.lengths = lengths

    def index(self, t: int) -> np.ndarray:
        """Each request's edge index at phase step ``t``, -1 off the edge."""
        b = t - self.start
        return np.where((b >= 0) & (b < self.B) & (t < self.lengths), b, -1)


def _run_phase(rng, pm: PhaseModel, disabled, lengths: np.ndarray, offset: np.ndarray, state: "_Streams",
               at_end: bool = False):
    """Advance every (request, layer) stream through ``lengths[r]`` cells of one phase, at request positions
    ``offset[r]`` on; ``at_end``: the phase's edge is its last positions (the prefill), else its first. Returns
    experts [R, T, L, k]; ``state`` (history, edge marks and urn counts) is updated in place."""
    R, L, E, k = state.R, state.L, state.E, state.k
    S = R * L
    T = int(lengths.max()) if R else 0
    prior, logpop, cum_source, drift = _phase_arrays(pm, disabled, L, E)
    pop_class = np.exp(logpop)  # [C, L, E]
    if drift is not None:
        # Polya urn: weight drift[l] * popularity + the request's own fresh draws so far, tilted toward the
        # token's class by theta_c / theta (so a request's counts of another class's experts do not wash out)
        marginal = np.einsum("c,cle->le", prior, pop_class)
        tilt = pop_class / np.maximum(marginal, 1e-300)[None]  # [C, L, E]
        base = marginal * np.asarray(drift, dtype=np.float64)[:, None]  # [L, E]
    classes = rng.choice(prior.shape[0], size=(R, T), p=prior) if prior.shape[0] > 1 else np.zeros((R, T), int)
    experts = np.zeros((R, T, L, k), dtype=np.int16)
    streams = np.arange(S)
    req_of, layer_of = np.repeat(np.arange(R), L), np.tile(np.arange(L), R)
    fidelity = pm.fidelity[layer_of]  # [S, k]
    carry = 1.0 if "phase-boundary" in disabled else pm.carry
    avoid = None if "locality" in disabled else pm.avoid
    sharing = 0.0 if "cross-layer" in disabled else pm.source_sharing
    const_cum = None
    if prior.shape[0] == 1 and drift is None:
        const_cum = _row_cumsum(np.tile(pop_class[0], (R, 1)))
    edges = _Edges(pm, disabled, lengths, at_end, E)
    on_edge = np.zeros(0, dtype=np.int64)
    for t in range(T):
        active = np.repeat(t < lengths, L)  # [S]
        now = offset + t  # [R]
        if const_cum is not None:
            cum = const_cum
        elif drift is not None:
            cum = _row_cumsum(tilt[classes[:, t]].reshape(S, E) * (np.tile(base, (R, 1)) + state.counts))
        else:
            cum = _row_cumsum(pop_class[classes[:, t]].reshape(S, E))
        # every layer follows the token's source, or (a share 1 - sharing) picks its own
        token_src = np.repeat(_source_positions(rng, cum_source, pm.far_lag, now), L)
        own_src = _source_positions(rng, cum_source, pm.far_lag, now[req_of])
        src = np.where(rng.random(S) < sharing, token_src, own_src)
        # (a finished request's stream runs on with its output discarded: keep its index inside the history)
        src = np.minimum(src, state.history.shape[1] - 1)
        if carry < 1.0:
            src = np.where((src >= 0) & (src < offset[req_of]) & (rng.random(S) >= carry), -1, src)
        fid, urn_add = fidelity, active.astype(np.float64)
        if edges.B:
            # an edge position is the source of the edge position after it only; an edge cell copies the cell
            # before it or draws from its position's own popularity, outside the urn
            edge_of_request = edges.index(t)
            b = edge_of_request[req_of]
            on_edge = np.flatnonzero(b >= 0)
            src = np.where((src >= 0) & state.edge[req_of, np.maximum(src, 0)], -1, src)
            src[on_edge] = now[req_of[on_edge]] - 1
            fid = fidelity.copy()
            fid[on_edge] = edges.copy[b[on_edge]][:, None]
            cum = cum.copy() if cum is const_cum else cum
            cum[on_edge] = edges.cum[b[on_edge], layer_of[on_edge]]
            urn_add[on_edge] = 0.0
        shares = _urn_shares(cum)  # one step's draws all come from this step's urn
        src_cells = np.where((src >= 0)[:, None], state.history[req_of, np.maximum(src, 0), layer_of], -1)
        taken = np.zeros((S, E), dtype=bool)
        shunned = None
        if avoid is not None:
            # fresh draws keep out of the source's cell (no draw is spent without avoid: the same streams)
            shunned = np.zeros((S, E), dtype=bool)
            keep_out = (rng.random(S) < avoid[layer_of])[:, None] & (src_cells >= 0)
            keep_out[on_edge] = False
            shunned[np.nonzero(keep_out)[0], src_cells[keep_out]] = True
        chosen = np.empty((S, k), dtype=np.int64)
        for j in range(k):
            wants = rng.random(S) < fid[:, j]
            e = _copy_from_source(rng, src_cells, taken, pm.copy_rank[j])
            e = np.where(wants, e, -1)
            need = np.flatnonzero(e < 0)
            if need.size:
                barred = taken
                if shunned is not None:
                    barred = taken | shunned
                    full = barred.all(axis=1)
                    barred[full] = taken[full]  # a cell needs somewhere to go
                e[need] = _draw_fresh(rng, cum, barred, need)
                _count_fresh(state.counts, shares, barred, need, e[need], urn_add[need])
            taken[streams, e] = True
            chosen[:, j] = e
        experts[:, t] = chosen.reshape(R, L, k)
        live = np.flatnonzero(t < lengths)
        state.history[live, now[live]] = experts[live, t]
        if edges.B:
            state.edge[live, now[live]] = edge_of_request[live] >= 0
    return experts


class _Streams:
    """What the generator remembers of every request: its cells so far ``history`` [R, positions, L, k]
    (-1 before they exist), which positions are phase edges ``edge`` [R, positions] and, per (request, layer)
    stream, the urn's fresh-draw counts ``counts`` [R*L, E]."""

    def __init__(self, R: int, L: int, E: int, k: int, positions: int):
        self.R, self.L, self.E, self.k = R, L, E, k
        self.history = np.full((R, max(positions, 1), L, k), -1, dtype=np.int16)
        self.edge = np.zeros((R, max(positions, 1)), dtype=bool)
        self.counts = np.zeros((R * L, E))


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


def group_counts(shares: np.ndarray, requests: int) -> np.ndarray:
    """Requests per group, as close to ``shares * requests`` as whole numbers allow (largest remainders;
    ties to the earlier group), so a synthetic workload holds its groups in the fitted proportions rather
    than in a random draw of them."""
    exact = np.asarray(shares, dtype=np.float64) / float(np.sum(shares)) * requests
    counts = np.floor(exact).astype(np.int64)
    left = requests - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:left]] += 1
    return counts


def synthesize(model: RoutingModel, prompt_lens: np.ndarray, output_lens: np.ndarray, seed: int = 0,
               disabled: Iterable[str] = ()) -> SynthResult:
    """Requests r = 0..R-1 with ``prompt_lens[r]`` prefill and ``output_lens[r]`` decode cells per layer.

    Decode positions continue from the prompt (position P .. P+G-1). Same inputs and seed, same arrays.
    With request groups, a random permutation of :func:`group_counts` says which group each request is in.
    """
    disabled = check_parts(disabled)
    prompt_lens = np.asarray(prompt_lens, dtype=np.int64)
    output_lens = np.asarray(output_lens, dtype=np.int64)
    R = int(prompt_lens.shape[0])
    if R == 0 or (prompt_lens.max(initial=0) == 0 and output_lens.max(initial=0) == 0):
        raise MoesimError("nothing to synthesize: every request has a prompt and output length of 0")
    rng = np.random.default_rng(seed)
    shape = (model.num_layers, model.num_experts, model.top_k)
    if not model.groups or "request-groups" in disabled:
        return SynthResult(cells=_synthesize_group(rng, model, shape, prompt_lens, output_lens, disabled))
    counts = group_counts(np.array([g.share for g in model.groups]), R)
    group_of = rng.permutation(np.repeat(np.arange(len(model.groups)), counts))
    parts = []
    for g, group in enumerate(model.groups):
        members = np.flatnonzero(group_of == g)
        lens = prompt_lens[members] + output_lens[members]
        if members.size == 0 or lens.max() == 0:
            continue
        c = _synthesize_group(rng, group, shape, prompt_lens[members], output_lens[members], disabled)
        parts.append(dataclasses.replace(c, request=members[c.request].astype(np.int32)))
    cells = TraceCells(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in
                          ("request", "phase", "position", "layer", "experts", "weights")})
    return SynthResult(cells=cells.take(cells.execution_order()))


def _synthesize_group(rng, phases, shape: tuple[int, int, int], prompt_lens: np.ndarray, output_lens: np.ndarray,
                      disabled) -> TraceCells:
    """Requests that all route by ``phases`` (a RoutingModel or a RequestGroup: anything with ``phase``);
    ``shape`` is (layers, experts, top-k)."""
    R = int(prompt_lens.shape[0])
    L, E, k = shape
    state = _Streams(R, L, E, k, int((prompt_lens + output_lens).max(initial=0)))
    parts = []
    for phase_id, name, lens, offset in ((PREFILL, "prefill", prompt_lens, np.zeros(R, np.int64)),
                                          (DECODE, "decode", output_lens, prompt_lens)):
        if lens.max(initial=0) == 0:
            continue
        pm = phases.phase(name)
        if "phase-boundary" not in disabled and pm.carry < 1.0:
            state.counts *= pm.carry
        ex = _run_phase(rng, pm, disabled, lens, offset, state, at_end=phase_id == PREFILL)
        T = ex.shape[1]
        # rows of active (request, step, layer) in (request, step, layer) order
        valid = np.broadcast_to((np.arange(T)[None, :] < lens[:, None])[:, :, None], (R, T, L))
        rr, tt, ll = np.nonzero(valid)
        weights = _weights(rng, pm, disabled, ll, k)
        parts.append(dict(request=rr.astype(np.int32), phase=np.full(rr.shape[0], phase_id, np.uint8),
                          position=(offset[rr] + tt).astype(np.int32), layer=ll.astype(np.int16),
                          experts=ex[rr, tt, ll], weights=weights))
    cat = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    cells = TraceCells(request=cat["request"], phase=cat["phase"], position=cat["position"], layer=cat["layer"],
                       experts=cat["experts"], weights=cat["weights"])
    return cells.take(cells.execution_order())


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
