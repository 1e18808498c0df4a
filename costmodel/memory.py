"""Peak GPU memory of many configurations at once: the simulator's own memory model, vectorised.

Memory is deterministic arithmetic, so the cost model does not fit it: it uses the simulator's
functions for the workload-dependent parts (:func:`moesim.simulator.memory.kv_cache_bytes`,
:func:`~moesim.simulator.memory.activation_bytes`) and repeats :func:`~moesim.simulator.memory.plan_memory`'s
sizing rules for the cache (per-layer slots, AdapMoE's DP split, global pools in bytes or experts,
accelerate's whole layers, all-resident) over an array of cache sizes. Its error against the simulator
is zero by construction; ``tests/test_costmodel.py`` checks it equals ``plan_memory`` for every preset.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.simulator.config import PolicySpec
from moesim.simulator.memory import buffer_bytes as transfer_buffers


@dataclass(frozen=True)
class MemoryParts:
    """The parts of peak memory that do not depend on the cache size."""

    non_expert: int
    kv_cache: int
    activations: int
    reserve: int


def cache_bytes(spec: PolicySpec, expert_bytes: list[int], num_experts: int, cache_experts: np.ndarray,
                dp_sizes: np.ndarray | None = None) -> np.ndarray:
    """Bytes the cache holds at each ``cache_experts`` (experts per MoE layer), as ``plan_memory`` sizes it."""
    eb = np.asarray(expert_bytes, dtype=np.int64)
    E = num_experts
    c = np.asarray(cache_experts, dtype=np.int64)
    per_layer_sum = int(eb.sum())
    all_bytes = E * per_layer_sum
    cache = spec.cache
    if spec.all_resident:
        return np.full(c.shape, all_bytes, dtype=np.int64)
    if cache.initial == "first-layers":
        budget = c * per_layer_sum
        cum = np.concatenate([[0], np.cumsum(E * eb)])
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


def buffer_bytes(spec: PolicySpec, expert_bytes: list[int], num_experts: int) -> int:
    """Staging and prefetch buffers (the simulator's rule)."""
    return sum(transfer_buffers(spec.transfer, [int(b) for b in expert_bytes], num_experts))


def memory_parts(shape, workload, non_expert_bytes: int, profile) -> MemoryParts:
    from moesim.simulator.memory import activation_bytes, kv_cache_bytes

    return MemoryParts(int(non_expert_bytes), int(kv_cache_bytes(shape, workload)),
                       int(activation_bytes(shape, workload)), int(profile.runtime_reserve_bytes))


def peak_bytes(spec: PolicySpec, parts: MemoryParts, expert_bytes: list[int], num_experts: int,
               cache_experts: np.ndarray, dp_sizes: np.ndarray | None = None) -> np.ndarray:
    fixed = parts.non_expert + parts.kv_cache + parts.activations + parts.reserve
    return (fixed + buffer_bytes(spec, expert_bytes, num_experts)
            + cache_bytes(spec, expert_bytes, num_experts, cache_experts, dp_sizes))
