"""Peak GPU memory from its parts, cache sizing from a budget, and AdapMoE's DP over per-layer miss curves.

Peak = non-expert weights at their format + cache slots + staging and prefetch buffers + KV cache for
the largest batch's total context + activations of the largest step + the runtime's reserve (from the
profile). A configuration whose peak exceeds the GPU memory budget is reported as not fitting.

A released build may hold more at load time than while it runs (Mixtral-Offloading's 16-bit trunk,
:func:`build_transient_bytes`); the peak is the larger of the two.

Activations are an estimate: the largest step's hidden states (4 x hidden per token: residual, norm,
attention output, MoE output), one routed expert's intermediate per token (3 x expert intermediate), and
fp32 logits for the sequences that sample, all at 16 bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from moesim.modelspec import ModelShape
from moesim.simulator.cache import CacheCapacity
from moesim.simulator.config import LAYERED_INITIAL, PolicySpec
from moesim.simulator.results import MIB, MemoryBreakdown
from moesim.simulator.workload import Workload


@dataclass(frozen=True)
class MemoryPlan:
    capacity: CacheCapacity
    breakdown: MemoryBreakdown
    budget_bytes: int
    fits: bool
    reason: str
    slots: int  # experts the cache holds at most


def kv_cache_bytes(shape: ModelShape, workload: Workload) -> int:
    tokens = max(
        (sum(workload.prompt_tokens[r] + workload.decode_tokens[r] for r in b.requests) for b in workload.batches),
        default=0,
    )
    return shape.kv_cache_bytes(tokens)


def activation_bytes(shape: ModelShape, workload: Workload) -> int:
    step_tokens = max((s.tokens for s in workload.steps()), default=1)
    rows = max(workload.batch, 1)
    per_token = 4 * shape.hidden_size + 3 * shape.expert_intermediate_size
    return int(step_tokens * per_token * 2 + rows * shape.vocab_size * 4)


def lru_miss_curves(trace) -> np.ndarray:
    """[L, E+1]: decode misses of a per-layer LRU with 0..E slots (the tracer's one-pass stack distances,
    prefill warming the cache)."""
    from moesim.tracer.stats import lru_hit_curve

    curve = lru_hit_curve(trace, scope="layer", phase="decode")
    return curve.layer_accesses[:, None] - curve.layer_hits


def _dp_over_budgets(curves: np.ndarray, total: int) -> tuple[np.ndarray, np.ndarray]:
    """AdapMoE's DP over budgets 0..``total``: least summed misses per budget, and each layer's size choice.

    Ties go to the smallest size. The values and choices at a budget do not depend on ``total``, so one run
    over the largest budget serves every smaller one (:func:`dp_sizes_every_budget`).
    """
    L, S = curves.shape
    E = S - 1
    inf = np.iinfo(np.int64).max // 4
    dp = np.full(total + 1, inf, dtype=np.int64)
    dp[0] = 0
    choice = np.zeros((L, total + 1), dtype=np.int64)
    for layer in range(L):
        new = np.full(total + 1, inf, dtype=np.int64)
        pick = np.zeros(total + 1, dtype=np.int64)
        for s in range(min(E, total) + 1):
            cand = np.full(total + 1, inf, dtype=np.int64)
            cand[s:] = dp[: total + 1 - s] + curves[layer, s]
            better = cand < new
            new[better] = cand[better]
            pick[better] = s
        dp = new
        choice[layer] = pick
    return dp, choice


def _backtrack(dp: np.ndarray, choice: np.ndarray, budget: int) -> list[int]:
    # the whole budget is used when it can be (more slots never add misses)
    t = int(np.flatnonzero(dp[: budget + 1] < np.iinfo(np.int64).max // 4).max())
    sizes = [0] * choice.shape[0]
    for layer in range(choice.shape[0] - 1, -1, -1):
        s = int(choice[layer, t])
        sizes[layer] = s
        t -= s
    return sizes


def dp_cache_sizes(curves: np.ndarray, total_slots: int) -> list[int]:
    """Split ``total_slots`` over layers to minimise the summed misses (AdapMoE's ``get_cache_size``)."""
    L, S = curves.shape
    total_slots = int(min(max(total_slots, 0), L * (S - 1)))
    dp, choice = _dp_over_budgets(curves, total_slots)
    return _backtrack(dp, choice, total_slots)


def dp_sizes_every_budget(curves: np.ndarray) -> np.ndarray:
    """[E+1, L]: :func:`dp_cache_sizes` for the budgets p*L, p = 0..E (p slots per layer on average), from one DP
    (the cost model predicts every cache size of a search at once)."""
    L, S = curves.shape
    E = S - 1
    dp, choice = _dp_over_budgets(np.asarray(curves, dtype=np.int64), L * E)
    return np.asarray([_backtrack(dp, choice, p * L) for p in range(E + 1)], dtype=np.int64).reshape(E + 1, L)


def buffer_bytes(transfer, expert_bytes: list[int], num_experts: int) -> tuple[int, int]:
    """(staging, prefetch buffer) bytes a transfer mode needs beside the cache: a whole layer of experts for
    accelerate's layer copies, else its staging slots; both sized for the largest expert."""
    max_eb = max(expert_bytes)
    staging = num_experts * max_eb if transfer.mode == "layer" else transfer.staging_experts * max_eb
    return int(staging), int(transfer.prefetch_buffer_experts * max_eb)


def op_offload_bytes(policy: PolicySpec, expert_bytes: list[int], num_experts: int) -> int:
    """The device buffer of a runtime whose prefill uploads host experts (llama.cpp's op offload): the scheduler
    copies a split's inputs into its compute buffer, and a layer's three merged expert tensors are inputs of one
    split, so it holds one whole layer of experts (reserved at start-up for the largest batch, where some layer's
    experts stay on the host: a plan that holds every expert on the GPU drops it, :func:`host_offload_bytes`)."""
    from moesim.simulator.runtime import runtime_costs

    if not runtime_costs(policy.runtime, policy.released_code_costs).op_offload_tokens:
        return 0
    return int(num_experts * max(expert_bytes))


def host_offload_bytes(op_offload: int, cache_bytes, all_expert_bytes: int):
    """The op-offload buffer a plan needs: ``op_offload`` (:func:`op_offload_bytes`) while the cache holds
    fewer than all experts (``cache_bytes`` below ``all_expert_bytes``; arrays or numbers), else none."""
    return np.where(np.asarray(cache_bytes) < all_expert_bytes, op_offload, 0)


def cache_bytes_at_sizes(spec: PolicySpec, expert_bytes: list[int], num_experts: int, cache_experts: np.ndarray,
                dp_sizes: np.ndarray | None = None) -> np.ndarray:
    """Bytes the cache holds at each ``cache_experts`` (experts per MoE layer), as :func:`plan_memory` sizes it,
    for an array of sizes at once (the cost model's peak memory); ``dp_sizes``: :func:`dp_sizes_every_budget`."""
    eb = np.asarray(expert_bytes, dtype=np.int64)
    E = num_experts
    c = np.asarray(cache_experts, dtype=np.int64)
    per_layer_sum = int(eb.sum())
    all_bytes = E * per_layer_sum
    cache = spec.cache
    if spec.all_resident:
        return np.full(c.shape, all_bytes, dtype=np.int64)
    if cache.initial in LAYERED_INITIAL:
        budget = c * per_layer_sum
        order = eb if cache.initial == "first-layers" else eb[::-1]
        cum = np.concatenate([[0], np.cumsum(E * order)])
        n = np.searchsorted(cum, budget, side="right") - 1
        return cum[n]
    per_layer = np.minimum(c, E)
    total_bytes = per_layer * per_layer_sum
    if cache.scope == "layer":
        if cache.sizing == "dp":
            if dp_sizes is None:
                raise ValueError("dp sizing needs the DP sizes")
            return (dp_sizes[per_layer] * eb[None, :]).sum(axis=1)
        return per_layer * per_layer_sum
    if cache.unit == "bytes":
        return total_bytes
    max_eb = int(eb.max())
    return (total_bytes // max_eb) * max_eb


def build_transient_bytes(policy: PolicySpec, shape: ModelShape, non_expert_bytes: int, kv_bytes: int,
                          activation_bytes: int) -> int:
    """Bytes the released build holds at its load-time peak beyond the running state.

    Mixtral-Offloading builds its trunk at 16 bits on the GPU and only then swaps in HQQ attention; the
    freed 16-bit blocks stay in PyTorch's caching allocator until the first ``empty_cache()``, which comes
    after the expert cache and its buffers are allocated. Its load-time peak is therefore the 16-bit trunk +
    cache + buffers + reserve, against the running non-expert weights + KV cache + activations."""
    from moesim.simulator.runtime import runtime_costs

    bits = runtime_costs(policy.runtime).build_trunk_bits
    if not bits:
        return 0
    trunk = int(shape.non_expert_params * bits // 8)
    return max(0, trunk - int(non_expert_bytes) - int(kv_bytes) - int(activation_bytes))


def plan_memory(policy: PolicySpec, shape: ModelShape, expert_bytes: list[int], non_expert_bytes: int,
                workload: Workload, profile, cache_experts: Optional[int], gpu_mem_bytes: Optional[int],
                miss_curves: Optional[np.ndarray] = None, cache_mem: Optional[int] = None) -> MemoryPlan:
    L, E = workload.num_layers, workload.num_experts
    spec = policy.cache
    transfer = policy.transfer
    budget = int(gpu_mem_bytes if gpu_mem_bytes is not None else profile.device.memory_bytes)
    max_eb = max(expert_bytes)
    staging, prefetch_buf = buffer_bytes(transfer, expert_bytes, E)
    op_offload = op_offload_bytes(policy, expert_bytes, E)  # charged below only where a layer stays on the host
    kv = kv_cache_bytes(shape, workload)
    act = activation_bytes(shape, workload)
    reserve = int(profile.runtime_reserve_bytes)
    # a memory-sized cache leaves room for the op-offload buffer
    fixed = non_expert_bytes + staging + op_offload + prefetch_buf + kv + act + reserve
    # what a memory-sized cache must leave free: everything, or the dense weights only (see PolicySpec)
    carve = fixed if policy.memory_rule == "free" else non_expert_bytes
    per_layer_sum = sum(expert_bytes)
    all_bytes = E * per_layer_sum

    if policy.all_resident:
        if spec.scope == "layer":
            limits, unit = tuple([E] * L), "experts"
        else:
            limits, unit = (all_bytes,), "bytes"
        cache_bytes = all_bytes
    elif spec.initial in LAYERED_INITIAL:
        if cache_experts is not None:
            budget_for_cache = cache_experts * per_layer_sum
        elif cache_mem is not None:
            budget_for_cache = cache_mem
        else:
            budget_for_cache = max(0, int(budget * policy.memory_fraction) - carve)
        first = spec.initial == "first-layers"  # fill from the first layer on, or from the last one back
        used, n_layers = 0, 0
        for b in (expert_bytes if first else expert_bytes[::-1]):
            if used + E * b > budget_for_cache:
                break
            used += E * b
            n_layers += 1
        resident, host = [E] * n_layers, [0] * (L - n_layers)
        limits = tuple(resident + host if first else host + resident)
        unit = "experts"
        cache_bytes = used
    else:
        if cache_experts is not None:
            per_layer = min(int(cache_experts), E)
            total_bytes = per_layer * per_layer_sum
            total_slots = per_layer * L
        else:
            if cache_mem is not None:
                free = int(cache_mem)
            else:
                free = max(0, int(budget * policy.memory_fraction) - carve)
            per_layer = min(E, free // per_layer_sum) if per_layer_sum else 0
            total_bytes = min(free, all_bytes)
            # the DP may put slots on the layers with the biggest experts: count them at the biggest size
            total_slots = min(L * E, int(free // max_eb))
        if spec.scope == "layer":
            unit = "experts"
            if spec.sizing == "dp":
                if miss_curves is None:
                    raise ValueError("dp sizing needs miss curves")
                limits = tuple(dp_cache_sizes(miss_curves, total_slots))
            else:
                limits = tuple([per_layer] * L)
            cache_bytes = sum(n * b for n, b in zip(limits, expert_bytes))
        elif spec.unit == "bytes" or cache_mem is not None:
            unit = "bytes"
            limits = (int(total_bytes),)
            cache_bytes = int(total_bytes)
        else:
            unit = "experts"
            limits = (int(total_bytes // max_eb),)
            cache_bytes = limits[0] * max_eb
    staging += int(host_offload_bytes(op_offload, cache_bytes, all_bytes))
    capacity = CacheCapacity("layer" if spec.initial in LAYERED_INITIAL else spec.scope, unit, limits)
    breakdown = MemoryBreakdown(non_expert_bytes, int(cache_bytes), int(staging), int(prefetch_buf), int(kv),
                                int(act), reserve, build_transient_bytes(policy, shape, non_expert_bytes, kv, act))
    total = breakdown.total_bytes
    fits = total <= budget
    reason = ""
    if not fits:
        what = "every expert" if policy.all_resident else "this configuration"
        reason = (f"{what} needs {total / MIB:.0f} MiB of GPU memory, the budget is {budget / MIB:.0f} MiB "
                  f"(cache {cache_bytes / MIB:.0f} MiB, non-expert {non_expert_bytes / MIB:.0f} MiB, "
                  f"KV {kv / MIB:.0f} MiB, reserve {reserve / MIB:.0f} MiB"
                  + (f", load-time 16-bit trunk +{breakdown.build_transient_bytes / MIB:.0f} MiB"
                     if breakdown.build_transient_bytes else "") + ")")
    if unit == "experts":
        slots = sum(limits)
    else:
        slots = int(limits[0] // max_eb) if len(limits) == 1 else 0
    return MemoryPlan(capacity, breakdown, budget, fits, reason, slots)
