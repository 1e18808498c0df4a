"""Trace features for the cost model: per-cell miss counts at every cache size, from one pass over the trace.

Everything here depends on the trace (compiled for a batch size and a gating rule, exactly as the
simulator compiles it, :func:`moesim.simulator.workload.compile_workload`) and not on the hardware, so
one :class:`WorkloadFeatures` serves every profile, weight format and policy with that batch and gating.

Cells. The simulator looks up the experts of one MoE layer of one forward step together; that is one
*cell* here: a decode cell is (decode step, layer) with ``a`` distinct experts, a prefill cell is (request,
layer) with the union of the prompt's experts and each one's token count.

Miss tables. For a cache rule, ``MissTable.decode[i, c]`` is the number of misses of decode cell ``i``
with a cache of ``c`` experts per layer (``c`` = 0..E), and ``prefill[j, c]`` the same for prefill cells.

* per-layer LRU: the one-pass stack distances of :func:`moesim.tracer.stats.stack_distances`, run on
  each layer's cells in execution order (prefill warms the cache, as in the simulator); an access hits at
  ``c`` iff its distance is below ``c``. Initial states the presets use: ``empty``, and ``last-experts``
  (Mixtral-Offloading starts each layer full with the highest-numbered experts), which is a prefix of
  one access per expert 0..E-1, so the ``c`` most recent — E-c..E-1 — are resident at the start.
* per-layer static (popular): an access hits iff its expert's popularity rank in its layer (the
  simulator's :func:`~moesim.simulator.cache.popularity_order`) is below ``c``.
* global static (Fiddler): the global popularity order filled while it fits ``c`` x (sum of the layers'
  expert bytes); an access hits iff the bytes up to and including its key fit.
* global LRU of ``c x L`` entries: stack distances over all layers' keys (stands in for MoE-Infinity's
  global LFU; the fitted correction accounts for the difference).
* AdapMoE's DP sizing: per-layer sizes from :func:`moesim.simulator.memory.dp_sizes_every_budget`'s DP over the
  simulator's own miss curves, for every total at once, and the LRU table read at each layer's size.

Rules that are not stack algorithms (LFU, FIFO, MRS, Belady) are read from the LRU table and the fitted
correction learns their difference (see :mod:`moesim.costmodel.model`).

Histograms. ``decode_histogram`` counts decode cells by (c, a, misses), which is all the analytic
backbone needs to time every cell exactly when each expert of a cell has the same cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moesim.simulator.workload import Workload
from moesim.tracer import DECODE, Trace

NEVER = np.int64(1 << 40)  # distance of a first use: a miss at every capacity


@dataclass(frozen=True)
class DecodeCells:
    layer: np.ndarray  # int64 [N]
    step: np.ndarray  # int64 [N] decode step index (0..S-1, execution order)
    experts: np.ndarray  # int64 [N] distinct experts of the cell (a)
    tokens: np.ndarray  # int64 [N] routed (token, expert) pairs of the cell
    active: np.ndarray  # int64 [N] requests in the cell's step (weight of the cell in TPOT)


@dataclass(frozen=True)
class PrefillCells:
    layer: np.ndarray  # int64 [P]
    request: np.ndarray  # int64 [P] index of the request's prefill step (0..R-1, execution order)
    expert_ids: np.ndarray  # int64 [P, A] the cell's experts, -1 padded
    expert_tokens: np.ndarray  # int64 [P, A] tokens routed to each, 0 padded

    @property
    def experts(self) -> np.ndarray:
        return (self.expert_ids >= 0).sum(axis=1)


@dataclass(frozen=True)
class DecodeSteps:
    tokens: np.ndarray  # int64 [S] active requests
    context: np.ndarray  # int64 [S] KV length the step's attention sees


@dataclass(frozen=True)
class PrefillSteps:
    tokens: np.ndarray  # int64 [R] prompt tokens
    ttft_weight: np.ndarray  # float [R] how many requests' TTFT include this prefill, / requests
    interval_weight: np.ndarray  # float [R] how many earlier requests of its batch wait through it


@dataclass(frozen=True)
class MissTable:
    """Misses per cell at every cache size c = 0..E experts per layer."""

    decode: np.ndarray  # int16/int32 [N, E+1]
    prefill: np.ndarray  # [P, E+1]


@dataclass
class WorkloadFeatures:
    """A trace compiled for one batch size and gating rule, reduced to arrays."""

    name: str
    num_layers: int
    num_experts: int
    top_k: int
    batch: int
    gating: str
    requests: int
    output_tokens: int
    decode_intervals: int  # token intervals TPOT averages over
    decode: DecodeCells
    prefill: PrefillCells
    steps: DecodeSteps
    prefills: PrefillSteps
    popularity: np.ndarray  # [L, E]
    max_tokens_per_expert: int
    max_context: int
    # one-pass scalars (for the correction)
    reuse_prev: float  # share of a decode cell's experts also used by the previous step at that layer
    guess_overlap: float  # share of a decode cell's experts named by the guess its previous layer made
    entropy: float  # mean normalized routing entropy per layer (decode)
    hot_k_share: float  # share of decode accesses to each layer's k most used experts
    dp_curves: np.ndarray  # [L, E+1] the simulator's per-layer LRU miss curves (AdapMoE's DP input)
    # raw access streams (execution order) for the distance passes
    _cell_layer: np.ndarray = field(repr=False, default=None)
    _cell_phase: np.ndarray = field(repr=False, default=None)
    _cell_index: np.ndarray = field(repr=False, default=None)  # index into decode/prefill cells
    _cell_offsets: np.ndarray = field(repr=False, default=None)
    _access_expert: np.ndarray = field(repr=False, default=None)
    _tables: dict = field(repr=False, default_factory=dict)
    _hists: dict = field(repr=False, default_factory=dict)

    # ---- miss tables -------------------------------------------------------------------------------
    def misses(self, rule: str) -> MissTable:
        """``rule``: 'lru', 'lru-last' (initial state last-experts), 'static', 'lru-global'. (Fiddler's global
        static pool depends on the expert bytes: :func:`static_global_table`.)"""
        if rule not in self._tables:
            self._tables[rule] = _RULES[rule](self)
        return self._tables[rule]

    def dp_misses(self, dp_sizes: np.ndarray, base: str = "lru-last") -> MissTable:
        """AdapMoE: ``dp_sizes[p, l]`` slots of layer l when the total is p per layer on average."""
        key = ("dp", base, dp_sizes.tobytes())
        if key not in self._tables:
            t = self.misses(base)
            dec = t.decode[np.arange(len(t.decode))[:, None], dp_sizes[:, self.decode.layer].T]
            pre = t.prefill[np.arange(len(t.prefill))[:, None], dp_sizes[:, self.prefill.layer].T]
            self._tables[key] = MissTable(dec, pre)
        return self._tables[key]

    def decode_histogram(self, table: MissTable, weighted: bool) -> np.ndarray:
        """[E+1, A+1, A+1]: decode cells (weighted by active requests when ``weighted``) by capacity,
        distinct experts and misses."""
        key = (id(table), weighted)
        if key not in self._hists:
            a = self.decode.experts
            A = int(a.max()) if len(a) else 0
            C = table.decode.shape[1]
            w = self.decode.active.astype(np.float64) if weighted else np.ones(len(a))
            idx = (np.arange(C)[None, :] * (A + 1) + a[:, None]) * (A + 1) + table.decode
            hist = np.bincount(idx.reshape(-1), weights=np.repeat(w, C), minlength=C * (A + 1) ** 2)
            self._hists[key] = (table, hist.reshape(C, A + 1, A + 1))
        return self._hists[key][1]


# ---- building ------------------------------------------------------------------------------------------
def build_features(trace: Trace, workload: Workload, name: str = "") -> WorkloadFeatures:
    from moesim.simulator.memory import lru_miss_curves

    L, E, k = workload.num_layers, workload.num_experts, workload.top_k
    cell_layer, cell_phase, cell_index, offsets, access = [], [], [], [0], []
    d_layer, d_step, d_a, d_tok, d_active = [], [], [], [], []
    p_layer, p_req, p_ids, p_tok = [], [], [], []
    s_tokens, s_ctx = [], []
    r_tokens, r_ttft, r_interval = [], [], []
    n_requests = len(workload.prompt_tokens)
    reuse_num = reuse_den = guess_num = guess_den = 0
    dstep = 0
    for batch in workload.batches:
        n_b = len(batch.prefill)
        for i, step in enumerate(batch.prefill):
            r = len(r_tokens)
            r_tokens.append(step.tokens)
            r_ttft.append((n_b - i) / max(n_requests, 1))
            r_interval.append(float(i))
            for layer, work in enumerate(step.layers):
                if work is None:
                    continue
                cell_layer.append(layer)
                cell_phase.append(0)
                cell_index.append(len(p_layer))
                access.extend(work.experts)
                offsets.append(len(access))
                p_layer.append(layer)
                p_req.append(r)
                p_ids.append(work.experts)
                p_tok.append(work.tokens)
        prev: list = [None] * L
        for step in batch.decode:
            s_tokens.append(step.tokens)
            s_ctx.append(step.context)
            prev_guess = None
            for layer, work in enumerate(step.layers):
                if work is None:
                    prev_guess = None
                    continue
                cell_layer.append(layer)
                cell_phase.append(1)
                cell_index.append(len(d_layer))
                access.extend(work.experts)
                offsets.append(len(access))
                d_layer.append(layer)
                d_step.append(dstep)
                d_a.append(len(work.experts))
                d_tok.append(int(sum(work.tokens)))
                d_active.append(step.tokens)
                cur = set(work.experts)
                if prev[layer] is not None:
                    reuse_num += len(cur & prev[layer])
                    reuse_den += len(cur)
                if prev_guess is not None:
                    guess_num += len(cur & set(prev_guess))
                    guess_den += len(cur)
                prev[layer] = cur
                prev_guess = work.guess
            dstep += 1
    A = max((len(x) for x in p_ids), default=1)
    ids = np.full((len(p_ids), A), -1, dtype=np.int64)
    toks = np.zeros((len(p_ids), A), dtype=np.int64)
    for i, (e, t) in enumerate(zip(p_ids, p_tok)):
        ids[i, : len(e)] = e
        toks[i, : len(t)] = t
    pop = np.asarray(workload.popularity, dtype=np.float64)
    entropy, hot = _routing_stats(trace, k)
    out_tokens = sum(workload.decode_tokens[r] + 1 for r in workload.prompt_tokens)
    intervals = sum(workload.decode_tokens.values())
    return WorkloadFeatures(
        name=name, num_layers=L, num_experts=E, top_k=k, batch=workload.batch, gating=workload.gating.label,
        requests=n_requests, output_tokens=int(out_tokens), decode_intervals=int(intervals),
        decode=DecodeCells(*(np.asarray(x, dtype=np.int64) for x in (d_layer, d_step, d_a, d_tok, d_active))),
        prefill=PrefillCells(np.asarray(p_layer, dtype=np.int64), np.asarray(p_req, dtype=np.int64), ids, toks),
        steps=DecodeSteps(np.asarray(s_tokens, dtype=np.int64), np.asarray(s_ctx, dtype=np.int64)),
        prefills=PrefillSteps(np.asarray(r_tokens, dtype=np.int64), np.asarray(r_ttft, dtype=np.float64),
                              np.asarray(r_interval, dtype=np.float64)),
        popularity=pop, max_tokens_per_expert=int(workload.max_tokens_per_expert),
        max_context=int(workload.max_context),
        reuse_prev=reuse_num / reuse_den if reuse_den else 0.0,
        guess_overlap=guess_num / guess_den if guess_den else 0.0,
        entropy=entropy, hot_k_share=hot, dp_curves=np.asarray(lru_miss_curves(trace), dtype=np.int64),
        _cell_layer=np.asarray(cell_layer, dtype=np.int64), _cell_phase=np.asarray(cell_phase, dtype=np.int8),
        _cell_index=np.asarray(cell_index, dtype=np.int64), _cell_offsets=np.asarray(offsets, dtype=np.int64),
        _access_expert=np.asarray(access, dtype=np.int64),
    )


def _routing_stats(trace: Trace, k: int) -> tuple[float, float]:
    """Mean normalized entropy of decode routing per layer, and the hot-k share (from the trace's cells)."""
    L, E = trace.meta.num_layers, trace.meta.num_experts
    rows = trace.phase == DECODE
    if not rows.any():
        rows = np.ones(len(trace), dtype=bool)
    counts = np.zeros((L, E))
    np.add.at(counts, (np.repeat(trace.layer[rows].astype(np.int64), trace.experts.shape[1]),
                       trace.experts[rows].astype(np.int64).reshape(-1)), 1)
    tot = counts.sum(axis=1)
    used = tot > 0
    share = counts[used] / tot[used, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(share > 0, share * np.log(share), 0.0).sum(axis=1) / np.log(E)
    hot = np.sort(counts[used], axis=1)[:, ::-1][:, :k].sum() / max(tot[used].sum(), 1)
    return float(h.mean()) if h.size else 0.0, float(hot)


# ---- rules --------------------------------------------------------------------------------------------
def _counts_from_distances(dist: np.ndarray, cell: np.ndarray, n_cells: int, E: int, scale: int = 1) -> np.ndarray:
    """[n_cells, E+1]: accesses of each cell whose distance is >= c*scale (misses at capacity c)."""
    C = E + 1
    # capacity index from which an access starts to hit: smallest c with d < c*scale
    first_hit = np.where(dist >= NEVER, C, np.minimum(dist // scale + 1, C))
    hist = np.zeros((n_cells, C + 1), dtype=np.int64)
    np.add.at(hist, (cell, first_hit), 1)
    # misses at c = accesses whose first_hit > c
    cum = np.cumsum(hist, axis=1)  # accesses with first_hit <= c
    total = cum[:, -1:]
    return (total - cum[:, :C]).astype(np.int32)


def _split(fe: WorkloadFeatures, per_access_cell: np.ndarray, values: np.ndarray, E: int, scale: int = 1) -> MissTable:
    """Distances of every access (with its global cell number) -> decode and prefill miss tables."""
    n_cells = len(fe._cell_layer)
    counts = _counts_from_distances(values, per_access_cell, n_cells, E, scale)
    dec = np.zeros((len(fe.decode.layer), E + 1), dtype=np.int32)
    pre = np.zeros((len(fe.prefill.layer), E + 1), dtype=np.int32)
    is_dec = fe._cell_phase == 1
    dec[fe._cell_index[is_dec]] = counts[is_dec]
    pre[fe._cell_index[~is_dec]] = counts[~is_dec]
    return MissTable(dec, pre)


def _access_cells(fe: WorkloadFeatures) -> np.ndarray:
    sizes = np.diff(fe._cell_offsets)
    return np.repeat(np.arange(len(sizes)), sizes)


def _lru_layer(fe: WorkloadFeatures, prefix: bool) -> MissTable:
    from moesim.tracer.stats import stack_distances

    E = fe.num_experts
    cell_of = _access_cells(fe)
    dist = np.full(len(fe._access_expert), NEVER, dtype=np.int64)
    for layer in range(fe.num_layers):
        acc = np.flatnonzero(fe._cell_layer[cell_of] == layer)
        if acc.size == 0:
            continue
        keys = fe._access_expert[acc]
        cells = cell_of[acc]
        starts = np.searchsorted(cells, cells, side="left")
        if prefix:
            # experts 0..E-1, one per cell, before the run: the cache starts with E-c..E-1 at size c
            keys = np.concatenate([np.arange(E), keys])
            starts = np.concatenate([np.arange(E), starts + E])
        d = stack_distances(keys, starts)
        if prefix:
            d = d[E:]
        dist[acc] = np.where(d < 0, NEVER, d)
    return _split(fe, cell_of, dist, E)


def _lru_global(fe: WorkloadFeatures) -> MissTable:
    from moesim.tracer.stats import stack_distances

    E, L = fe.num_experts, fe.num_layers
    cell_of = _access_cells(fe)
    keys = fe._cell_layer[cell_of] * E + fe._access_expert
    starts = np.searchsorted(cell_of, cell_of, side="left")
    d = stack_distances(keys, starts)
    return _split(fe, cell_of, np.where(d < 0, NEVER, d), E, scale=L)


def popularity_rank(popularity: np.ndarray) -> np.ndarray:
    """[L, E]: rank of each expert in its layer's popularity order (the simulator's tie rule)."""
    L, E = popularity.shape
    rank = np.zeros((L, E), dtype=np.int64)
    for layer in range(L):
        order = np.lexsort((np.arange(E), -popularity[layer]))
        rank[layer, order] = np.arange(E)
    return rank


def _static_layer(fe: WorkloadFeatures) -> MissTable:
    rank = popularity_rank(fe.popularity)
    cell_of = _access_cells(fe)
    d = rank[fe._cell_layer[cell_of], fe._access_expert]
    return _split(fe, cell_of, d, fe.num_experts)


def global_popularity_bytes(popularity: np.ndarray, expert_bytes: np.ndarray) -> np.ndarray:
    """[L, E]: bytes of the global popularity order up to and including each key (ties: lower key)."""
    L, E = popularity.shape
    flat = popularity.reshape(-1)
    order = np.lexsort((np.arange(L * E), -flat))
    cum = np.cumsum(np.asarray(expert_bytes, dtype=np.int64)[order // E])
    out = np.empty(L * E, dtype=np.int64)
    out[order] = cum
    return out.reshape(L, E)


def static_global_table(fe: WorkloadFeatures, expert_bytes: np.ndarray) -> MissTable:
    """Fiddler's pool of c x sum(expert bytes): a key is resident iff the popularity prefix through it fits."""
    key = ("static-global", np.asarray(expert_bytes, dtype=np.int64).tobytes())
    if key in fe._tables:
        return fe._tables[key]
    eb = np.asarray(expert_bytes, dtype=np.int64)
    cum = global_popularity_bytes(fe.popularity, eb)
    per_layer_sum = int(eb.sum())
    cell_of = _access_cells(fe)
    need = cum[fe._cell_layer[cell_of], fe._access_expert]
    # resident at c iff need <= c * per_layer_sum, i.e. c >= ceil(need / per_layer_sum)
    first_c = -(-need // per_layer_sum)
    table = _split(fe, cell_of, first_c - 1, fe.num_experts)
    fe._tables[key] = table
    return table


_RULES = {
    "lru": lambda fe: _lru_layer(fe, prefix=False),
    "lru-last": lambda fe: _lru_layer(fe, prefix=True),
    "lru-global": _lru_global,
    "static": _static_layer,
}
