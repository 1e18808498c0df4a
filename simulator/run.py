"""Build a simulation from (trace, profile, config) and turn the engine's counters into a :class:`SimResult`.

What does not change across the configurations of one (trace, profile) (the compiled workload, the cost
tables, the miss curves, the predictor's output) is kept by the pair's
:class:`~moesim.simulator.session.ReplaySession`; read traces and profiles by the loaders there.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from moesim.quant import SUPPORTED_BITS, WeightFormat
from moesim.simulator.cache import (
    BeladyCache,
    CacheGeometry,
    FutureIndex,
    make_cache,
    popularity_order,
)
from moesim.simulator.config import PolicySpec, SimConfig
from moesim.simulator.costs import CostTables
from moesim.simulator.transfer import TransferSpec
from moesim.simulator.engine import build_simulation
from moesim.simulator.memory import MemoryPlan, plan_memory
from moesim.simulator.placement import make_placement
from moesim.simulator.prefetch import make_prefetcher
from moesim.simulator.results import MIB, RunLabel, SimResult, mean, percentile
from moesim.simulator.timeline import Timeline
from moesim.simulator.session import ReplaySession, load_profile_cached, load_trace_cached, trace_replay
from moesim.simulator.workload import Workload
from moesim.tracer import Trace

def trace_format(dtype: str) -> WeightFormat:
    """The weight format whose kernel times a trace's own dtype: gguf-q4_k_m and mxfp4 -> int4, q5/q6 and
    float8 -> int8, 16- and 32-bit floats -> bf16 (the bytes stay the trace's own)."""
    m = re.search(r"(?:q|int|fp|float)(\d+)", dtype.lower())
    bits = int(m.group(1)) if m else 16
    if bits >= 16:
        return WeightFormat(16)
    return WeightFormat(min(b for b in SUPPORTED_BITS if b >= bits))


def get_workload(trace: Trace, batch: int, policy: PolicySpec) -> Workload:
    """The compiled workload of ``trace`` for ``policy``'s gating and guess (the trace's replay session keeps it)."""
    return trace_replay(trace).workload(batch, policy)


@dataclass
class Prepared:
    """Everything the engine needs, resolved; or a plan that does not fit."""

    label: RunLabel
    trace: Trace
    workload: Workload
    plan: MemoryPlan
    expert_bytes: list[int]
    expert_kernel: str
    non_expert_kernel: str
    profile: object
    policy: PolicySpec
    expert_quantized: bool = False  # the config asked for a quantized expert format
    non_expert_quantized: bool = False


def _label(trace_name: str, profile_name: str, config: SimConfig, plan_budget: int, dtype: str) -> RunLabel:
    p = config.policy
    return RunLabel(
        trace=trace_name, profile=profile_name, policy=p.name, cache_policy=p.cache.policy,
        cache_scope=p.cache.scope, prefetch=p.prefetch.policy, placement=p.placement.policy + (
            "" if p.placement.rule == "profile" or p.placement.policy == "gpu" else f"-{p.placement.rule}"),
        transfer=p.transfer.mode, gating=p.gating.label,
        cache_experts=-1 if config.cache_experts is None else int(config.cache_experts),
        cache_mem_mib=-1.0 if config.cache_bytes is None else round(config.cache_bytes / MIB, 3),
        gpu_mem_mib=round(plan_budget / MIB, 3),
        expert_format=config.expert_format.name if config.expert_format else dtype,
        non_expert_format=config.non_expert_format.name if config.non_expert_format else dtype,
        batch=config.batch,
    )


def layer_expert_bytes(meta, expert_format: Optional[WeightFormat]) -> list[int]:
    """One expert's bytes in each MoE layer of a trace (its metadata ``meta``) in ``expert_format`` (None: the
    trace's own dtype and bytes)."""
    if expert_format is not None:
        return [expert_format.bytes_for(meta.model.expert_params)] * meta.num_layers
    return [int(b) for b in meta.expert_bytes]


def prepare(trace: Trace, profile, config: SimConfig, trace_name: str = "", profile_name: str = "") -> Prepared:
    from moesim.simulator.runtime import runtime_costs, runtime_profile

    profile_name = profile_name or profile.name
    profile = runtime_profile(profile, runtime_costs(config.policy.runtime, config.policy.released_code_costs))
    meta = trace.meta
    shape = meta.model
    own = trace_format(meta.dtype)
    expert_bytes = layer_expert_bytes(meta, config.expert_format)
    expert_kernel = config.expert_format.kernel if config.expert_format is not None else own.kernel
    if config.non_expert_format is not None:
        non_expert_bytes = config.non_expert_format.bytes_for(shape.non_expert_params)
        non_expert_kernel = config.non_expert_format.kernel
    else:
        non_expert_bytes = int(meta.non_expert_bytes)
        non_expert_kernel = own.kernel
    session = ReplaySession.of(trace, profile)
    workload = session.workload(config.batch, config.policy)
    curves = None
    if config.policy.cache.sizing == "dp" and config.policy.cache.scope == "layer":
        curves = session.miss_curves()
    plan = plan_memory(config.policy, shape, expert_bytes, non_expert_bytes, workload, profile,
                       config.cache_experts, config.gpu_mem_bytes, curves, config.cache_bytes)
    label = _label(trace_name or (trace.path.stem if trace.path else "trace"), profile_name,
                   config, plan.budget_bytes, meta.dtype)
    return Prepared(label, trace, workload, plan, expert_bytes, expert_kernel, non_expert_kernel, profile,
                    config.policy,
                    expert_quantized=bool(config.expert_format and config.expert_format.is_quantized),
                    non_expert_quantized=bool(config.non_expert_format and config.non_expert_format.is_quantized))


def _costs(prep: Prepared, needs_cpu: bool) -> CostTables:
    return ReplaySession.of(prep.trace, prep.profile).cost_tables(
        prep.workload, prep.expert_bytes, prep.expert_kernel, prep.non_expert_kernel, needs_cpu)


def _runtime_costs(prep: Prepared, tables: CostTables) -> CostTables:
    """The preset's runtime implementation costs added to the profile's cost tables."""
    from moesim.simulator.runtime import apply_runtime, runtime_costs

    runtime = runtime_costs(prep.policy.runtime, prep.policy.released_code_costs)
    hqq = runtime.hqq_traffic_factor > 1.0  # the released code runs every quantized weight through HQQ
    return apply_runtime(tables, runtime, expert_hqq=hqq and prep.expert_quantized,
                         attention_hqq=hqq and prep.non_expert_quantized)


def _initial_keys(initial: str, prep: Prepared) -> list[tuple[int, int]]:
    wl = prep.workload
    L, E = wl.num_layers, wl.num_experts
    if initial == "empty":
        return []
    if initial == "last-experts":
        # Mixtral-Offloading: experts with index >= offload_per_layer start on the GPU
        return [(layer, e) for e in range(E - 1, -1, -1) for layer in range(L)]
    if initial == "popular":
        return popularity_order(wl.popularity, prep.plan.capacity, _geometry(prep))
    return [(layer, e) for layer in range(L) for e in range(E)]  # "all", "first-layers", "last-layers"


def _geometry(prep: Prepared) -> CacheGeometry:
    wl = prep.workload
    return CacheGeometry(wl.num_layers, wl.num_experts, tuple(prep.expert_bytes))


def prefetch_predictions(prep: Prepared, train: tuple[str, ...]) -> dict:
    """The learned predictor's guesses for ``prep``'s trace (kept by the trace's replay session)."""
    return ReplaySession.of(prep.trace, prep.profile).predictions(prep.workload, train)


def infeasible_result(prep: Prepared) -> SimResult:
    return SimResult(label=prep.label, feasible=False, reason=prep.plan.reason, memory=prep.plan.breakdown,
                     cache_slots=prep.plan.slots, guess_source=prep.workload.guess_source)


@dataclass
class PolicyObjects:
    """The policy objects of one run, built once so the simulator and the real engine drive the same ones."""

    cache: Any
    prefetcher: Any
    placement: Any
    transfer: TransferSpec
    costs: CostTables
    layer_copy_s: Optional[list[float]]
    layer_copy_bytes: Optional[list[int]]


def build_policy_objects(prep: Prepared) -> PolicyObjects:
    """Fresh cache, prefetcher and placement for one run of ``prep``, with the run's cost tables.

    The cache gets the memory plan's capacity, the preset's initial residency and (Belady) the future; the
    learned predictor's guesses are annotated onto the workload; accelerate's per-layer copy sizes follow
    from the initial residency.
    """
    policy = prep.policy
    wl = prep.workload
    L, E = wl.num_layers, wl.num_experts
    costs = _runtime_costs(prep, _costs(prep, policy.placement.policy != "gpu"))
    cache = make_cache(policy.cache.policy, _geometry(prep), prep.plan.capacity, **policy.cache.params())
    cache.preload(_initial_keys(policy.cache.initial, prep))
    if isinstance(cache, BeladyCache):
        cache.attach_future(FutureIndex(wl.future_uses()))
    pf_spec = policy.prefetch
    if pf_spec.policy == "predictive":
        from moesim.simulator.predictor import annotate

        annotate(wl, prefetch_predictions(prep, pf_spec.train))
    prefetcher = make_prefetcher(pf_spec, wl)
    transfer = policy.transfer
    pageable = transfer.on_compute_stream and not transfer.pinned
    copy_by_layer = costs.h2d_pageable_by_layer if pageable else costs.h2d_by_layer
    placement = make_placement(policy.placement, costs, copy_by_layer)
    layer_copy_s = layer_copy_bytes = None
    if transfer.mode == "layer":
        from moesim.simulator.runtime import runtime_costs

        per_matrix_s = runtime_costs(policy.runtime, policy.released_code_costs).weight_overhead_s
        layer_copy_s, layer_copy_bytes = [], []
        for layer in range(L):
            missing = sum(1 for e in range(E) if not cache.contains(layer, e))
            nbytes = missing * prep.expert_bytes[layer]
            layer_copy_bytes.append(nbytes)
            layer_copy_s.append(accelerate_layer_copy_s(prep.profile, nbytes, missing, transfer.pinned, per_matrix_s))
    return PolicyObjects(cache, prefetcher, placement, transfer, costs, layer_copy_s, layer_copy_bytes)


def accelerate_layer_copy_s(profile, nbytes: float, experts: int, pinned: bool, per_matrix_s: float = 0.0) -> float:
    """accelerate copies an offloaded layer one parameter at a time (an AlignDevicesHook per module,
    ``set_module_tensor_to_device`` per parameter, synchronous): the bytes once, plus a copy's fixed latency
    for each of the 3 weight matrices of every expert beyond the first copy, plus ``per_matrix_s`` for each
    matrix: the ``accelerate`` runtime's hook cost, whose unit is fitted (``RuntimeCosts.weight_overhead_s``:
    the load and the move back to ``meta`` each end in ``torch.cuda.empty_cache()``; component-costs 4.6, 4.7)."""
    if nbytes <= 0:
        return 0.0
    from moesim.calib.profile import copy_key

    model = profile.copy_models.get(copy_key("h2d", pinned, False))
    latency = float(model.latency_s) if model is not None else 0.0
    return (float(profile.copy_time(nbytes, "h2d", pinned=pinned)) + max(0, 3 * experts - 1) * latency
            + 3 * experts * per_matrix_s)


def run_prepared(prep: Prepared, record_hits: bool = False, timeline: Optional[Timeline] = None,
                 exact_events: bool = False, compiled: bool = True) -> tuple[SimResult, Optional[np.ndarray]]:
    """``compiled`` lets a run the compiled replay covers take it (:mod:`moesim.simulator.kernel`; same result);
    False keeps the SimPy engine."""
    if not prep.plan.fits:
        return infeasible_result(prep), None
    objs = build_policy_objects(prep)
    if compiled and replay_path(prep, objs, record_hits, timeline, exact_events) == "compiled":
        from moesim.simulator.kernel import run_compiled

        sim, stats = run_compiled(prep, objs)
    else:
        sim = build_simulation(prep, objs, record_hits=record_hits, timeline=timeline, exact_events=exact_events)
        stats = sim.run()
    result = simulation_result(prep, objs.costs, sim, stats)
    hits = _hit_array(prep.trace, stats) if record_hits else None
    return result, hits


def replay_path(prep: Prepared, objs: PolicyObjects, record_hits: bool = False, timeline: Optional[Timeline] = None,
                exact_events: bool = False) -> str:
    """Which replay runs ``prep``: "compiled" (the kernel covers it), else "engine: <why not compiled>"."""
    from moesim.simulator.kernel import unsupported

    why = unsupported(prep, objs, record_hits, timeline, exact_events)
    return f"engine: {why}" if why else "compiled"


def simulation_result(prep: Prepared, costs: CostTables, sim, stats) -> SimResult:
    wl = prep.workload
    makespan = stats.makespan_s
    dec_acc = sum(stats.decode_accesses)
    dec_hit = sum(stats.decode_hits)
    out_tokens = sum(wl.decode_tokens[r] + 1 for r in wl.prompt_tokens)
    util = (lambda busy: busy / makespan if makespan > 0 else math.nan)
    issued = stats.prefetch_issued
    ttft = list(stats.ttft.values())
    e2e = list(stats.e2e.values())
    return SimResult(
        label=prep.label, feasible=True, reason="", memory=prep.plan.breakdown, cache_slots=prep.plan.slots,
        expert_kernel=costs.expert_kernel, cpu_kernel=costs.cpu_kernel, non_expert_kernel=costs.non_expert_kernel,
        guess_source=wl.guess_source, requests=len(wl.prompt_tokens),
        output_tokens=out_tokens,
        ttft_mean_s=mean(ttft), ttft_p50_s=percentile(ttft, 50), ttft_p90_s=percentile(ttft, 90),
        tpot_mean_s=mean(stats.token_intervals), tpot_p50_s=percentile(stats.token_intervals, 50),
        tpot_p90_s=percentile(stats.token_intervals, 90),
        e2e_mean_s=mean(e2e), e2e_p90_s=percentile(e2e, 90), makespan_s=makespan,
        tokens_per_s=out_tokens / makespan if makespan > 0 else math.nan,
        decode_tokens_per_s=stats.decode_tokens / stats.decode_time_s if stats.decode_time_s > 0 else math.nan,
        hit_rate=dec_hit / dec_acc if dec_acc else math.nan,
        prefill_hit_rate=stats.prefill_hits / stats.prefill_accesses if stats.prefill_accesses else math.nan,
        hit_rate_per_layer=tuple(h / a if a else math.nan for h, a in zip(stats.decode_hits, stats.decode_accesses)),
        prefetch_issued=issued,
        prefetch_precision=stats.prefetch_used / issued if issued else math.nan,
        prefetch_recall=(stats.prefetch_served / (stats.prefetch_served + stats.demand_loads)
                         if (stats.prefetch_served + stats.demand_loads) and issued else math.nan),
        h2d_bytes=int(sim.h2d.bytes), d2h_bytes=int(sim.d2h.bytes), stall_s=stats.stall_s,
        gpu_util=util(stats.gpu_busy_s), h2d_util=util(sim.h2d.busy_s), d2h_util=util(sim.d2h.busy_s),
        cpu_util=util(sim.cpu.busy_s),
        cpu_expert_fraction=stats.decode_cpu / dec_acc if dec_acc else math.nan,
        gated_fraction=1.0 - wl.kept_activations / wl.routed_activations if wl.routed_activations else 0.0,
        sim_events=stats.waits + sim.h2d.jobs + sim.d2h.jobs + sim.cpu.jobs,
    )


def _hit_array(trace: Trace, stats) -> np.ndarray:
    """Bool [rows, k]: the simulated hit of every routed expert of every replayed row."""
    ex = trace.cells.experts
    out = np.zeros(ex.shape, dtype=bool)
    for rows, got in stats.hit_records:
        if not got:
            continue
        for r in rows:
            for s, e in enumerate(ex[r].tolist()):
                if e in got:
                    out[r, s] = True
    return out


def simulate(trace: Trace | str | Path, profile, config: SimConfig, *, record_hits: bool = False,
             timeline: Optional[Timeline] = None, trace_name: str = "", profile_name: str = "",
             exact_events: bool = False, compiled: bool = True):
    """Run one configuration. Returns the :class:`SimResult` (and the per-row hit array if asked).
    ``exact_events`` runs the previous engine (a SimPy event per copy), the fast path's oracle; ``compiled``
    False keeps the SimPy engine where the compiled replay would run (the compiled replay's oracle)."""
    if not isinstance(trace, Trace):
        from moesim.traces import resolve_trace

        trace = load_trace_cached(resolve_trace(str(trace)))
    if isinstance(profile, str):
        profile_name = profile_name or profile
        profile = load_profile_cached(profile)
    prep = prepare(trace, profile, config, trace_name, profile_name)
    result, hits = run_prepared(prep, record_hits=record_hits, timeline=timeline, exact_events=exact_events,
                                compiled=compiled)
    return (result, hits) if record_hits else result
