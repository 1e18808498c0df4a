"""Peak GPU memory of many configurations at once: the simulator's own memory model, vectorised.

Memory is deterministic arithmetic, so the cost model does not fit it: it sums the simulator's own rules
(:mod:`moesim.simulator.memory`: KV cache, activations, a transfer mode's buffers, and the cache's bytes at
an array of cache sizes, :func:`~moesim.simulator.memory.cache_bytes_at_sizes`). Its error against the
simulator is zero by construction; ``tests/test_costmodel.py`` checks it equals ``plan_memory`` for every preset.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.simulator.config import PolicySpec
from moesim.simulator.memory import buffer_bytes as transfer_buffers
from moesim.simulator.memory import host_offload_bytes, op_offload_bytes
from moesim.simulator.memory import cache_bytes_at_sizes as cache_bytes


@dataclass(frozen=True)
class MemoryParts:
    """The parts of peak memory that do not depend on the cache size."""

    non_expert: int
    kv_cache: int
    activations: int
    reserve: int
    shape: object = None  # the model shape (a released build's load-time trunk is sized from it)


def buffer_bytes(spec: PolicySpec, expert_bytes: list[int], num_experts: int, cache_bytes_now) -> np.ndarray:
    """Staging and prefetch buffers at each of the cache's sizes (``cache_bytes_now``; the simulator's rule)."""
    expert_bytes = [int(b) for b in expert_bytes]
    op_offload = host_offload_bytes(op_offload_bytes(spec, expert_bytes, num_experts), cache_bytes_now,
                                    num_experts * sum(expert_bytes))
    return sum(transfer_buffers(spec.transfer, expert_bytes, num_experts)) + op_offload


def memory_parts(shape, workload, non_expert_bytes: int, profile) -> MemoryParts:
    from moesim.simulator.memory import activation_bytes, kv_cache_bytes

    return MemoryParts(int(non_expert_bytes), int(kv_cache_bytes(shape, workload)),
                       int(activation_bytes(shape, workload)), int(profile.runtime_reserve_bytes), shape)


def peak_bytes(spec: PolicySpec, parts: MemoryParts, expert_bytes: list[int], num_experts: int,
               cache_experts: np.ndarray, dp_sizes: np.ndarray | None = None) -> np.ndarray:
    from moesim.simulator.memory import build_transient_bytes

    fixed = parts.non_expert + parts.kv_cache + parts.activations + parts.reserve
    if parts.shape is not None:
        fixed += build_transient_bytes(spec, parts.shape, parts.non_expert, parts.kv_cache, parts.activations)
    cached = cache_bytes(spec, expert_bytes, num_experts, cache_experts, dp_sizes)
    return fixed + buffer_bytes(spec, expert_bytes, num_experts, cached) + cached
