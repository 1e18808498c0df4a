"""Typed configuration of one simulation: the policy (composed parts) and the run's sizes."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from moesim.errors import MoesimError
from moesim.quant import WeightFormat
from moesim.simulator.cache import CACHE_POLICIES, SCOPES, UNITS
from moesim.simulator.gating import GatingSpec
from moesim.simulator.placement import PlacementSpec
from moesim.simulator.prefetch import PrefetchSpec
from moesim.simulator.transfer import TransferSpec

INITIAL_STATES = ("empty", "last-experts", "popular", "all", "first-layers", "last-layers")
# whole layers resident (accelerate fills the first layers, llama.cpp --n-cpu-moe keeps the first on the host)
LAYERED_INITIAL = ("first-layers", "last-layers")
SIZINGS = ("uniform", "dp")


@dataclass(frozen=True)
class CacheSpec:
    policy: str = "lru"
    scope: str = "layer"  # "layer": one pool per MoE layer; "global": one pool for all
    unit: str = "experts"  # capacity unit of a global pool: "experts" or "bytes"
    sizing: str = "uniform"  # per-layer pools: the same size everywhere, or AdapMoE's DP over miss curves
    initial: str = "empty"  # what is resident before the first request (not timed)
    alpha: float = 0.5  # mrs
    top_p: int = 12  # mrs

    def __post_init__(self):
        if self.policy not in CACHE_POLICIES:
            raise MoesimError(f"cache policy '{self.policy}': expected one of {', '.join(CACHE_POLICIES.names())}")
        if self.scope not in SCOPES:
            raise MoesimError(f"--scope '{self.scope}': expected one of {', '.join(SCOPES)}")
        if self.unit not in UNITS:
            raise MoesimError(f"cache unit '{self.unit}': expected one of {', '.join(UNITS)}")
        if self.sizing not in SIZINGS:
            raise MoesimError(f"cache sizing '{self.sizing}': expected one of {', '.join(SIZINGS)}")
        if self.initial not in INITIAL_STATES:
            raise MoesimError(f"initial cache state '{self.initial}': expected one of {', '.join(INITIAL_STATES)}")

    def params(self) -> dict:
        return {"alpha": self.alpha, "top_p": self.top_p} if self.policy == "mrs" else {}


@dataclass(frozen=True)
class PolicySpec:
    """A complete offloading policy: the parts of :mod:`moesim.simulator.policies`, plus memory habits."""

    name: str
    cache: CacheSpec
    prefetch: PrefetchSpec
    placement: PlacementSpec
    transfer: TransferSpec
    gating: GatingSpec = GatingSpec()
    memory_fraction: float = 1.0  # share of GPU memory the system allows itself (when it sizes its cache)
    # How a memory-sized cache is computed. "free": fraction x budget minus everything else on the GPU
    # (non-expert weights, staging, KV, activations, runtime reserve). "pool": fraction x budget minus the
    # non-expert weights only, as MoE-Infinity's GetSparseCacheLimit and Fiddler's calc_n_expert_on_gpu
    # do (their KV cache, activations and CUDA context lie outside that sum).
    memory_rule: str = "free"
    # the released runtime's implementation costs (simulator/runtime.py): per-expert and per-layer dispatch,
    # host synchronisations, HQQ dequantization traffic; "none" is an idealised engine
    runtime: str = "none"
    all_resident: bool = False  # every expert must fit (no offloading)
    # The runtime's fitted unit costs (simulator/runtime.py FITTED_UNIT_COSTS) describe the released code that
    # published numbers were measured on; False for an engine that makes this preset's decisions with its own
    # code (moesim validate's), which has the counted launches and syncs' kind of cost but not those
    released_code_costs: bool = True

    def __post_init__(self):
        if self.memory_rule not in ("free", "pool"):
            raise MoesimError(f"memory rule '{self.memory_rule}': expected free or pool")
        from moesim.simulator.runtime import RUNTIMES

        if self.runtime not in RUNTIMES:
            raise MoesimError(f"runtime '{self.runtime}': expected one of {', '.join(RUNTIMES)}")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise MoesimError(f"memory fraction {self.memory_fraction}: expected 0 < fraction <= 1")

    def with_parts(self, **changes) -> "PolicySpec":
        return replace(self, **changes)


@dataclass(frozen=True)
class SimConfig:
    policy: PolicySpec
    cache_experts: Optional[int] = None  # experts per MoE layer (a global pool gets as many per layer on average)
    gpu_mem_bytes: Optional[int] = None  # the GPU memory budget (default: the profile's device memory)
    cache_bytes: Optional[int] = None  # cache capacity in bytes (instead of cache_experts)
    expert_format: Optional[WeightFormat] = None  # None: the trace's own dtype and bytes
    non_expert_format: Optional[WeightFormat] = None
    batch: int = 1

    def __post_init__(self):
        if self.cache_experts is not None and self.cache_experts < 0:
            raise MoesimError(f"--cache-experts {self.cache_experts}: expected a non-negative integer")
        if self.cache_experts is not None and self.cache_bytes is not None:
            raise MoesimError("--cache-experts and --cache-mem both given: expected one cache size")
        if self.cache_bytes is not None and self.cache_bytes < 0:
            raise MoesimError(f"--cache-mem {self.cache_bytes}: expected a non-negative size")
        if self.gpu_mem_bytes is not None and self.gpu_mem_bytes <= 0:
            raise MoesimError(f"--gpu-mem {self.gpu_mem_bytes}: expected a positive size")
        if self.batch < 1:
            raise MoesimError(f"--batch {self.batch}: expected a positive integer")
