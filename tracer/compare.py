"""Caching-relevant statistics of a trace, and two traces side by side (``moesim trace stats --against``).

- popularity: per-layer normalized entropy of the counted phase;
- reuse at lag j: share of a cell's k experts also routed j positions earlier (same request, layer, phase);
- LRU hit rate at every capacity, one cache per layer and one global cache (``tracer/stats.py``);
- Belady (MIN with bypass) hit rate per layer, cells looked up together then inserted like the LRU;
- next-layer predictability: share of layer l+1's experts that a causal co-occurrence predictor names
  from layer l's experts of the same token (counts from earlier tokens of the trace only);
- token-level recurrence: how much lag-1 reuse varies from token to token (standard deviation over tokens of
  the share of all a token's experts, every layer, also routed one position earlier) beside what layers
  reusing independently would give. Real routing repeats in whole tokens (a token routed like the one
  before at most layers at once), which a cache shared across layers feels and per-layer statistics miss.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from moesim.tracer.format import DECODE, PREFILL, Trace
from moesim.tracer.stats import _find_rows, _overlap, _phase_rows, _row_index, _row_key, lru_hit_curve, table_capacities

LAGS = (1, 2, 3, 4)


def reuse_at_lags(trace: Trace, phase: str = "decode", lags: Sequence[int] = LAGS) -> dict[int, float]:
    rows = _phase_rows(trace, phase)
    idx = np.flatnonzero(rows)
    k = trace.meta.top_k
    sorted_keys, order = _row_index(trace)
    out = {}
    for lag in lags:
        prev = _find_rows(sorted_keys, order, _row_key(trace.request[idx], trace.position[idx] - lag,
                                                        trace.layer[idx], trace.phase[idx]))
        ok = (prev >= 0) & (trace.position[idx] >= lag)
        if not ok.any():
            out[lag] = float("nan")
            continue
        hit = _overlap(trace.experts[idx[ok]].astype(np.int64), trace.experts[prev[ok]].astype(np.int64))
        out[lag] = float(hit.sum() / (ok.sum() * k))
    return out


def layer_entropy(trace: Trace, phase: str = "decode") -> np.ndarray:
    rows = _phase_rows(trace, phase)
    L, E, k = trace.meta.num_layers, trace.meta.num_experts, trace.meta.top_k
    counts = np.zeros((L, E))
    np.add.at(counts, (np.repeat(trace.layer[rows].astype(np.int64), k),
                       trace.experts[rows].astype(np.int64).reshape(-1)), 1.0)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(share > 0, share * np.log(share), 0.0).sum(axis=1)
    return h / math.log(E) if E > 1 else np.zeros(L)


def belady_hits(trace: Trace, capacities: Sequence[int], phase: str = "decode") -> dict[int, float]:
    """Per-layer Belady MIN hit rate (one cache of c experts per layer, summed over layers), at each c."""
    rows = _phase_rows(trace, phase)
    L, k = trace.meta.num_layers, trace.meta.top_k
    hits = {c: 0 for c in capacities}
    counted_total = int(rows.sum()) * k
    for layer in range(L):
        sel = np.flatnonzero(trace.layer == layer)
        if sel.size == 0:
            continue
        ex = trace.experts[sel].astype(np.int64).tolist()
        counted = rows[sel].tolist()
        n = len(ex)
        # next cell (index) at which each cell's experts are used again; n = never
        nxt = [[n] * k for _ in range(n)]
        last: dict[int, int] = {}
        for i in range(n - 1, -1, -1):
            for j, e in enumerate(ex[i]):
                nxt[i][j] = last.get(e, n)
            for e in ex[i]:
                last[e] = i
        for c in capacities:
            cache: dict[int, int] = {}  # expert -> next use
            h = 0
            for i in range(n):
                cell = ex[i]
                if counted[i]:
                    h += sum(1 for e in cell if e in cache)
                for j, e in enumerate(cell):
                    cache[e] = nxt[i][j]
                if len(cache) > c:
                    # keep the c used soonest (with bypass: a new expert may be dropped at once)
                    drop = heapq.nlargest(len(cache) - c, cache.items(), key=lambda kv: (kv[1], kv[0]))
                    for e, _ in drop:
                        del cache[e]
            hits[c] += h
    return {c: hits[c] / max(counted_total, 1) for c in capacities}


def next_layer_predictability(trace: Trace, phase: str = "decode") -> Optional[float]:
    """Share of layer l+1's experts named by the k experts most often seen at l+1 after this token's layer-l
    experts in earlier tokens (ties to the lower expert id); None for a one-layer trace."""
    L, E, k = trace.meta.num_layers, trace.meta.num_experts, trace.meta.top_k
    if L < 2:
        return None
    rows = _phase_rows(trace, phase)
    ph = DECODE if phase == "decode" else PREFILL
    sel = rows & (trace.phase == ph) if phase != "all" else rows
    idx = np.flatnonzero(sel)
    token = trace.request[idx].astype(np.int64) * (1 << 32) + trace.position[idx].astype(np.int64)
    tok_ids, tidx = np.unique(token, return_inverse=True)
    # per token, the experts of each layer ([T, L, k], -1 where the layer is missing)
    grid = np.full((tok_ids.size, L, k), -1, dtype=np.int64)
    grid[tidx, trace.layer[idx].astype(np.int64)] = trace.experts[idx]
    # tokens in execution order: by request then position (np.unique sorted them so)
    co = np.zeros((L - 1, E, E))
    hit = total = 0
    lidx = np.arange(L - 1)[:, None]
    for t in range(tok_ids.size):
        cur, nxt = grid[t, :-1], grid[t, 1:]
        ok = (cur >= 0).all(axis=1) & (nxt >= 0).all(axis=1)
        if t > 0 and ok.any():
            score = co[lidx, np.maximum(cur, 0)].sum(axis=1)  # [L-1, E]
            pred = np.argsort(-score, axis=1, kind="stable")[:, :k]
            hit += int(_overlap(nxt[ok], pred[ok]).sum())
            total += int(ok.sum()) * k
        for j in range(k):
            for j2 in range(k):
                np.add.at(co, (np.arange(L - 1)[ok], cur[ok, j], nxt[ok, j2]), 1.0)
    return hit / total if total else None


@dataclass(frozen=True)
class TokenRecurrence:
    mean: float  # lag-1 reuse over all (token, layer, rank)
    spread: float  # standard deviation over tokens of each token's lag-1 reuse share
    independent: float  # the spread if each (layer, rank) reused independently at its layer's rate


def token_recurrence(trace: Trace, phase: str = "decode") -> Optional[TokenRecurrence]:
    """Lag-1 reuse per token (all its layers and ranks together), and its spread over tokens; None when no
    token has a complete cell one position earlier at any layer."""
    rows = _phase_rows(trace, phase)
    idx = np.flatnonzero(rows)
    k = trace.meta.top_k
    sorted_keys, order = _row_index(trace)
    prev = _find_rows(sorted_keys, order, _row_key(trace.request[idx], trace.position[idx] - 1,
                                                    trace.layer[idx], trace.phase[idx]))
    ok = prev >= 0
    if not ok.any():
        return None
    idx, prev = idx[ok], prev[ok]
    hit = _overlap(trace.experts[idx].astype(np.int64), trace.experts[prev].astype(np.int64)).astype(np.float64)
    token = trace.request[idx].astype(np.int64) * (1 << 32) + trace.position[idx].astype(np.int64)
    _, tok = np.unique(token, return_inverse=True)
    slots = np.bincount(tok) * k
    share = np.bincount(tok, weights=hit) / slots
    layer = trace.layer[idx].astype(np.int64)
    rate = np.bincount(layer, weights=hit) / np.maximum(np.bincount(layer) * k, 1)  # per layer
    # independent (layer, rank) slots: a token's share has variance sum_l k p_l (1 - p_l) / slots^2
    var_ind = np.bincount(tok, weights=k * rate[layer] * (1 - rate[layer])) / slots**2
    return TokenRecurrence(mean=float(hit.sum() / (idx.size * k)), spread=float(share.std()),
                           independent=float(np.sqrt(var_ind.mean())))


@dataclass(frozen=True)
class CachingStats:
    name: str
    layers: int
    experts: int
    top_k: int
    entropy: np.ndarray  # [L]
    reuse: dict[int, float]
    lru_layer: np.ndarray  # [E+1] hit rate at c experts per layer
    lru_global: np.ndarray  # [E+1] global hit rate at c * L entries
    belady: dict[int, float]
    next_layer: Optional[float]
    recurrence: Optional[TokenRecurrence] = None


def caching_stats(trace: Trace, name: str, phase: str = "decode", belady_caps: Optional[Sequence[int]] = None,
                  with_next_layer: bool = True) -> CachingStats:
    L, E, k = trace.meta.num_layers, trace.meta.num_experts, trace.meta.top_k
    ll = lru_hit_curve(trace, "layer", phase)
    lg = lru_hit_curve(trace, "global", phase)
    caps = list(belady_caps) if belady_caps is not None else table_capacities(E, k)
    return CachingStats(
        name=name, layers=L, experts=E, top_k=k, entropy=layer_entropy(trace, phase),
        reuse=reuse_at_lags(trace, phase), lru_layer=ll.hit_rates,
        lru_global=lg.hit_rates[np.arange(E + 1) * L], belady=belady_hits(trace, caps, phase),
        next_layer=next_layer_predictability(trace, phase) if with_next_layer else None,
        recurrence=token_recurrence(trace, phase),
    )


@dataclass(frozen=True)
class Gaps:
    """Largest absolute differences (rates as fractions) between two traces' statistics."""

    lru_layer: float  # over every capacity 1..E
    lru_global: float
    belady: float  # over the Belady capacities
    reuse: float  # over lags 1-4
    entropy_max: float  # over layers
    entropy_mean: float  # of the per-layer means

    def meets(self) -> dict[str, bool]:
        """The bars of issue #12: LRU 3 points, Belady 5, reuse 3, per-layer entropy 0.02."""
        return {"lru_layer": self.lru_layer <= 0.03, "lru_global": self.lru_global <= 0.03,
                "belady": self.belady <= 0.05, "reuse": self.reuse <= 0.03, "entropy": self.entropy_max <= 0.02}


def gaps(a: CachingStats, b: CachingStats) -> Gaps:
    return Gaps(
        lru_layer=float(np.abs(a.lru_layer[1:] - b.lru_layer[1:]).max()),
        lru_global=float(np.abs(a.lru_global[1:] - b.lru_global[1:]).max()),
        belady=max((abs(a.belady[c] - b.belady[c]) for c in a.belady if c in b.belady), default=0.0),
        reuse=max(abs(a.reuse[j] - b.reuse[j]) for j in a.reuse if j in b.reuse),
        entropy_max=float(np.abs(a.entropy - b.entropy).max()),
        entropy_mean=float(abs(a.entropy.mean() - b.entropy.mean())),
    )


def _pct(x: Optional[float]) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 100:.1f}%"


def format_side_by_side(a: CachingStats, b: CachingStats, phase: str) -> str:
    """A text table: a's and b's statistics and their difference."""
    if (a.layers, a.experts, a.top_k) != (b.layers, b.experts, b.top_k):
        return (f"{a.name}: {a.layers} x {a.experts} top-{a.top_k}; {b.name}: {b.layers} x {b.experts} "
                f"top-{b.top_k}; only traces of the same shape are compared\n")
    out = [f"{a.name}  vs  {b.name}  ({phase}; differences in points, b - a)", ""]
    w = 34

    def row(label, x, y, fmt=_pct, diff=True):
        d = "" if not diff or x is None or y is None else f"{(y - x) * 100:+.1f}"
        out.append(f"  {label:<{w}} {fmt(x):>9} {fmt(y):>9} {d:>7}")

    out.append(f"  {'':<{w}} {'a':>9} {'b':>9} {'diff':>7}")
    out.append(f"  {'normalized entropy (mean of layers)':<{w}} {a.entropy.mean():>9.3f} {b.entropy.mean():>9.3f} "
               f"{b.entropy.mean() - a.entropy.mean():>+7.3f}")
    out.append(f"  {'  largest per-layer difference':<{w}} {'':>9} {'':>9} "
               f"{float(np.abs(a.entropy - b.entropy).max()):>7.3f}")
    for j in a.reuse:
        row(f"reuse at lag {j}", a.reuse[j], b.reuse.get(j))
    row("next-layer predictability", a.next_layer, b.next_layer)
    ra, rb = a.recurrence, b.recurrence
    if ra is not None and rb is not None:
        row("lag-1 reuse, spread over tokens", ra.spread, rb.spread)
        row("  if layers reused independently", ra.independent, rb.independent)
    for c in table_capacities(a.experts, a.top_k):
        row(f"per-layer LRU, {c} per layer", float(a.lru_layer[c]), float(b.lru_layer[c]))
    for c in table_capacities(a.experts, a.top_k):
        row(f"global LRU, {c} x {a.layers}", float(a.lru_global[c]), float(b.lru_global[c]))
    for c in a.belady:
        if c in b.belady:
            row(f"per-layer Belady, {c} per layer", a.belady[c], b.belady[c])
    g = gaps(a, b)
    out.append("")
    out.append(f"  largest gaps: per-layer LRU {g.lru_layer * 100:.1f} pts (every capacity), global LRU "
               f"{g.lru_global * 100:.1f}, Belady {g.belady * 100:.1f}, reuse lags 1-4 {g.reuse * 100:.1f}, "
               f"per-layer entropy {g.entropy_max:.3f}")
    return "\n".join(out) + "\n"
