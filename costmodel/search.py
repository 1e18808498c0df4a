"""Configuration search: screen the whole space with the cost model, confirm the best with the simulator.

1. Enumerate the space (:func:`moesim.costmodel.space.enumerate_space`) and predict every configuration.
2. Constraints: peak GPU memory (exact arithmetic, the simulator's own), TPOT / TTFT (predicted, with a
   margin so configurations near the bound are still confirmed), perplexity (looked up in a quality
   table, :mod:`moesim.quality.table`).
3. Candidates: the best predicted configuration of each of the ``confirm`` best *families* (policy x
   expert format x non-expert format x batch: neighbouring cache sizes of one family predict alike, so
   diversity covers the model's errors better than near-duplicates), the few best configurations
   overall, and the predicted Pareto front of latency x GPU memory (x perplexity when a quality table
   is given), thinned to a few points spread evenly over memory.
4. The simulator runs the candidates (the sweep machinery, cached on disk); the chosen configuration is
   the best *simulated* one that meets every constraint. If none does, the next predicted candidates
   are confirmed, a bounded number of rounds.
5. When nothing is predicted to meet the constraints, the search says which constraint cannot be met
   and confirms the nearest points instead (smallest relative violation of the constraints).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from moesim.atomic import note_input
from moesim.costmodel.context import TraceProfileContext
from moesim.costmodel.model import OBJECTIVES, CostModel, Predictions
from moesim.costmodel.space import (
    EXPERT_FORMATS,
    NON_EXPERT_FORMATS,
    ORACLE_PRESETS,
    ConfigSet,
    enumerate_space,
    format_label,
    simulate_command,
    sweep_point,
    quality_caveat,
    validate_command,
    validate_gap,
)
from moesim.errors import MoesimError
from moesim.quant import WeightFormat

MIB = 2**20
GIB = 2**30
PREDICTION_MARGIN = 0.05  # configurations predicted within 5% of a latency bound are still confirmed
TOP_OVERALL = 3  # the best predicted configurations, whatever their family
ROUNDS = 3


@dataclass(frozen=True)
class Constraints:
    max_gpu_mem: Optional[int] = None  # bytes
    max_tpot: Optional[float] = None  # seconds
    max_ttft: Optional[float] = None
    max_ppl: Optional[float] = None

    def describe(self, device_bytes: int) -> str:
        parts = [f"peak GPU memory <= {_gib(self.memory_limit(device_bytes))}"
                 + ("" if self.max_gpu_mem is not None else " (the profile's device)")]
        if self.max_tpot is not None:
            parts.append(f"TPOT <= {_ms(self.max_tpot)}")
        if self.max_ttft is not None:
            parts.append(f"TTFT <= {_sec(self.max_ttft)}")
        if self.max_ppl is not None:
            parts.append(f"perplexity <= {self.max_ppl:g}")
        return ", ".join(parts)

    def memory_limit(self, device_bytes: int) -> int:
        return int(self.max_gpu_mem) if self.max_gpu_mem is not None else int(device_bytes)


@dataclass(frozen=True)
class SpaceSpec:
    policies: tuple[str, ...]
    cache_sizes: tuple[int, ...]
    expert_formats: tuple[Optional[str], ...]
    non_expert_formats: tuple[Optional[str], ...]
    batches: tuple[int, ...]


def default_space(ctx: TraceProfileContext, policies: Optional[Sequence[str]] = None) -> SpaceSpec:
    from moesim.simulator.presets import PRESETS

    pols = tuple(policies) if policies else tuple(p for p in PRESETS.names() if p not in ORACLE_PRESETS)
    requests = ctx.features(1, _off()).requests
    batches = tuple(b for b in (1, 2, 4, 8, 16) if b <= max(requests, 1))
    return SpaceSpec(pols, tuple(range(ctx.E + 1)), EXPERT_FORMATS, NON_EXPERT_FORMATS, batches)


def build_space(spec: SpaceSpec, num_experts: int) -> ConfigSet:
    """The grid, with all-gpu at the one cache size that means anything (every expert resident)."""
    grid = enumerate_space(spec.policies, spec.cache_sizes, spec.expert_formats, spec.non_expert_formats,
                           spec.batches)
    if "all-gpu" in spec.policies:
        ag = spec.policies.index("all-gpu")
        keep = (grid.policy != ag) | (grid.cache_experts == max(spec.cache_sizes))
        grid = grid.take(np.flatnonzero(keep))
    return grid


# ---- quality ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QualityLookup:
    """Perplexity of each configuration's expert format (and gating) from a quality table."""

    path: str
    model: str
    per_config: np.ndarray  # float [n], NaN where the table has no row
    notes: tuple[str, ...]


def lookup_quality(ctx: TraceProfileContext, configs: ConfigSet, table_path: str, model: Optional[str]) -> QualityLookup:
    from moesim.quality.table import load_quality_table, lookup_perplexity
    from moesim.simulator.gating import ADAPMOE_BUDGET
    from moesim.simulator.compose import policy_spec
    from moesim.simulator.run import trace_format

    note_input(table_path)
    table = load_quality_table(table_path)
    name = model or ctx.shape.model_id
    if not table.rows_for(name):
        known = ", ".join(table.models()) or "none"
        raise MoesimError(f"--quality-table {table_path}: no rows for model '{name}' (models: {known}); "
                          "name the table's model with --quality-model")
    notes = []
    own = trace_format(ctx.meta.dtype)
    if any(f is None for f in configs.expert_formats):
        notes.append(f"the trace's own expert format ({ctx.meta.dtype}) is looked up as {own.name}")
    values = {}
    for fi, fmt in enumerate(configs.expert_formats):
        wf = own if fmt is None else WeightFormat.parse(fmt)
        for gated in (False, True):
            try:
                # Gated rows must be the simulator's AdapMoE rule (per-layer thresholds stretched over depth),
                # not a table's uniform-threshold rows at the same budget.
                values[(fi, gated)] = lookup_perplexity(
                    table, name, wf.bits, wf.group_size, ADAPMOE_BUDGET if gated else 0.0, ctx.k,
                    gating_sensitivity="adapmoe-loglinear" if gated else None)
            except MoesimError as exc:
                values[(fi, gated)] = math.nan
                note = exc.message
                if note not in notes:
                    notes.append(note)
    gated_policy = np.asarray([policy_spec(p).gating.enabled for p in configs.policies])[configs.policy]
    per = np.asarray([values[(int(f), bool(g))] for f, g in zip(configs.expert_format, gated_policy)])
    return QualityLookup(str(table_path), name, per, tuple(notes))


# ---- results ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Confirmed:
    """A configuration the simulator ran: its predictions and its simulated result row."""

    index: int  # into the space
    config: tuple  # (policy, cache_experts, expert_bits, non_expert_bits, batch)
    predicted: dict[str, float]
    simulated: dict  # the sweep row
    perplexity: float
    meets: bool  # meets every constraint, simulated
    violations: tuple[str, ...]

    def value(self, metric: str) -> float:
        key = {"tpot": "tpot_mean_s", "ttft": "ttft_mean_s", "tokens-per-s": "tokens_per_s",
               "memory": "peak_gpu_mib"}[metric]
        v = self.simulated.get(key)
        return math.nan if v is None else float(v)


@dataclass
class SearchResult:
    trace: str
    profile: str
    objective: str
    constraints: Constraints
    memory_limit: int
    device_bytes: int
    space: ConfigSet
    predictions: Predictions
    predict_seconds: float
    feasible_predicted: int
    confirmed: list[Confirmed]
    chosen: Optional[Confirmed]
    front: list[Confirmed]
    nearest: list[Confirmed] = field(default_factory=list)
    quality: Optional[QualityLookup] = None
    notes: list[str] = field(default_factory=list)
    infeasible_reason: str = ""
    model_stale: list[str] = field(default_factory=list)

    @property
    def simulator_calls(self) -> int:
        return len({c.index for c in self.confirmed} | {c.index for c in self.nearest})

    @property
    def found(self) -> bool:
        return self.chosen is not None


# ---- the search ------------------------------------------------------------------------------------------
def _objective_values(pred: Predictions, objective: str) -> np.ndarray:
    v = pred.objective(objective).astype(np.float64)
    return np.where(np.isfinite(v), v, np.inf)


def latency_metric(objective: str) -> str:
    return "ttft" if objective == "ttft" else ("tokens-per-s" if objective == "tokens-per-s" else "tpot")


def pareto_mask(costs: np.ndarray) -> np.ndarray:
    """Rows of ``costs`` [n, d] (lower is better) that no other row dominates (of identical rows, the
    first is kept). Rows with a non-finite cost are never on the front."""
    costs = np.asarray(costs, dtype=np.float64)
    n, d = costs.shape
    ok = np.all(np.isfinite(costs), axis=1)
    if d == 2:
        return pareto_mask_2d(costs[:, 0], costs[:, 1]) & ok
    if d == 3:
        levels = np.unique(costs[ok, 2])
        if len(levels) <= 256:
            return _pareto_levels(costs, ok, levels)
    keep = np.zeros(n, dtype=bool)
    order = np.flatnonzero(ok)[np.lexsort(costs[ok].T[::-1])]
    front: list[np.ndarray] = []
    for i in order:
        c = costs[i]
        if not any(np.all(b <= c) for b in front):
            keep[i] = True
            front.append(c)
    return keep


def _pareto_levels(costs: np.ndarray, ok: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """3-D front when the third cost takes few values: a row at level v is dominated iff some row with
    third cost <= v comes before it in (first, second, third) order with a second cost no larger."""
    keep = np.zeros(len(costs), dtype=bool)
    for v in levels:
        cand = np.flatnonzero(ok & (costs[:, 2] <= v))
        order = cand[np.lexsort((costs[cand, 2], costs[cand, 1], costs[cand, 0]))]
        second = costs[order, 1]
        before = np.concatenate([[np.inf], np.minimum.accumulate(second)[:-1]])
        mine = costs[order, 2] == v
        keep[order[mine & (before > second)]] = True
    return keep


def pareto_mask_2d(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """2-D front (lower is better): sort by x then y; keep a row when its y beats every row before it."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.zeros(len(x), dtype=bool)
    idx = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    order = idx[np.lexsort((y[idx], x[idx]))]
    before = np.concatenate([[np.inf], np.minimum.accumulate(y[order])[:-1]])
    keep[order[y[order] < before]] = True
    return keep


def _front_costs(pred: Predictions, objective: str, ppl: Optional[np.ndarray]) -> np.ndarray:
    lat = pred.objective(latency_metric(objective)).astype(np.float64)
    cols = [lat, pred.peak_gpu_bytes.astype(np.float64)]
    if ppl is not None:
        cols.append(np.where(np.isfinite(ppl), ppl, np.inf))
    return np.stack(cols, axis=1)


def thin_front(indices: np.ndarray, memory: np.ndarray, points: int) -> np.ndarray:
    """At most ``points`` of a front's members, spread evenly over memory: the member nearest to each of
    ``points`` evenly spaced memory values (both ends kept)."""
    if len(indices) <= points:
        return indices
    order = indices[np.argsort(memory[indices], kind="stable")]
    m = memory[order]
    targets = np.linspace(m[0], m[-1], points)
    picks = np.unique(np.abs(m[None, :] - targets[:, None]).argmin(axis=1))
    return order[picks]


def family_leaders(configs: ConfigSet, ranked: np.ndarray, count: int, start: int = 0) -> list[int]:
    """The best-ranked configuration of each family, for families ``start`` .. ``start + count`` in rank order."""
    fam = ((configs.policy.astype(np.int64) * len(configs.expert_formats) + configs.expert_format)
           * len(configs.non_expert_formats) + configs.non_expert_format) * 4096 + configs.batch
    _, first = np.unique(fam[ranked], return_index=True)
    leaders = ranked[np.sort(first)]
    return [int(i) for i in leaders[start:start + count]]


def _violation(pred: Predictions, c: Constraints, limit: int, ppl: Optional[np.ndarray]) -> np.ndarray:
    """Summed relative violation (log ratio) of every constraint; 0 when all are met."""
    v = np.maximum(0.0, np.log(np.maximum(pred.peak_gpu_bytes, 1) / limit))
    if c.max_tpot is not None:
        v = v + np.maximum(0.0, np.log(pred.tpot_s / c.max_tpot))
    if c.max_ttft is not None:
        v = v + np.maximum(0.0, np.log(pred.ttft_s / c.max_ttft))
    if c.max_ppl is not None and ppl is not None:
        v = v + np.where(np.isfinite(ppl), np.maximum(0.0, np.log(ppl / c.max_ppl)), np.inf)
    return np.where(pred.valid, v, np.inf)


def predicted_feasible(pred: Predictions, c: Constraints, limit: int, ppl: Optional[np.ndarray],
                       margin: float) -> np.ndarray:
    ok = pred.valid & (pred.peak_gpu_bytes <= limit)
    if c.max_tpot is not None:
        ok &= pred.tpot_s <= c.max_tpot * (1 + margin)
    if c.max_ttft is not None:
        ok &= pred.ttft_s <= c.max_ttft * (1 + margin)
    if c.max_ppl is not None:
        ok &= np.isfinite(ppl) & (ppl <= c.max_ppl) if ppl is not None else False
    return ok


def _check(row: dict, c: Constraints, limit: int, ppl: float) -> tuple[bool, tuple[str, ...]]:
    out = []
    if not row.get("feasible"):
        reason = row.get("reason") or "does not fit"
        out.append(reason if reason.startswith("error") else "does not fit in the memory budget")
    else:
        if row["peak_gpu_mib"] * MIB > limit:
            out.append(f"peak {row['peak_gpu_mib']:.0f} MiB > {limit / MIB:.0f} MiB")
        if c.max_tpot is not None and not (row["tpot_mean_s"] <= c.max_tpot):
            out.append(f"TPOT {_ms(row['tpot_mean_s'])} > {_ms(c.max_tpot)}")
        if c.max_ttft is not None and not (row["ttft_mean_s"] <= c.max_ttft):
            out.append(f"TTFT {_sec(row['ttft_mean_s'])} > {_sec(c.max_ttft)}")
    if c.max_ppl is not None and not (ppl <= c.max_ppl):
        out.append(f"perplexity {ppl:.3f} > {c.max_ppl:g}" if math.isfinite(ppl) else "no perplexity in the table")
    return not out, tuple(out)


class Confirmer:
    """Runs configurations through the simulator (the sweep machinery), caching rows on disk."""

    def __init__(self, ctx: TraceProfileContext, gpu_mem_bytes: Optional[int], jobs: int = 0,
                 cache_dir: Optional[Path] = None, log: Callable[[str], None] = lambda m: None,
                 progress: bool = False):
        from moesim.costmodel.dataset import cache_root, moesim_hash, profile_hash, trace_hash

        self.ctx = ctx
        self.gpu_mem_bytes = gpu_mem_bytes
        self.jobs = jobs
        self.log = log
        self.progress = progress
        self.calls = 0
        self.dir = cache_dir or (cache_root() / "search" / moesim_hash()[:16]
                                 / f"{ctx.label}-{trace_hash(ctx.trace_spec)[:12]}"
                                 / f"{Path(ctx.profile_spec).stem}-{profile_hash(ctx.profile_spec)[:12]}")

    def run(self, configs: ConfigSet, index: np.ndarray, gpu_mem_bytes: Optional[int] = -1) -> list[dict]:
        from moesim.simulator.sweep import point_keys, run_sweep

        mem = self.gpu_mem_bytes if gpu_mem_bytes == -1 else gpu_mem_bytes
        points = [sweep_point(self.ctx.trace_spec, self.ctx.profile_spec, configs.row(int(i)), mem) for i in index]
        if not points:
            return []
        self.calls += len(points)
        self.log(f"confirming {len(points)} configurations with the simulator")
        rows = run_sweep(points, self.dir, jobs=self.jobs, progress=self.progress,
                         label="search: confirming")
        by_key = {r["point_key"]: r for r in rows}
        return [by_key[k] for k in point_keys(points)]


def _predicted_dict(pred: Predictions, i: int) -> dict[str, float]:
    return {"tpot_s": float(pred.tpot_s[i]), "ttft_s": float(pred.ttft_s[i]),
            "tokens_per_s": float(pred.tokens_per_s[i]), "peak_gpu_bytes": float(pred.peak_gpu_bytes[i]),
            "hit_rate": float(pred.hit_rate[i])}


def search(trace: str, profile: str, objective: str = "tpot", constraints: Constraints = Constraints(),
           model: Optional[CostModel] = None, space: Optional[SpaceSpec] = None, quality_table: Optional[str] = None,
           quality_model: Optional[str] = None, confirm: int = 8, front_points: int = 10, jobs: int = 0,
           cache_dir: Optional[Path] = None, log: Callable[[str], None] = lambda m: None,
           progress: bool = False) -> SearchResult:
    if objective not in OBJECTIVES:
        raise MoesimError(f"--objective {objective}: expected one of {', '.join(OBJECTIVES)}")
    if constraints.max_ppl is not None and quality_table is None:
        raise MoesimError("--max-ppl needs perplexities: pass --quality-table PATH (written by `moesim quality`)")
    if confirm < 1:
        raise MoesimError(f"--confirm {confirm}: expected a positive integer")
    model = model or CostModel.load()
    ctx = TraceProfileContext(trace, profile)
    spec = space or default_space(ctx)
    configs = build_space(spec, ctx.E)
    if len(configs) == 0:
        raise MoesimError("the search space is empty")
    # before the predictions, so a bad table fails at once rather than after them (seconds on a large space)
    quality = lookup_quality(ctx, configs, quality_table, quality_model) if quality_table else None
    device = int(ctx.profile.device.memory_bytes)
    limit = constraints.memory_limit(device)
    log(f"predicting {len(configs)} configurations")
    t0 = time.perf_counter()
    pred = model.predict(ctx, configs)
    predict_s = time.perf_counter() - t0
    ppl = quality.per_config if quality is not None else None
    notes = list(quality.notes) if quality is not None else []
    invalid = sorted({r for r in pred.reason if r})
    notes += [f"not searched: {r}" for r in invalid]
    confirmer = Confirmer(ctx, constraints.max_gpu_mem, jobs, cache_dir, log, progress)
    ok_margin = predicted_feasible(pred, constraints, limit, ppl, PREDICTION_MARGIN)
    ok_strict = predicted_feasible(pred, constraints, limit, ppl, 0.0)
    result = SearchResult(trace, profile, objective, constraints, limit, device, configs, pred, predict_s,
                          int(ok_strict.sum()), [], None, [], quality=quality, notes=notes,
                          model_stale=model.stale_reasons() if model.meta.get("moesim_sha256") else [])
    if not ok_margin.any():
        result.infeasible_reason = _why_infeasible(pred, constraints, limit, ppl)
        result.nearest = _confirm_nearest(ctx, configs, pred, constraints, limit, ppl, confirmer, objective)
        return result

    obj = _objective_values(pred, objective)
    mem = pred.peak_gpu_bytes.astype(np.float64)
    # rank: objective, then memory, then grid order (deterministic)
    rank = np.lexsort((np.arange(len(configs)), mem, obj))
    ranked = rank[ok_margin[rank]]
    front_mask = ok_strict.copy()
    if front_mask.any():
        costs = _front_costs(pred, objective, ppl)
        sub = np.flatnonzero(front_mask)
        fm = pareto_mask(costs[sub])
        front_idx = thin_front(sub[fm], mem, front_points)
    else:
        front_idx = np.zeros(0, dtype=int)

    confirmed: dict[int, Confirmed] = {}

    def confirm_indices(idx: Sequence[int], as_front: bool = False) -> None:
        todo = [i for i in dict.fromkeys(int(j) for j in idx) if i not in confirmed]
        rows = confirmer.run(configs, np.asarray(todo, dtype=int))
        for i, row in zip(todo, rows):
            p = float(ppl[i]) if ppl is not None else math.nan
            meets, why = _check(row, constraints, limit, p)
            confirmed[i] = Confirmed(i, configs.row(i), _predicted_dict(pred, i), row, p, meets, why)

    for round_ in range(ROUNDS):
        batch = family_leaders(configs, ranked, confirm, round_ * confirm)
        if round_ == 0:
            batch = [int(i) for i in ranked[:TOP_OVERALL]] + batch + [int(i) for i in front_idx]
        if not batch:
            break
        confirm_indices(batch)
        if any(c.meets for c in confirmed.values()):
            break
    result.confirmed = sorted(confirmed.values(), key=lambda c: c.index)
    meets = [c for c in result.confirmed if c.meets]
    if meets:
        result.chosen = min(meets, key=lambda c: (_sim_objective(c, objective), c.value("memory"), c.index))
        result.front = simulated_front(meets, objective, ppl is not None)
    else:
        result.infeasible_reason = ("no confirmed configuration meets the constraints in the simulator "
                                    "(the cost model's candidates were all just over a bound)")
        result.nearest = sorted(result.confirmed, key=lambda c: (len(c.violations), _sim_objective(c, objective)))[:5]
    return result


def _sim_objective(c: Confirmed, objective: str) -> float:
    v = c.value(objective)
    if objective == "tokens-per-s":
        v = -v
    return v if math.isfinite(v) else math.inf


def simulated_front(items: list[Confirmed], objective: str, with_quality: bool) -> list[Confirmed]:
    lat = np.asarray([_sim_objective(c, latency_metric(objective)) for c in items])
    mem = np.asarray([c.value("memory") for c in items])
    cols = [lat, mem] + ([np.asarray([c.perplexity for c in items])] if with_quality else [])
    mask = pareto_mask(np.stack(cols, axis=1))
    front = [c for c, m in zip(items, mask) if m]
    return sorted(front, key=lambda c: (c.value("memory"), c.index))


def _why_infeasible(pred: Predictions, c: Constraints, limit: int, ppl: Optional[np.ndarray]) -> str:
    valid = pred.valid
    if not valid.any():
        return "no configuration of the space can run on this profile"
    parts = []
    smallest = int(pred.peak_gpu_bytes[valid].min())
    if smallest > limit:
        parts.append(f"nothing fits in {_gib(limit)}: the smallest configuration needs {_gib(smallest)}")
    if c.max_tpot is not None:
        fast = float(np.nanmin(pred.tpot_s[valid & (pred.peak_gpu_bytes <= limit)])) \
            if (valid & (pred.peak_gpu_bytes <= limit)).any() else float(np.nanmin(pred.tpot_s[valid]))
        if fast > c.max_tpot:
            parts.append(f"no configuration reaches TPOT {_ms(c.max_tpot)} (fastest predicted {_ms(fast)})")
    if c.max_ttft is not None:
        fast = float(np.nanmin(pred.ttft_s[valid]))
        if fast > c.max_ttft:
            parts.append(f"no configuration reaches TTFT {_sec(c.max_ttft)} (fastest predicted {_sec(fast)})")
    if c.max_ppl is not None and ppl is not None:
        finite = ppl[np.isfinite(ppl)]
        if finite.size == 0:
            parts.append("the quality table has no perplexity for any expert format searched")
        elif finite.min() > c.max_ppl:
            parts.append(f"no expert format reaches perplexity {c.max_ppl:g} (best {finite.min():.3f})")
    return "; ".join(parts) or "no configuration meets all the constraints together"


def _confirm_nearest(ctx, configs, pred, constraints, limit, ppl, confirmer: Confirmer, objective: str,
                     count: int = 5) -> list[Confirmed]:
    """The configurations closest to meeting the constraints, best per policy, simulated so their numbers
    are real (on the profile's device memory, or without a budget when not even that holds them)."""
    v = _violation(pred, constraints, limit, ppl)
    obj = _objective_values(pred, objective)
    order = np.lexsort((np.arange(len(configs)), obj, v))
    picked, seen = [], set()
    for i in order:
        if not np.isfinite(v[i]):
            break
        pol = int(configs.policy[i])
        if pol in seen:
            continue
        seen.add(pol)
        picked.append(int(i))
        if len(picked) == count:
            break
    from moesim.costmodel.dataset import UNLIMITED_GPU_MEM

    device = int(ctx.profile.device.memory_bytes)
    out = []
    for i in picked:
        budget = None if pred.peak_gpu_bytes[i] <= device else UNLIMITED_GPU_MEM
        row = confirmer.run(configs, np.asarray([i]), gpu_mem_bytes=budget)[0]
        p = float(ppl[i]) if ppl is not None else math.nan
        meets, why = _check(row, constraints, limit, p)
        out.append(Confirmed(i, configs.row(i), _predicted_dict(pred, i), row, p, meets, why))
    return out


# ---- text ------------------------------------------------------------------------------------------------
def _ms(x: float) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x * 1e3:.2f} ms"


def _sec(x: float) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.3f} s"


def _gib(n: float) -> str:
    from moesim.units import format_bytes

    return format_bytes(n)


def describe_config(row: tuple) -> str:
    policy, cache, ebits, nbits, batch = row
    return (f"policy {policy}, cache {cache} experts/layer, experts {format_label(ebits)}, non-expert "
            f"{format_label(nbits)}, batch {batch}")


def exact_bytes(n: int) -> str:
    """A size flag value that parses back to exactly ``n`` bytes."""
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(int(n))


def commands(result: SearchResult, c: Confirmed, with_budget: bool = True) -> tuple[str, str]:
    gpu_mem = None
    if with_budget and result.constraints.max_gpu_mem is not None:
        gpu_mem = exact_bytes(int(result.constraints.max_gpu_mem))
    device = "cuda" if _device_kind(result) == "cuda" else None
    return (simulate_command(result.trace, result.profile, c.config, gpu_mem),
            validate_command(result.trace, result.profile, c.config, device=device))


def _device_kind(result: SearchResult) -> str:
    from moesim.simulator.run import load_profile_cached

    return load_profile_cached(result.profile).device.kind


# one unit per quantity in every table moesim prints: times in ms, memory in MiB
CONFIRMED_COLUMNS = ("policy", "cache", "experts", "non-expert", "batch", "peak_gpu_mib", "tpot_ms", "ttft_ms", "tok/s",
                     "pred_tpot_ms", "pred_ttft_ms")


def confirmed_table(items: Sequence[Confirmed], with_quality: bool, mark: Optional[Confirmed] = None) -> str:
    head = list(CONFIRMED_COLUMNS) + (["ppl"] if with_quality else []) + ["note"]
    body = []
    for c in items:
        s = c.simulated
        ok = bool(s.get("feasible"))
        cells = [c.config[0], str(c.config[1]), format_label(c.config[2]), format_label(c.config[3]), str(c.config[4]),
                 f"{(s.get('peak_gpu_mib') or 0):.0f}",
                 f"{s['tpot_mean_s'] * 1e3:.2f}" if ok else "-", f"{s['ttft_mean_s'] * 1e3:.1f}" if ok else "-",
                 f"{s['tokens_per_s']:.2f}" if ok else "-",
                 f"{c.predicted['tpot_s'] * 1e3:.2f}", f"{c.predicted['ttft_s'] * 1e3:.1f}"]
        if with_quality:
            cells.append(f"{c.perplexity:.3f}" if math.isfinite(c.perplexity) else "-")
        note = "chosen" if mark is not None and c.index == mark.index else ("; ".join(c.violations))
        cells.append(note)
        body.append(cells)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    left = {0, 2, 3, len(head) - 1}

    def line(cells):
        return "  ".join(x.ljust(w) if i in left else x.rjust(w) for i, (x, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(head)] + [line(b) for b in body])


def format_result(r: SearchResult) -> str:
    out = []
    n = len(r.space)
    out.append(f"search: {r.trace} on {r.profile}, objective {r.objective}; {r.constraints.describe(r.device_bytes)}")
    out.append(f"cost model: {n:,} configurations predicted in {r.predict_seconds:.2f} s; "
               f"{r.feasible_predicted:,} predicted to meet the constraints")
    calls = r.simulator_calls
    out.append(f"simulator: {calls} configurations run ({100 * calls / max(n, 1):.2f}% of the space, "
               f"1 in {n / max(calls, 1):.0f})")
    for s in r.model_stale:
        out.append(f"note: the cost model is stale: {s} (refit with `moesim costmodel fit`)")
    for note in r.notes:
        out.append(f"note: {note}")
    q = r.quality is not None
    if r.chosen is None:
        out.append("")
        out.append(f"NO CONFIGURATION MEETS THE CONSTRAINTS: {r.infeasible_reason}")
        if r.nearest:
            out.append("nearest points (simulated; what each would need):")
            out.append(confirmed_table(r.nearest, q))
            for c in r.nearest[:1]:
                sim, _ = commands(r, c, with_budget=False)
                out.append(f"  the nearest, on the profile's own memory: {sim}")
        return "\n".join(out) + "\n"
    c = r.chosen
    s = c.simulated
    out.append("")
    out.append(f"chosen: {describe_config(c.config)}")
    out.append(f"  simulated  TPOT {_ms(s['tpot_mean_s'])}, TTFT {_sec(s['ttft_mean_s'])}, "
               f"{s['tokens_per_s']:.2f} tokens/s, peak GPU {s['peak_gpu_mib'] / 1024:.2f} GiB, "
               f"hit rate {s['hit_rate']:.3f}" + (f", perplexity {c.perplexity:.3f}" if q else ""))
    out.append(f"  predicted  TPOT {_ms(c.predicted['tpot_s'])}, TTFT {_sec(c.predicted['ttft_s'])}, "
               f"{c.predicted['tokens_per_s']:.2f} tokens/s, peak GPU {c.predicted['peak_gpu_bytes'] / GIB:.2f} GiB")
    caveat = quality_caveat(c.config, q)
    if caveat:
        out.append(f"  CAVEAT     {caveat}")
    sim, val = commands(r, c)
    out.append("reproduce:")
    out.append(f"  {sim}")
    out.append(f"  {val}")
    gap = validate_gap(c.config)
    if gap:
        out.append(f"  (note: {gap})")
    out.append("")
    axis = {"ttft": "TTFT", "tokens-per-s": "tokens/s"}.get(r.objective, "TPOT")
    out.append(f"Pareto front ({axis} x peak GPU memory{' x perplexity' if q else ''}; simulated):")
    out.append(confirmed_table(r.front, q, r.chosen))
    out.append("")
    out.append("all confirmed candidates:")
    out.append(confirmed_table(sorted(r.confirmed, key=lambda x: (_sim_objective(x, r.objective), x.index)), q,
                               r.chosen))
    return "\n".join(out) + "\n"


def _off():
    from moesim.simulator.gating import GatingSpec

    return GatingSpec()
