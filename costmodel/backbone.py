"""The analytic backbone: TTFT, TPOT and makespan of a policy at every cache size, from miss counts and op costs.

Time is built the way the simulator's engine spends it, but from counts instead of events:

* every forward step pays its fixed GPU work: step overhead, head, dense layers, and per MoE layer the
  non-expert work, the launch overhead and the shared experts (the simulator's own
  :class:`~moesim.simulator.costs.CostTables`, built by :func:`~moesim.simulator.costs.build_cost_tables`
  with the same kernels, so op costs agree by construction);
* each MoE layer-step (a *cell*: ``a`` distinct experts, ``m`` of them misses at cache size ``c``) pays its
  expert phase, with the policy's overlap:

  ``stream`` (copy stream beside compute; misses land one copy time ``x`` apart, hits run meanwhile):
  ``a g`` without misses, else ``max(a g, m x + g, x + m g)``;
  ``swap`` (copies on the compute stream, write-back of each evicted expert): ``a g + m x + m x_d2h``;
  ``sync`` (pageable copies on the compute stream): ``a g + m x_pageable``;
  ``layer`` (accelerate): the whole missing layer is copied every forward pass;
  CPU placements: Fiddler's per-expert CPU-or-copy rule (CPU chain ``m (d2h + ffn + h2d)`` beside the
  GPU's hits) and HybriMoE's greedy GPU/CPU split, replayed per (a, m) with the profile's costs.

Decode cells are timed through the histogram of (a, m) per cache size, which is exact when a cell's
experts cost the same (decode at batch 1); prefill cells one by one (their experts carry different token
counts). What the backbone leaves out — prefetching, non-stack eviction rules (LFU, FIFO, MRS, Belady,
MoE-Infinity's global LFU, read here from LRU tables), copy-queue carry-over between layers — is what the
fitted correction (:mod:`moesim.costmodel.model`) learns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from moesim.errors import MoesimError
from moesim.simulator.config import LAYERED_INITIAL, PolicySpec
from moesim.costmodel.features import MissTable, WorkloadFeatures, static_global_table


@dataclass(frozen=True)
class OpCosts:
    """Seconds of the operations one configuration needs (one profile, shape, format and workload)."""

    gpu: np.ndarray  # [T+1] one expert on the GPU for t tokens
    cpu: np.ndarray  # [T+1] one expert on the CPU (inf when the profile has no CPU model)
    act_d2h: np.ndarray  # [T+1]
    act_h2d: np.ndarray  # [T+1]
    copy: np.ndarray  # [L] one expert host->device, pinned
    copy_pageable: np.ndarray  # [L] the same from pageable memory
    copy_d2h: np.ndarray  # [L] one expert device->host
    layer_copy: np.ndarray  # [L] a whole layer's experts, pageable (accelerate)
    decode_fixed: np.ndarray  # [S] fixed GPU time of each decode step
    prefill_fixed: np.ndarray  # [R] fixed GPU time of each prefill step
    decode_tokens_per_expert: float
    expert_kernel: str
    cpu_available: bool
    # a prefill cell whose routed tokens (the step's tokens x top_k) reach this runs host experts on the GPU,
    # each uploaded on the compute stream (llama.cpp's op offload; CostTables.prefill_offload_tokens; 0: never)
    prefill_offload_routed: int = 0


def _cpu_chain(oc: OpCosts, t: float) -> float:
    """One CPU expert's chain at ``t`` tokens (interpolated): its activations down, its FFN, its outputs up."""
    return _interp(oc.act_d2h, t) + _interp(oc.cpu, t) + _interp(oc.act_h2d, t)


def _cpu_chains(oc: OpCosts, tokens: np.ndarray, present: np.ndarray) -> np.ndarray:
    """[P, 1] the summed CPU chains of each prefill cell's experts (``tokens``, ``present``: [P, A])."""
    tk = np.minimum(tokens, len(oc.cpu) - 1)
    return np.where(present, oc.act_d2h[tk] + oc.cpu[tk] + oc.act_h2d[tk], 0.0).sum(axis=1)[:, None]


FIDDLER_CODE_CPU, FIDDLER_CODE_GPU = 7.0, 70.0  # efeslab/fiddler 227715b mixtral.py latency_cpu / latency_gpu


def op_costs(fe: WorkloadFeatures, profile, shape, expert_bytes: list[int], expert_kernel: str,
             non_expert_kernel: str, runtime: str = "none", expert_quantized: bool = False) -> OpCosts:
    """``runtime``: the preset's implementation costs (:mod:`moesim.simulator.runtime`), added as the
    simulator adds them (HQQ attention's extra cost is not included: the non-expert format's delta is
    computed without a runtime)."""
    from moesim.simulator.costs import build_cost_tables
    from moesim.simulator.runtime import apply_runtime, runtime_costs, runtime_profile

    rt = runtime_costs(runtime)
    profile = runtime_profile(profile, rt)
    max_tokens = max([fe.max_tokens_per_expert] + fe.steps.tokens.tolist() + fe.prefills.tokens.tolist())
    args = (profile, shape, expert_bytes, expert_kernel, non_expert_kernel, max_tokens,
            set(fe.prefills.tokens.tolist()), set(fe.steps.tokens.tolist()), fe.max_context)
    try:
        ct = build_cost_tables(*args, True)
        cpu_ok = True
    except MoesimError:
        ct = build_cost_tables(*args, False)
        cpu_ok = False
    ct = apply_runtime(ct, rt, expert_hqq=rt.hqq_traffic_factor > 1.0 and expert_quantized, attention_hqq=False)
    gpu = np.asarray(ct.gpu_expert)
    L = fe.num_layers
    shared = ct.shared_experts
    dec_fixed = np.asarray([
        ct.step_overhead_s + ct.head[t] + ct.dense_layers * ct.decode_non_expert[t][ctx]
        + L * (ct.decode_non_expert[t][ctx] + ct.layer_overhead_s + shared * gpu[t])
        for t, ctx in zip(fe.steps.tokens.tolist(), fe.steps.context.tolist())])
    pre_fixed = np.asarray([
        ct.step_overhead_s + ct.head[1] + ct.dense_layers * ct.prefill_non_expert[p]
        + L * (ct.prefill_non_expert[p] + ct.layer_overhead_s + shared * gpu[p])
        for p in fe.prefills.tokens.tolist()])
    E = fe.num_experts
    from moesim.simulator.run import accelerate_layer_copy_s

    layer_copy = np.asarray([accelerate_layer_copy_s(profile, float(b) * E, E, False, rt.weight_overhead_s)
                             for b in expert_bytes], dtype=np.float64)
    tpe = float(fe.decode.tokens.sum() / max(fe.decode.experts.sum(), 1))
    return OpCosts(
        gpu=gpu, cpu=np.asarray(ct.cpu_expert), act_d2h=np.asarray(ct.act_d2h), act_h2d=np.asarray(ct.act_h2d),
        copy=np.asarray(ct.h2d_by_layer), copy_pageable=np.asarray(ct.h2d_pageable_by_layer),
        copy_d2h=np.asarray(ct.d2h_by_layer),
        layer_copy=layer_copy, decode_fixed=dec_fixed, prefill_fixed=pre_fixed, decode_tokens_per_expert=tpe,
        expert_kernel=ct.expert_kernel, cpu_available=cpu_ok,
        prefill_offload_routed=ct.prefill_offload_tokens * ct.top_k,
    )


def _interp(table: np.ndarray, t: float) -> float:
    lo = int(np.floor(t))
    hi = min(lo + 1, len(table) - 1)
    w = t - lo
    return float(table[lo] * (1 - w) + table[hi] * w)


@dataclass(frozen=True)
class Backbone:
    """Predictions for one policy at every cache size c = 0..E (arrays of length E+1)."""

    ttft_s: np.ndarray
    tpot_s: np.ndarray
    makespan_s: np.ndarray
    prefill_total_s: np.ndarray  # all prefill steps
    decode_total_s: np.ndarray  # all decode steps
    hit_rate: np.ndarray  # decode accesses served from the cache (CPU-run experts count as misses)
    copy_share: np.ndarray  # share of the decode expert phase spent waiting on copies (stream) or copying
    cpu_share: np.ndarray  # share of decode misses run on the CPU


# The miss table that stands in for each eviction rule (simulator/cache.py CACHE_POLICIES), by its name: the
# stack algorithms have exact tables; LFU, FIFO, MRS and Belady read the LRU table and the fitted correction
# learns their difference (see moesim.costmodel.model).
MISS_TABLES: dict[str, str] = {"lru": "lru", "fifo": "lru", "lfu": "lru", "lfu-forget": "lru", "mrs": "lru",
                               "belady": "lru", "static": "static"}


def miss_table(fe: WorkloadFeatures, spec: PolicySpec, expert_bytes: list[int]) -> Optional[MissTable]:
    """The miss table the backbone reads for a policy (None: everything resident)."""
    cache = spec.cache
    if spec.all_resident or cache.initial == "all":
        return None
    if cache.initial in LAYERED_INITIAL:
        return None  # accelerate, llama.cpp: whole layers, handled by layers
    if MISS_TABLES[cache.policy] == "static":
        if cache.scope == "global":
            return static_global_table(fe, np.asarray(expert_bytes))
        return fe.misses("static")
    if cache.scope == "global":
        return fe.misses("lru-global")
    base = "lru-last" if cache.initial == "last-experts" else "lru"
    if cache.sizing == "dp":
        from moesim.simulator.memory import dp_sizes_every_budget

        sizes = fe._tables.get("dp-sizes")
        if sizes is None:
            sizes = fe._tables["dp-sizes"] = dp_sizes_every_budget(fe.dp_curves)
        return fe.dp_misses(sizes, base)
    return fe.misses(base)


@dataclass(frozen=True)
class _Copies:
    """Per-capacity copy times of one expert, averaged over the layers the misses fall in ([C, 1, 1])."""

    pinned: np.ndarray
    pageable: np.ndarray
    d2h: np.ndarray


def _effective_copies(fe: WorkloadFeatures, table: MissTable, oc: OpCosts) -> _Copies:
    C = table.decode.shape[1]
    L = fe.num_layers
    per_layer = np.zeros((L, C))
    np.add.at(per_layer, fe.decode.layer, table.decode)
    total = per_layer.sum(axis=0)

    def eff(x: np.ndarray) -> np.ndarray:
        mean = float(np.mean(x))
        v = np.where(total > 0, (per_layer * x[:, None]).sum(axis=0) / np.maximum(total, 1), mean)
        return v.reshape(C, 1, 1)

    return _Copies(eff(oc.copy), eff(oc.copy_pageable), eff(oc.copy_d2h))


# Each part's analytic time, by the name it is registered under (simulator/placement.py PLACEMENTS,
# simulator/transfer.py TRANSFERS): a placement that runs experts on the CPU times a decode layer-step's
# experts itself (and Fiddler its prefill too); otherwise the transfer mode does. A cell function takes the
# cell's ``a`` experts with ``m`` non-resident and returns (time, copy part, experts run on the CPU).
def _misses_on_cpu(a, m, g, chain):
    """A cell whose ``m`` non-resident experts run on the CPU, one chain after another, beside its ``a - m``
    resident ones on the GPU."""
    return np.where(m >= 1, np.maximum((a - m) * g, m * chain), a * g)


def _decode_fiddler(a, m, t, g, oc: OpCosts, cp: _Copies, code_rule: bool):
    xp = cp.pageable
    # the released constants (CPU 7 per token against a 70 transfer) or the profile's costs
    to_cpu = (t * FIDDLER_CODE_CPU < FIDDLER_CODE_GPU) if code_rule else (_interp(oc.cpu, t) < xp)
    f = np.where(to_cpu, _misses_on_cpu(a, m, g, _cpu_chain(oc, t)), a * g + m * xp)
    return f, f - a * g, np.where(to_cpu, m + 0 * a, 0.0)


def _decode_cpu_host(a, m, t, g, oc: OpCosts, cp: _Copies, code_rule: bool):
    f = _misses_on_cpu(a, m, g, _cpu_chain(oc, t))
    return f, np.zeros_like(f), m + 0 * a


def _decode_hybrimoe(a, m, t, g, oc: OpCosts, cp: _Copies, code_rule: bool):
    f, cpu_cnt = _hybrimoe_cells(a, m, g, cp.pinned, _interp(oc.cpu, t), _interp(oc.act_d2h, t),
                                 _interp(oc.act_h2d, t))
    return f, f - (a - cpu_cnt) * g, cpu_cnt


def _decode_stream(a, m, t, g, oc: OpCosts, cp: _Copies, code_rule: bool):
    x = cp.pinned
    f = np.where(m >= 1, np.maximum(np.maximum(a * g, m * x + g), x + m * g), a * g)
    return f, f - a * g, np.zeros((1,) + a.shape[1:2] + m.shape[2:3])


def _decode_swap(a, m, t, g, oc: OpCosts, cp: _Copies, code_rule: bool):
    x = cp.pinned
    return a * g + m * x, m * x, np.zeros((1,) + a.shape[1:2] + m.shape[2:3])


def _decode_sync(a, m, t, g, oc: OpCosts, cp: _Copies, code_rule: bool):
    return a * g + m * cp.pageable, m * cp.pageable, np.zeros((1,) + a.shape[1:2] + m.shape[2:3])


def _prefill_stream(G, m, a, x, oc: OpCosts, layer, C):
    Gm = G * m / a
    return np.where(m >= 1, np.maximum(np.maximum(G, m * x + Gm / np.maximum(m, 1)), x + Gm), G)


def _prefill_swap(G, m, a, x, oc: OpCosts, layer, C):
    return G + m * x + m * oc.copy_d2h[layer][:, None] * (np.arange(C)[None, :] > 0)


def _prefill_sync(G, m, a, x, oc: OpCosts, layer, C):
    return G + m * oc.copy_pageable[layer][:, None]


def _decode_expert_time(hist: np.ndarray, mode: str, placement: str, oc: OpCosts, cp: _Copies,
                        swap_evicts: np.ndarray, code_rule: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Summed decode expert-phase time over cells, per capacity: (time, copy-wait time, cpu misses)."""
    C, A1, _ = hist.shape
    a = np.arange(A1)[None, :, None].astype(np.float64)
    m = np.arange(A1)[None, None, :].astype(np.float64)
    m = np.minimum(m, a)
    t = oc.decode_tokens_per_expert
    g = _interp(oc.gpu, t)
    cell = PLACEMENT_TIMES[placement].decode or TRANSFER_TIMES[mode].decode
    if cell is None:
        raise MoesimError(f"internal: transfer mode '{mode}' is timed elsewhere")
    f, copy_part, cpu_cnt = cell(a, m, t, g, oc, cp, code_rule)
    shape = (C, A1, A1)
    f = np.broadcast_to(f, shape)
    total = (hist * f).sum(axis=(1, 2))
    copy = (hist * np.broadcast_to(copy_part, shape)).sum(axis=(1, 2))
    cpu = (hist * np.broadcast_to(cpu_cnt, shape)).sum(axis=(1, 2))
    if mode == "swap":
        # the write-back of each evicted expert (every miss evicts once the cache is full; c = 0 keeps nothing)
        w = (hist * np.broadcast_to(m, shape)).sum(axis=(1, 2)) * cp.d2h.reshape(-1) * swap_evicts
        total = total + w
        copy = copy + w
    return total, copy, cpu


def _hybrimoe_cells(a, m, g, x, cpu1, ad, au):
    """HybriMoE's HSS split for a cell of ``a`` experts with ``m`` non-resident, equal token counts:
    the GPU takes residents then non-residents from the head, the CPU the tail, greedily; then the
    cell's time with the copy stream and the CPU chain beside the GPU."""
    shape = np.broadcast(a, m).shape
    a = np.broadcast_to(a, shape)
    m = np.broadcast_to(m, shape)
    h = a - m
    lo = np.zeros(shape)
    hi = a - 1
    gpu_end = np.zeros(shape)
    xfer_end = np.zeros(shape)
    cpu_end = np.zeros(shape)
    n_cpu = np.zeros(shape)
    m_gpu = np.zeros(shape)
    A = int(a.max()) if a.size else 0
    for _ in range(A):
        live = lo <= hi
        resident = lo < h
        new_xfer = np.where(resident, xfer_end, xfer_end + x)
        new_gpu = np.where(resident, gpu_end + g, np.maximum(gpu_end, new_xfer) + g)
        new_cpu = cpu_end + cpu1
        take_gpu = live & (new_gpu <= new_cpu)
        take_cpu = live & ~take_gpu
        gpu_end = np.where(take_gpu, new_gpu, gpu_end)
        xfer_end = np.where(take_gpu, new_xfer, xfer_end)
        m_gpu = m_gpu + (take_gpu & ~resident)
        lo = lo + take_gpu
        cpu_end = np.where(take_cpu, new_cpu, cpu_end)
        n_cpu = n_cpu + take_cpu
        hi = hi - take_cpu
    h_gpu = a - n_cpu - m_gpu
    gpu_n = h_gpu + m_gpu
    gpu_time = np.where(m_gpu >= 1, np.maximum(np.maximum(gpu_n * g, m_gpu * x + g), x + m_gpu * g), gpu_n * g)
    cpu_time = np.where(n_cpu >= 1, np.maximum(n_cpu * (ad + cpu1), m_gpu * x) + n_cpu * au, 0.0)
    return np.maximum(gpu_time, cpu_time), n_cpu


def _prefill_cells(fe: WorkloadFeatures, misses: Optional[np.ndarray], mode: str, placement: str, oc: OpCosts,
                   spec: PolicySpec, expert_bytes: list[int], layers_resident: Optional[np.ndarray]) -> np.ndarray:
    """[P, E+1] expert-phase time of each prefill cell at each cache size."""
    pc = fe.prefill
    E = fe.num_experts
    C = E + 1
    tok = pc.expert_tokens
    present = pc.expert_ids >= 0
    gt = np.where(present, oc.gpu[np.minimum(tok, len(oc.gpu) - 1)], 0.0)
    G = gt.sum(axis=1)[:, None]  # [P, 1]
    a = np.maximum(present.sum(axis=1), 1)[:, None].astype(np.float64)
    if misses is None:
        if layers_resident is None:
            return np.broadcast_to(G, (len(G), C)).copy()
        missing = layer_on_host(pc.layer, layers_resident, fe.num_layers, spec.cache.initial)
        if placement == "cpu":
            # llama.cpp: a host layer's experts run on the CPU, each its activations down, FFN and outputs up;
            # in a prefill step of enough tokens (op offload) each is uploaded and run on the GPU, in turn
            host = _cpu_chains(oc, tok, present)
            if oc.prefill_offload_routed:
                routed = np.where(present, tok, 0).sum(axis=1)[:, None]
                upload = G + a * oc.copy[pc.layer][:, None]
                host = np.where(routed >= oc.prefill_offload_routed, upload, host)
            return np.where(missing, host, G)
        # accelerate: a layer not among the first resident ones is copied whole on every forward pass
        return G + missing * oc.layer_copy[pc.layer][:, None]
    m = misses.astype(np.float64)
    x = oc.copy[pc.layer][:, None]
    if placement == "cpu":
        # a composed per-expert cache whose non-resident experts run on the CPU (prefill too): the misses' share
        # of the cell's CPU chains beside the hits' share of its GPU time (which experts miss is not known here)
        share = m / a
        return np.maximum(G * (1.0 - share), _cpu_chains(oc, tok, present) * share)
    own = PLACEMENT_TIMES[placement].prefill
    if own is not None:
        return own(fe, oc, expert_bytes, spec.placement.rule == "code")
    cell = TRANSFER_TIMES[mode].prefill
    if cell is None:
        raise MoesimError(f"internal: no prefill timing for transfer mode '{mode}'")
    return cell(G, m, a, x, oc, pc.layer, C)


def _fiddler_prefill(fe: WorkloadFeatures, oc: OpCosts, expert_bytes: list[int], code_rule: bool = False
                     ) -> np.ndarray:
    """Fiddler in prefill: resident experts on the GPU, others on the CPU when its time for their tokens
    beats a pageable copy, else copied synchronously; the layer ends when GPU and CPU are both done."""
    from moesim.costmodel.features import global_popularity_bytes

    pc = fe.prefill
    E = fe.num_experts
    eb = np.asarray(expert_bytes, dtype=np.int64)
    need = global_popularity_bytes(fe.popularity, eb)
    ids = np.maximum(pc.expert_ids, 0)
    present = pc.expert_ids >= 0
    first_c = -(-need[pc.layer[:, None], ids] // int(eb.sum()))  # [P, A] capacity from which resident
    tok = np.minimum(pc.expert_tokens, len(oc.gpu) - 1)
    g = np.where(present, oc.gpu[tok], 0.0)
    cpu_t = oc.cpu[tok]
    xp = oc.copy_pageable[pc.layer][:, None]
    to_cpu = present & ((tok * FIDDLER_CODE_CPU < FIDDLER_CODE_GPU) if code_rule else (cpu_t < xp))
    chain = np.where(to_cpu, oc.act_d2h[tok] + cpu_t + oc.act_h2d[tok], 0.0)
    sync = np.where(present & ~to_cpu, xp + g, 0.0)
    caps = np.arange(E + 1)
    resident = present[:, :, None] & (first_c[:, :, None] <= caps[None, None, :])  # [P, A, C]
    gpu_time = (np.where(resident, g[:, :, None], sync[:, :, None])).sum(axis=1)
    cpu_time = (np.where(resident, 0.0, chain[:, :, None])).sum(axis=1)
    return np.maximum(gpu_time, cpu_time)


@dataclass(frozen=True)
class PartTime:
    """A part's analytic time: its decode cell function and its prefill one (None: the transfer mode's, or, for
    a transfer mode, whole layers timed by :func:`accelerate_layers`)."""

    decode: Optional[object]
    prefill: Optional[object]


PLACEMENT_TIMES: dict[str, PartTime] = {
    "gpu": PartTime(None, None),  # every expert on the GPU: the transfer mode times the copies
    "fiddler": PartTime(_decode_fiddler, _fiddler_prefill),
    "hybrimoe": PartTime(_decode_hybrimoe, None),  # HSS in decode; prefill runs on the GPU
    # llama.cpp's host layers (a whole-layer cache, timed by layers in the backbone; this cell times a composed
    # per-expert cache whose non-resident experts all run on the CPU)
    "cpu": PartTime(_decode_cpu_host, None),
}
TRANSFER_TIMES: dict[str, PartTime] = {
    "stream": PartTime(_decode_stream, _prefill_stream),
    "swap": PartTime(_decode_swap, _prefill_swap),
    "sync": PartTime(_decode_sync, _prefill_sync),
    "layer": PartTime(None, None),  # accelerate: whole layers copied on every pass (a first-layers cache)
}


def analytic_gap(spec: PolicySpec) -> str:
    """Why the cost model has no analytic time for ``spec`` ("" when it has one)."""
    placement, mode = spec.placement.policy, spec.transfer.mode
    if spec.cache.policy not in MISS_TABLES:
        return f"the cost model has no miss table for cache rule '{spec.cache.policy}'"
    if placement not in PLACEMENT_TIMES:
        return f"the cost model has no analytic time for placement '{placement}'"
    if mode not in TRANSFER_TIMES:
        return f"the cost model has no analytic time for transfer '{mode}'"
    if spec.all_resident or spec.cache.initial in ("all",) + LAYERED_INITIAL:
        return ""  # nothing is copied per expert: every expert resident, or whole layers (accelerate, llama.cpp)
    part, transfer = PLACEMENT_TIMES[placement], TRANSFER_TIMES[mode]
    if (part.decode or transfer.decode) is None or (part.prefill or transfer.prefill) is None:
        return (f"the cost model times transfer '{mode}' for whole resident layers only (accelerate's first-layers "
                f"cache), not with cache '{spec.cache.policy}' starting {spec.cache.initial}")
    return ""


def accelerate_layers(expert_bytes: list[int], num_experts: int, cache_experts: np.ndarray,
                      initial: str = "first-layers") -> np.ndarray:
    """Whole layers resident for each cache size (the simulator's first-layers fill, or last-layers': from the
    last layer back)."""
    eb = np.asarray(expert_bytes, dtype=np.int64)
    budget = cache_experts.astype(np.int64) * int(eb.sum())
    cum = np.cumsum(num_experts * (eb if initial == "first-layers" else eb[::-1]))
    return np.searchsorted(cum, budget, side="right")


def layer_on_host(layer: np.ndarray, layers_resident: np.ndarray, num_layers: int, initial: str) -> np.ndarray:
    """[N, C] whether each cell's layer is outside the ``layers_resident`` whole layers at each cache size."""
    if initial == "first-layers":
        return layer[:, None] >= layers_resident[None, :]
    return layer[:, None] < (num_layers - layers_resident)[None, :]


def backbone(fe: WorkloadFeatures, spec: PolicySpec, oc: OpCosts, expert_bytes: list[int]) -> Backbone:
    E = fe.num_experts
    C = E + 1
    caps = np.arange(C)
    mode = spec.transfer.mode
    placement = spec.placement.policy
    table = miss_table(fe, spec, expert_bytes)
    dec = fe.decode
    n_steps = len(fe.steps.tokens)
    w_steps = fe.steps.tokens.astype(np.float64)
    g_dec = _interp(oc.gpu, oc.decode_tokens_per_expert)
    layers_res = None
    if table is None:
        cpu_n = np.zeros(C)
        if spec.cache.initial in LAYERED_INITIAL:
            layers_res = accelerate_layers(expert_bytes, E, caps, spec.cache.initial)
            missing = layer_on_host(dec.layer, layers_res, fe.num_layers, spec.cache.initial)  # [N, C]
            missed = (missing * dec.experts[:, None]).sum(axis=0).astype(np.float64)
            if placement == "cpu":  # llama.cpp: every host layer's expert runs on the CPU, nothing is copied
                chain = _cpu_chain(oc, oc.decode_tokens_per_expert)
                per_cell = dec.experts[:, None] * np.where(missing, chain, g_dec)
                copy = np.zeros(C)
                cpu_n = missed
            else:
                per_cell = dec.experts[:, None] * g_dec + missing * oc.layer_copy[dec.layer][:, None]
                copy = (missing * oc.layer_copy[dec.layer][:, None]).sum(axis=0)
            dec_w = (per_cell * dec.active[:, None]).sum(axis=0)
            dec_u = per_cell.sum(axis=0)
            hit = 1.0 - missed / max(dec.experts.sum(), 1)
            cpu_share = cpu_n / np.maximum(1.0, missed)
        else:
            base = float((dec.experts * g_dec).sum())
            dec_u = np.full(C, base)
            dec_w = np.full(C, float((dec.experts * dec.active * g_dec).sum()))
            copy = np.zeros(C)
            hit = np.ones(C)
            cpu_share = np.zeros(C)
    else:
        hist_w = fe.decode_histogram(table, weighted=True)
        hist_u = fe.decode_histogram(table, weighted=False)
        evicts = (caps > 0).astype(np.float64)
        cp = _effective_copies(fe, table, oc)
        code = spec.placement.rule == "code"
        dec_w, _, _ = _decode_expert_time(hist_w, mode, placement, oc, cp, evicts, code)
        dec_u, copy, cpu_n = _decode_expert_time(hist_u, mode, placement, oc, cp, evicts, code)
        accesses = max(dec.experts.sum(), 1)
        hit = 1.0 - table.decode.sum(axis=0) / accesses
        cpu_share = cpu_n / np.maximum(1.0, table.decode.sum(axis=0))
    pre_cells = _prefill_cells(fe, None if table is None else table.prefill, mode, placement, oc, spec,
                               expert_bytes, layers_res)  # [P, C]
    R = len(fe.prefills.tokens)
    pre_step = np.zeros((R, C))
    np.add.at(pre_step, fe.prefill.request, pre_cells)
    pre_step += oc.prefill_fixed[:, None]
    ttft = (fe.prefills.ttft_weight[:, None] * pre_step).sum(axis=0)
    interleave = (fe.prefills.interval_weight[:, None] * pre_step).sum(axis=0)
    fixed_w = float((oc.decode_fixed * w_steps).sum())
    fixed_u = float(oc.decode_fixed.sum())
    intervals = max(fe.decode_intervals, 1)
    tpot = (fixed_w + dec_w + interleave) / intervals
    pre_total = pre_step.sum(axis=0)
    dec_total = fixed_u + dec_u
    makespan = pre_total + dec_total
    copy_share = np.where(dec_u > 0, copy / np.where(dec_u > 0, dec_u, 1.0), 0.0)
    if n_steps == 0:
        tpot = np.full(C, np.nan)
    return Backbone(ttft, tpot, makespan, pre_total, dec_total, hit, copy_share, cpu_share.astype(np.float64))
