"""`moesim trace stats`: what a routing trace says about expert caching, and the LRU hit curve for every size.

Library functions (reused by the simulator and the cost model): :func:`access_stream`,
:func:`stack_distances`, :func:`lru_hit_curve`, :func:`byte_budget_lru_hits`, :func:`trace_stats`.

Accesses and cells
------------------
Every routed expert of a trace row is one *access*; accesses are numbered in execution order (rows in
trace order, then rank order inside a row). A row's k experts form a *cell*: an engine needs all of them
at the same moment, so it looks all k up before it inserts any. In prefill a cell is one prompt token at
one layer (what BigMoeOnEdge records, and what reproduces its recorded hits). The cache sees every
access of the trace, requests one after another; ``phase`` only chooses which accesses are *counted*
(prefill warms the cache before decode is counted).

LRU with "look up all k, then insert" (what is counted)
------------------------------------------------------
Cache of capacity c (entries). For each cell in order:

1. each of its k keys is a hit iff it is in the cache as it was *before the cell*;
2. its keys are then promoted (hits) or inserted (misses) at the MRU end in rank order, and the LRU
   end is evicted until at most c entries remain.

This is what BigMoeOnEdge does: replaying its bundled traces this way reproduces every recorded decode
hit, while looking up and inserting one expert at a time does not (tests/test_importers.py).

Claim: after every cell the cache holds exactly the c most recently used distinct keys, where
"recently" orders accesses by their number. By induction: before the cell the cache is the c most
recent keys; step 2 puts the cell's keys, in access order, in front of the old cache minus those keys,
which is a prefix of the new recency order because every key outside the old cache is older than every
key in it; evicting from the end keeps the c most recent. (This also holds when k > c: the cache then
keeps the cell's last c keys.)

Hence the exact rule: let access a of key x lie in a cell starting at access s, and let p < s be the
last access of x before that cell. Its *stack distance* is

    d(a) = number of distinct keys other than x accessed at numbers in (p, s)

(accesses of earlier cells only, including those after p in p's own cell; none of a's own cell).
Access a hits at capacity c iff d(a) < c; a key never seen before the cell is a cold miss at every c.
With duplicates in a cell, both copies use the same p (the cache before the cell). So one pass gives
the hit count for every capacity: hits(c) = #{counted a : d(a) < c}.

The same argument with sizes gives a byte-capped LRU (BigMoeOnEdge's policy: evict from the LRU end
until the bytes fit): the cache is always the longest recency prefix whose bytes fit the budget B, so
a hits iff (bytes of the distinct other keys in (p, s)) + bytes(x) <= B.

Algorithm: a Fenwick tree over access numbers holds, for every key, a mark (1, or its bytes) at its
latest access. For a cell starting at s, before any of its keys is moved, d(a) = (sum of all marks) -
(marks at numbers <= p): the keys whose latest access is after p. Then each access moves its key's
mark to its own number. O(A log A) for A accesses; the 45k-access Qwen3 trace takes about 0.1 s
per scope.
``scope='layer'`` runs this on each layer's own accesses (one cache of c experts per layer);
``scope='global'`` on all accesses with keys (layer, expert) (one cache of c experts across layers).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import click
import numpy as np

from moesim.atomic import atomic_path
from moesim.errors import MoesimError
from moesim.tracer.format import DECODE, PREFILL, Trace, read_trace
from moesim.units import format_bytes

PHASES = ("decode", "prefill", "all")
SCOPES = ("layer", "global")
TOP_EXPERTS_LISTED = 8


# ------------------------------------------------------------------------------------------------
# Access stream and stack distances
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AccessStream:
    """Every routed expert of a trace as one access, in execution order."""

    layer: np.ndarray  # int64 [A]
    expert: np.ndarray  # int64 [A]
    row: np.ndarray  # int64 [A] trace row (the cell) of the access
    cell_start: np.ndarray  # int64 [A] number of the first access of the access's cell
    phase: np.ndarray  # uint8 [A]

    def __len__(self) -> int:
        return int(self.layer.shape[0])


def access_stream(trace: Trace) -> AccessStream:
    n, k = trace.experts.shape
    row = np.repeat(np.arange(n, dtype=np.int64), k)
    return AccessStream(
        layer=np.repeat(trace.layer.astype(np.int64), k),
        expert=trace.experts.astype(np.int64).reshape(-1),
        row=row,
        cell_start=row * k,
        phase=np.repeat(trace.phase, k),
    )


def stack_distances(keys: np.ndarray, cell_start: np.ndarray, weights: Optional[np.ndarray] = None) -> np.ndarray:
    """d(a) per access (see the module docstring): distinct other keys, or their summed ``weights``, used
    since the key's last use before its cell; -1 where the key was not used before the cell.

    ``keys`` int [A]; ``cell_start`` int [A], non-decreasing, the first access number of each access's
    cell; ``weights`` int [A] (the weight of the access's key, e.g. its bytes) or None for 1 per key.
    """
    n = int(len(keys))
    dist = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return dist
    cell_start = np.asarray(cell_start, dtype=np.int64)
    if cell_start[0] != 0 or np.any(np.diff(cell_start) < 0) or np.any(cell_start > np.arange(n)):
        raise ValueError("cell_start must start at 0, never decrease, and not lie after its access")
    key_list = np.asarray(keys).tolist()
    bounds = np.flatnonzero(np.diff(cell_start, prepend=-1)).tolist() + [n]
    wts = [1] * n if weights is None else np.asarray(weights, dtype=np.int64).tolist()
    tree = [0] * (n + 1)  # Fenwick tree over access numbers 1..n
    last: dict[int, int] = {}  # key -> its latest access
    mark: dict[int, int] = {}  # key -> the weight its mark carries
    total = 0
    out = [-1] * n
    for c in range(len(bounds) - 1):
        lo, hi = bounds[c], bounds[c + 1]
        for a in range(lo, hi):  # every lookup sees the cache as it was before the cell
            p = last.get(key_list[a])
            if p is not None:
                i, below = p + 1, 0
                while i > 0:
                    below += tree[i]
                    i &= i - 1
                out[a] = total - below
        for a in range(lo, hi):
            key, w = key_list[a], wts[a]
            p = last.get(key)
            if p is not None:
                pw = mark[key]
                i = p + 1
                while i <= n:
                    tree[i] -= pw
                    i += i & -i
                total -= pw
            i = a + 1
            while i <= n:
                tree[i] += w
                i += i & -i
            total += w
            last[key] = a
            mark[key] = w
    dist[:] = out
    return dist


def _phase_rows(trace: Trace, phase: str) -> np.ndarray:
    if phase not in PHASES:
        raise MoesimError(f"--phase {phase}: expected one of {', '.join(PHASES)}")
    if phase == "all":
        return np.ones(len(trace), dtype=bool)
    return trace.phase == (DECODE if phase == "decode" else PREFILL)


# ------------------------------------------------------------------------------------------------
# LRU hit curves
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LruHitCurve:
    """Hits of an LRU expert cache at every capacity, from one stack-distance pass.

    ``scope='layer'``: one cache of c experts per layer, ``hits[c]`` summed over layers.
    ``scope='global'``: one cache of c (layer, expert) entries shared by all layers.
    ``layer_hits[l, c]``: hits of layer l's counted accesses at capacity c (either scope).
    """

    scope: str
    phase: str
    capacities: np.ndarray  # int64 [C+1]: 0..C, C = experts per layer (layer) or layers x experts (global)
    hits: np.ndarray  # int64 [C+1]
    accesses: int  # counted accesses
    cold_misses: int  # counted accesses whose key was never used before: a miss at every capacity
    layer_hits: np.ndarray  # int64 [L, C+1]
    layer_accesses: np.ndarray  # int64 [L]

    @property
    def max_capacity(self) -> int:
        return int(self.capacities[-1])

    def hits_at(self, capacity: int) -> int:
        return int(self.hits[min(max(int(capacity), 0), self.max_capacity)])

    def hit_rate(self, capacity: int) -> float:
        return self.hits_at(capacity) / self.accesses if self.accesses else 0.0

    @property
    def hit_rates(self) -> np.ndarray:
        return self.hits / max(self.accesses, 1)


def _curve_from_distances(dist: np.ndarray, layer: np.ndarray, counted: np.ndarray, num_layers: int,
                          max_capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """layer_hits[l, c] = #{counted accesses of layer l with 0 <= d < c}."""
    sel = counted & (dist >= 0)
    d = np.minimum(dist[sel], max_capacity)  # d >= C never hits within 0..C
    hist = np.zeros((num_layers, max_capacity + 1), dtype=np.int64)
    np.add.at(hist, (layer[sel], d), 1)
    layer_hits = np.zeros((num_layers, max_capacity + 1), dtype=np.int64)
    layer_hits[:, 1:] = np.cumsum(hist, axis=1)[:, :-1]
    return layer_hits.sum(axis=0), layer_hits


def lru_hit_curve(trace: Trace, scope: str = "layer", phase: str = "decode",
                  stream: Optional[AccessStream] = None) -> LruHitCurve:
    """LRU hits at every capacity for ``scope`` 'layer' or 'global', counting ``phase`` accesses."""
    if scope not in SCOPES:
        raise MoesimError(f"scope '{scope}': expected one of {', '.join(SCOPES)}")
    rows = _phase_rows(trace, phase)
    s = stream or access_stream(trace)
    L, E = trace.meta.num_layers, trace.meta.num_experts
    counted = rows[s.row]
    if scope == "global":
        dist = stack_distances(s.layer * E + s.expert, s.cell_start)
        max_c = L * E
    else:
        dist = np.full(len(s), -1, dtype=np.int64)
        for layer in range(L):
            idx = np.flatnonzero(s.layer == layer)
            if idx.size == 0:
                continue
            sub_rows = s.row[idx]
            sub_start = np.searchsorted(sub_rows, sub_rows, side="left")  # rows are contiguous and ordered
            dist[idx] = stack_distances(s.expert[idx], sub_start)
        max_c = E
    hits, layer_hits = _curve_from_distances(dist, s.layer, counted, L, max_c)
    layer_accesses = np.bincount(s.layer[counted], minlength=L).astype(np.int64)
    return LruHitCurve(
        scope=scope, phase=phase, capacities=np.arange(max_c + 1, dtype=np.int64), hits=hits,
        accesses=int(counted.sum()), cold_misses=int((counted & (dist < 0)).sum()),
        layer_hits=layer_hits, layer_accesses=layer_accesses,
    )


def byte_budget_lru_hits(trace: Trace, budget_bytes: int, stream: Optional[AccessStream] = None) -> np.ndarray:
    """Hit (bool [rows, k]) of every access in one global LRU capped at ``budget_bytes``, each entry
    costing its layer's ``expert_bytes`` (BigMoeOnEdge's cache; see the module docstring)."""
    s = stream or access_stream(trace)
    E = trace.meta.num_experts
    size = np.asarray(trace.meta.expert_bytes, dtype=np.int64)[s.layer]
    dist = stack_distances(s.layer * E + s.expert, s.cell_start, weights=size)
    hit = (dist >= 0) & (dist + size <= int(budget_bytes))
    return hit.reshape(trace.experts.shape)


# ------------------------------------------------------------------------------------------------
# Per-layer statistics
# ------------------------------------------------------------------------------------------------
def _row_index(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (request, position, layer, phase) keys of the rows and the row each belongs to."""
    key = _row_key(trace.request, trace.position, trace.layer, trace.phase)
    order = np.argsort(key, kind="stable")
    return key[order], order


def _row_key(request, position, layer, phase) -> np.ndarray:
    return (((request.astype(np.int64) << 24) + position.astype(np.int64)) << 16 | layer.astype(np.int64)) << 2 \
        | phase.astype(np.int64)


def _find_rows(sorted_keys: np.ndarray, order: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Row of each key, or -1."""
    pos = np.searchsorted(sorted_keys, keys)
    pos_c = np.minimum(pos, len(sorted_keys) - 1)
    found = sorted_keys[pos_c] == keys
    return np.where(found, order[pos_c], -1)


def _overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row: how many of a's entries are in b (same row); -1 entries never match."""
    return ((a[:, :, None] == b[:, None, :]) & (a[:, :, None] >= 0)).any(axis=2).sum(axis=1)


@dataclass(frozen=True)
class LayerStats:
    layer: int
    accesses: int
    distinct: int  # experts used at least once
    entropy: float  # normalized: H(shares) / log(num_experts)
    hot_k_share: float  # share of accesses that go to the layer's k most used experts
    top_experts: list[tuple[int, float]]  # (expert, share), most used first
    counts: list[int]  # per expert
    reuse_prev: Optional[float]  # share of experts at position t also used at t-1 (same request, layer)
    next_layer_guess: Optional[float]  # share of layer+1's experts that this layer's guess named
    recorded_hit: Optional[float]  # the recording engine's own hit rate
    replay_hit: Optional[float]  # replay of the recording engine's cache


@dataclass(frozen=True)
class RecordedEngineStats:
    name: str
    cache_policy: str
    cache_budget_bytes: int
    budget_experts: float  # the budget in experts of mean size
    recorded_hit_rate: float
    replay_hit_rate: Optional[float]  # None when the policy cannot be replayed here
    agreement: Optional[float]  # share of counted accesses where replay and record agree


@dataclass(frozen=True)
class TraceStats:
    name: str
    model_id: str
    num_layers: int
    num_experts: int
    top_k: int
    dtype: str
    mean_expert_bytes: float
    phase: str
    requests: int
    cells: int
    accesses: int
    warmup_cells: int  # cells of the other phase that reach the cache before/between counted ones
    layers: list[LayerStats]
    reuse_prev: Optional[float]
    next_layer_guess: Optional[float]
    recorded_engine: Optional[RecordedEngineStats]
    lru_layer: LruHitCurve
    lru_global: LruHitCurve
    source: str = ""
    notes: list[str] = field(default_factory=list)


def trace_stats(trace: Trace, phase: str = "decode", name: str = "") -> TraceStats:
    rows = _phase_rows(trace, phase)
    if not rows.any():
        raise MoesimError(f"{name or trace.path}: trace has no {phase} rows (try --phase all)")
    L, E, k = trace.meta.num_layers, trace.meta.num_experts, trace.meta.top_k
    sel_layer = trace.layer[rows].astype(np.int64)
    sel_experts = trace.experts[rows].astype(np.int64)

    counts = np.zeros((L, E), dtype=np.int64)
    np.add.at(counts, (np.repeat(sel_layer, k), sel_experts.reshape(-1)), 1)

    sorted_keys, order = _row_index(trace)
    # reuse: the same request and layer at position t-1, also in the counted phase (as the source of the
    # bundled traces counts "previous token's k")
    idx = np.flatnonzero(rows)
    prev = np.full(len(idx), -1, dtype=np.int64)
    for ph in {"decode": (DECODE,), "prefill": (PREFILL,), "all": (PREFILL, DECODE)}[phase]:
        cand = _find_rows(sorted_keys, order, _row_key(trace.request[idx], trace.position[idx] - 1,
                                                        trace.layer[idx], np.full(len(idx), ph)))
        prev = np.where((prev < 0) & (trace.position[idx] > 0), cand, prev)
    has_prev = prev >= 0
    reused = np.zeros(len(idx), dtype=np.int64)
    reused[has_prev] = _overlap(trace.experts[idx[has_prev]].astype(np.int64),
                                trace.experts[prev[has_prev]].astype(np.int64))
    reuse_num = np.bincount(sel_layer[has_prev], weights=reused[has_prev], minlength=L)
    reuse_den = np.bincount(sel_layer[has_prev], minlength=L) * k

    guess_num = guess_den = None
    if trace.next_layer_guess is not None:
        guess = trace.next_layer_guess[idx].astype(np.int64)
        has_guess = (guess >= 0).all(axis=1) & (trace.layer[idx] < L - 1)
        nxt = _find_rows(sorted_keys, order, _row_key(trace.request[idx], trace.position[idx],
                                                      trace.layer[idx] + 1, trace.phase[idx]))
        ok = has_guess & (nxt >= 0)
        hit = _overlap(trace.experts[nxt[ok]].astype(np.int64), guess[ok])
        guess_num = np.bincount(sel_layer[ok], weights=hit, minlength=L)
        guess_den = np.bincount(sel_layer[ok], minlength=L) * k

    stream = access_stream(trace)
    lru_layer = lru_hit_curve(trace, "layer", phase, stream)
    lru_global = lru_hit_curve(trace, "global", phase, stream)

    engine_stats = None
    rec_rate = replay_rate = None
    if trace.recorded_hit is not None:
        rec = trace.recorded_hit[rows]
        rec_rate = np.bincount(sel_layer, weights=rec.sum(axis=1), minlength=L) / np.maximum(
            np.bincount(sel_layer, minlength=L) * k, 1)
        engine = trace.meta.recorded_engine
        if engine is not None:
            replay = replay_agree = None
            if engine.cache_policy == "global-lru-bytes":
                rep = byte_budget_lru_hits(trace, engine.cache_budget_bytes, stream)[rows]
                replay_rate = np.bincount(sel_layer, weights=rep.sum(axis=1), minlength=L) / np.maximum(
                    np.bincount(sel_layer, minlength=L) * k, 1)
                replay = float(rep.mean())
                replay_agree = float((rep == rec).mean())
            mean_bytes = float(np.mean(trace.meta.expert_bytes))
            engine_stats = RecordedEngineStats(
                name=engine.name, cache_policy=engine.cache_policy, cache_budget_bytes=engine.cache_budget_bytes,
                budget_experts=engine.cache_budget_bytes / mean_bytes, recorded_hit_rate=float(rec.mean()),
                replay_hit_rate=replay, agreement=replay_agree,
            )

    layers = []
    for layer in range(L):
        c = counts[layer]
        total = int(c.sum())
        if total == 0:
            layers.append(LayerStats(layer, 0, 0, 0.0, 0.0, [], c.tolist(), None, None, None, None))
            continue
        share = c / total
        nz = share[share > 0]
        top = np.lexsort((np.arange(E), -c))  # most used first, ties by expert id
        layers.append(LayerStats(
            layer=layer, accesses=total, distinct=int((c > 0).sum()),
            entropy=float(-(nz * np.log(nz)).sum() / math.log(E)) if E > 1 else 0.0,
            hot_k_share=float(c[top[:k]].sum() / total),
            top_experts=[(int(e), float(share[e])) for e in top[:TOP_EXPERTS_LISTED] if c[e] > 0],
            counts=c.tolist(),
            reuse_prev=float(reuse_num[layer] / reuse_den[layer]) if reuse_den[layer] else None,
            next_layer_guess=(float(guess_num[layer] / guess_den[layer])
                              if guess_den is not None and guess_den[layer] else None),
            recorded_hit=float(rec_rate[layer]) if rec_rate is not None else None,
            replay_hit=float(replay_rate[layer]) if replay_rate is not None else None,
        ))
    src = trace.meta.source
    return TraceStats(
        name=name or (trace.path.stem if trace.path else "trace"),
        model_id=trace.meta.model.model_id, num_layers=L, num_experts=E, top_k=k, dtype=trace.meta.dtype,
        mean_expert_bytes=float(np.mean(trace.meta.expert_bytes)), phase=phase,
        requests=int(np.unique(trace.request[rows]).size), cells=int(rows.sum()), accesses=int(rows.sum()) * k,
        warmup_cells=int((~rows).sum()), layers=layers,
        reuse_prev=float(reuse_num.sum() / reuse_den.sum()) if reuse_den.sum() else None,
        next_layer_guess=float(guess_num.sum() / guess_den.sum()) if guess_den is not None and guess_den.sum() else None,
        recorded_engine=engine_stats, lru_layer=lru_layer, lru_global=lru_global,
        source=(f"{src.format} import of {Path(src.path).name}" if src.kind == "import" else src.kind),
        notes=[] if trace.complete else ["the run that wrote this trace was interrupted; it holds finished requests"],
    )


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------
def _budget(n: int) -> str:
    return f"{n / 2**20:g} MiB"


def _pct(x: Optional[float], digits: int = 1) -> str:
    return "-" if x is None else f"{x * 100:.{digits}f}%"


def table_capacities(num_experts: int, top_k: int) -> list[int]:
    caps = {1, 2, 4, 8, 16, 32, 64, top_k, 2 * top_k, num_experts // 4, num_experts // 2, num_experts}
    return sorted(c for c in caps if 1 <= c <= num_experts)


def format_text(st: TraceStats) -> str:
    L, E, k = st.num_layers, st.num_experts, st.top_k
    out: list[str] = []
    out.append(f"{st.name}: {st.model_id}, {L} MoE layers x {E} experts, top-{k}, {st.dtype} "
               f"({format_bytes(st.mean_expert_bytes)} per expert)")
    if st.source:
        out.append(f"source: {st.source}")
    other = "prefill" if st.phase == "decode" else "decode"
    warm = f"; the cache also sees {st.warmup_cells} {other} cells" if st.warmup_cells and st.phase != "all" else ""
    out.append(f"phase {st.phase}: {st.requests} request(s), {st.cells} cells (token x layer), "
               f"{st.accesses} routed experts{warm}")
    out.extend(f"note: {n}" for n in st.notes)
    used = [ls for ls in st.layers if ls.accesses]
    distinct = [ls.distinct for ls in used]
    out.append("")
    out.append(f"Routing ({st.phase})")
    rows = [
        ("experts used per layer", f"{np.mean(distinct):.1f} of {E} (min {min(distinct)}, max {max(distinct)})"),
        ("normalized entropy", f"{np.mean([ls.entropy for ls in used]):.3f} (mean over layers; 1 = uniform)"),
        (f"share of the {k} hottest per layer", f"{_pct(_weighted(used, 'hot_k_share'))} (a static top-{k} "
                                                 f"cache's hit rate, from hindsight)"),
        ("used at position t-1 too", f"{_pct(st.reuse_prev)} (same layer, previous "
                                     f"{'' if st.phase == 'all' else st.phase + ' '}token)"),
        ("next-layer guess accuracy", _pct(st.next_layer_guess) if st.next_layer_guess is not None
         else "- (not recorded)"),
    ]
    eng = st.recorded_engine
    if eng is not None:
        rows.append(("recorded engine hit rate", f"{_pct(eng.recorded_hit_rate)} ({eng.name}, {eng.cache_policy}, "
                                                  f"{_budget(eng.cache_budget_bytes)}: "
                                                  f"{int(eng.budget_experts)} experts)"))
        if eng.replay_hit_rate is not None:
            rows.append(("replayed by a global LRU", f"{_pct(eng.replay_hit_rate)}, agreeing with the record on "
                                                     f"{_pct(eng.agreement, 2)} of routed experts"))
    width = max(len(r[0]) for r in rows)
    out.extend(f"  {label:<{width}}  {value}" for label, value in rows)

    out.append("")
    ll, lg = st.lru_layer, st.lru_global
    out.append(f"LRU hit rate vs cache size ({st.phase}; a cell's {k} experts are looked up together, then "
               f"inserted)")
    out.append(f"  {'experts/layer':>13}  {'memory':>10}  {'per-layer LRU':>13}  {'global LRU':>10}")
    for c in table_capacities(E, k):
        tag = " (k)" if c == k else " (all)" if c == E else ""
        out.append(f"  {str(c) + tag:>13}  {format_bytes(c * L * st.mean_expert_bytes):>10}  "
                   f"{_pct(ll.hit_rate(c)):>13}  {_pct(lg.hit_rate(c * L)):>10}")
    out.append(f"  global LRU: same total entries (experts/layer x {L}) shared by all layers. First uses "
               f"({_pct(ll.cold_misses / max(ll.accesses, 1))} of routed experts) miss at every size.")
    if eng is not None:
        c_eng = int(eng.budget_experts)
        out.append(f"  at the recorded engine's budget ({c_eng} experts of mean size, {c_eng / L:.1f} per layer): "
                   f"global LRU {_pct(lg.hit_rate(c_eng))}")

    out.append("")
    out.append(f"Per layer ({st.phase})")
    head = f"  {'layer':>5} {'used':>4} {'entropy':>7} {'hot-' + str(k):>6} {'t-1':>6} {'LRU@' + str(k):>6}"
    if st.next_layer_guess is not None:
        head += f" {'guess':>6}"
    if eng is not None or any(ls.recorded_hit is not None for ls in used):
        head += f" {'record':>6}"
    head += "  top experts (share)"
    out.append(head)
    for ls in st.layers:
        if not ls.accesses:
            out.append(f"  {ls.layer:>5}  (no {st.phase} rows)")
            continue
        line = (f"  {ls.layer:>5} {ls.distinct:>4} {ls.entropy:>7.3f} {_pct(ls.hot_k_share):>6} "
                f"{_pct(ls.reuse_prev):>6} {_pct(ll.layer_hits[ls.layer, k] / ls.accesses):>6}")
        if st.next_layer_guess is not None:
            line += f" {_pct(ls.next_layer_guess):>6}"
        if eng is not None or ls.recorded_hit is not None:
            line += f" {_pct(ls.recorded_hit):>6}"
        line += "  " + " ".join(f"{e}:{s * 100:.1f}%" for e, s in ls.top_experts[:4])
        out.append(line)
    return "\n".join(out) + "\n"


def _weighted(layers: list[LayerStats], attr: str) -> Optional[float]:
    total = sum(ls.accesses for ls in layers)
    return sum(getattr(ls, attr) * ls.accesses for ls in layers) / total if total else None


def _r(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(float(x), 6)


def _curve_json(curve: LruHitCurve, per_layer: bool) -> dict[str, Any]:
    d: dict[str, Any] = {
        "scope": curve.scope,
        "capacity_unit": "experts per layer" if curve.scope == "layer" else "experts across all layers",
        "accesses": curve.accesses,
        "cold_misses": curve.cold_misses,
        "hits": curve.hits.tolist(),
        "hit_rate": [_r(x) for x in curve.hit_rates],
    }
    if per_layer:
        d["layer_accesses"] = curve.layer_accesses.tolist()
        d["layer_hits"] = curve.layer_hits.tolist()
    return d


def to_json_dict(st: TraceStats) -> dict[str, Any]:
    """Plain data with a fixed key order (dicts keep insertion order)."""
    eng = st.recorded_engine
    return {
        "trace": st.name,
        "source": st.source,
        "model": {"model_id": st.model_id, "num_layers": st.num_layers, "num_experts": st.num_experts,
                  "top_k": st.top_k, "dtype": st.dtype, "mean_expert_bytes": _r(st.mean_expert_bytes)},
        "phase": st.phase,
        "requests": st.requests,
        "cells": st.cells,
        "accesses": st.accesses,
        "warmup_cells": st.warmup_cells,
        "summary": {
            "mean_experts_used_per_layer": _r(np.mean([ls.distinct for ls in st.layers if ls.accesses])),
            "mean_normalized_entropy": _r(np.mean([ls.entropy for ls in st.layers if ls.accesses])),
            "hot_k_share": _r(_weighted([ls for ls in st.layers if ls.accesses], "hot_k_share")),
            "reuse_prev": _r(st.reuse_prev),
            "next_layer_guess": _r(st.next_layer_guess),
        },
        "recorded_engine": None if eng is None else {
            "name": eng.name, "cache_policy": eng.cache_policy, "cache_budget_bytes": eng.cache_budget_bytes,
            "budget_experts": _r(eng.budget_experts), "recorded_hit_rate": _r(eng.recorded_hit_rate),
            "replay_hit_rate": _r(eng.replay_hit_rate), "agreement": _r(eng.agreement),
        },
        "layers": [
            {"layer": ls.layer, "accesses": ls.accesses, "experts_used": ls.distinct, "entropy": _r(ls.entropy),
             "hot_k_share": _r(ls.hot_k_share), "top_experts": [[e, _r(s)] for e, s in ls.top_experts],
             "reuse_prev": _r(ls.reuse_prev), "next_layer_guess": _r(ls.next_layer_guess),
             "recorded_hit_rate": _r(ls.recorded_hit), "replay_hit_rate": _r(ls.replay_hit), "counts": ls.counts}
            for ls in st.layers
        ],
        "lru": {
            "semantics": "a cell's k experts are looked up against the cache before the cell, then inserted; "
                         "hits[c] = accesses whose stack distance (distinct other keys since the key's last "
                         "use in an earlier cell) is < c",
            "per_layer": _curve_json(st.lru_layer, per_layer=True),
            "global": _curve_json(st.lru_global, per_layer=False),
        },
        "notes": st.notes,
    }


def write_plot(st: TraceStats, path: str | Path) -> Path:
    """Hit rate vs capacity for both scopes, PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L, E = st.num_layers, st.num_experts
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ll, lg = st.lru_layer, st.lru_global
    caps = ll.capacities
    for layer in range(L):
        if ll.layer_accesses[layer]:
            ax1.plot(caps, ll.layer_hits[layer] / ll.layer_accesses[layer], color="0.8", lw=0.6)
    ax1.plot(caps, ll.hit_rates, color="C0", lw=2, label="all layers")
    ax1.axvline(st.top_k, color="0.5", ls=":", lw=1)
    ax1.set_xlabel("cache capacity (experts per layer)")
    ax1.set_ylabel(f"LRU hit rate ({st.phase})")
    ax1.set_title("one LRU per layer (grey: each layer)")
    ax1.set_xlim(0, E)
    ax1.set_ylim(0, 1)
    ax1.legend(loc="lower right")
    ax2.plot(lg.capacities / L, lg.hit_rates, color="C1", lw=2, label="global LRU")
    ax2.plot(caps, ll.hit_rates, color="C0", lw=1, ls="--", label="per-layer LRU, same total")
    if st.recorded_engine is not None:
        eng = st.recorded_engine
        ax2.axvline(eng.budget_experts / L, color="C3", ls=":", lw=1)
        ax2.plot([eng.budget_experts / L], [eng.recorded_hit_rate], "o", color="C3",
                 label=f"{eng.name} recorded ({_budget(eng.cache_budget_bytes)})")
    ax2.set_xlabel(f"cache capacity (experts across layers / {L})")
    ax2.set_title("one LRU shared by all layers")
    ax2.set_xlim(0, E)
    ax2.set_ylim(0, 1)
    ax2.legend(loc="lower right")
    fig.suptitle(f"{st.name}: {st.model_id}, top-{st.top_k}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


@click.command(name="stats")
@click.argument("trace", required=False, metavar="TRACE")
@click.option("--json", "json_path", default=None, metavar="FILE", help="Also write the statistics as JSON to FILE "
              "('-': only the JSON, to stdout), as --json FILE does in every command.")
@click.option("--plot", "plot", default=None, metavar="FILE.png", help="Also draw the LRU hit curves to FILE.png.")
@click.option("--phase", default="decode", show_default=True, metavar="decode|prefill|all",
              help="Which accesses are counted (the cache always sees the whole trace in order).")
@click.option("--against", default=None, metavar="T2",
              help="Compare with a second trace side by side: popularity, reuse at lags 1-4, LRU and Belady "
                   "curves, next-layer predictability.")
def stats_command(trace: Optional[str], json_path: Optional[str], plot: Optional[str], phase: str,
                  against: Optional[str]) -> None:
    """Summarise TRACE (a trace file, or a bundled trace name; default the bundled Qwen3 trace).

    Expert popularity and entropy per layer, reuse between consecutive tokens, next-layer-guess accuracy
    and the recording engine's hit rate when the trace has them, and the LRU hit rate at every cache
    size, per layer and global, from one stack-distance pass.
    """
    from moesim.traces import resolve_trace

    if phase not in PHASES:
        raise MoesimError(f"--phase {phase}: expected one of {', '.join(PHASES)}")
    if plot is not None and Path(plot).suffix.lower() != ".png":
        raise MoesimError(f"--plot {plot}: expected a .png file name")
    from moesim.atomic import check_output_target, write_text_atomic

    path = resolve_trace(trace)
    for target in (plot, None if json_path == "-" else json_path):
        if target is not None:
            check_output_target(target)
    if against is not None:
        from moesim.tracer.compare import caching_stats, format_side_by_side

        if json_path is not None or plot is not None:
            raise MoesimError("--against: prints a text table; not used with --json or --plot")
        other = resolve_trace(against)
        a, b = read_trace(path), read_trace(other)
        if (a.meta.num_layers, a.meta.num_experts, a.meta.top_k) != (b.meta.num_layers, b.meta.num_experts, b.meta.top_k):
            raise MoesimError(f"--against {against}: {b.meta.num_layers} MoE layers x {b.meta.num_experts} experts "
                              f"top-{b.meta.top_k}, expected the shape of {path.name} ({a.meta.num_layers} x "
                              f"{a.meta.num_experts} top-{a.meta.top_k})")
        click.echo(format_side_by_side(caching_stats(a, path.stem, phase), caching_stats(b, other.stem, phase), phase),
                   nl=False)
        return
    tr = read_trace(path)
    name = trace if trace and not Path(trace).exists() else path.stem
    st = trace_stats(tr, phase=phase, name=name)
    if plot is not None:
        write_plot(st, plot)
    text = json.dumps(to_json_dict(st), separators=(",", ":"))
    if json_path == "-":
        click.echo(text)
        return
    click.echo(format_text(st), nl=False)
    if plot is not None:
        click.echo(f"\nwrote {plot}")
    if json_path is not None:
        write_text_atomic(json_path, text + "\n")
        click.echo(f"wrote {json_path}")
