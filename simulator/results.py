"""The result of one simulation, and its flat table row (unit-suffixed snake_case columns)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

MIB = 2**20


@dataclass(frozen=True)
class RunLabel:
    """What was simulated: enough to rerun it, and the sweep's resume key."""

    trace: str
    profile: str
    policy: str
    cache_policy: str
    cache_scope: str
    prefetch: str
    placement: str
    transfer: str
    gating: str
    cache_experts: int  # requested experts per layer (-1: not given)
    cache_mem_mib: float  # requested cache bytes in MiB (-1: not given)
    gpu_mem_mib: float  # the memory budget checked against
    expert_format: str
    non_expert_format: str
    batch: int

    def key(self) -> str:
        return "|".join(str(getattr(self, f.name)) for f in dataclasses.fields(self))


@dataclass(frozen=True)
class MemoryBreakdown:
    non_expert_bytes: int
    cache_bytes: int
    staging_bytes: int
    prefetch_buffer_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    reserve_bytes: int
    # what the released build holds at load time beyond the running state (simulator.memory.build_transient_bytes)
    build_transient_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return (self.non_expert_bytes + self.cache_bytes + self.staging_bytes + self.prefetch_buffer_bytes
                + self.kv_cache_bytes + self.activation_bytes + self.reserve_bytes + self.build_transient_bytes)


@dataclass(frozen=True)
class SimResult:
    label: RunLabel
    feasible: bool
    reason: str  # why it does not fit, or ""
    memory: MemoryBreakdown
    cache_slots: int  # experts the cache can hold
    expert_kernel: str = ""  # the profile kernel that timed the experts ("int4 (for int2)" when substituted)
    cpu_kernel: str = ""
    non_expert_kernel: str = ""
    guess_source: str = ""
    requests: int = 0
    output_tokens: int = 0
    ttft_mean_s: float = math.nan
    ttft_p50_s: float = math.nan
    ttft_p90_s: float = math.nan
    tpot_mean_s: float = math.nan
    tpot_p50_s: float = math.nan
    tpot_p90_s: float = math.nan
    e2e_mean_s: float = math.nan
    e2e_p90_s: float = math.nan
    makespan_s: float = math.nan
    tokens_per_s: float = math.nan
    decode_tokens_per_s: float = math.nan
    # decode expert activations whose weights were on the GPU when needed (resident, or brought by a
    # prefetch); CPU-computed activations count as not
    hit_rate: float = math.nan
    prefill_hit_rate: float = math.nan
    hit_rate_per_layer: tuple[float, ...] = ()
    prefetch_issued: int = 0
    prefetch_precision: float = math.nan
    prefetch_recall: float = math.nan
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    stall_s: float = math.nan  # compute stream waiting for expert weights (copies on it included) or CPU experts
    gpu_util: float = math.nan
    h2d_util: float = math.nan
    d2h_util: float = math.nan
    cpu_util: float = math.nan
    cpu_expert_fraction: float = math.nan  # decode expert activations computed on the CPU
    gated_fraction: float = 0.0  # decode activations adaptive gating skipped
    sim_events: int = 0

    @property
    def peak_gpu_mib(self) -> float:
        return self.memory.total_bytes / MIB

    def to_row(self) -> dict[str, Any]:
        """One flat table row; column names carry their unit."""
        lab = self.label
        m = self.memory
        return {
            "trace": lab.trace,
            "profile": lab.profile,
            "policy": lab.policy,
            "cache_policy": lab.cache_policy,
            "cache_scope": lab.cache_scope,
            "prefetch": lab.prefetch,
            "placement": lab.placement,
            "transfer": lab.transfer,
            "gating": lab.gating,
            "cache_experts": lab.cache_experts,
            "cache_mem_mib": lab.cache_mem_mib,
            "gpu_mem_mib": lab.gpu_mem_mib,
            "expert_format": lab.expert_format,
            "non_expert_format": lab.non_expert_format,
            "batch": lab.batch,
            "feasible": self.feasible,
            "reason": self.reason,
            "cache_slots": self.cache_slots,
            "expert_kernel": self.expert_kernel,
            "cpu_kernel": self.cpu_kernel,
            "non_expert_kernel": self.non_expert_kernel,
            "guess_source": self.guess_source,
            "requests": self.requests,
            "output_tokens": self.output_tokens,
            "ttft_mean_s": self.ttft_mean_s,
            "ttft_p50_s": self.ttft_p50_s,
            "ttft_p90_s": self.ttft_p90_s,
            "tpot_mean_s": self.tpot_mean_s,
            "tpot_p50_s": self.tpot_p50_s,
            "tpot_p90_s": self.tpot_p90_s,
            "e2e_mean_s": self.e2e_mean_s,
            "e2e_p90_s": self.e2e_p90_s,
            "makespan_s": self.makespan_s,
            "tokens_per_s": self.tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "peak_gpu_mib": self.peak_gpu_mib,
            "non_expert_mib": m.non_expert_bytes / MIB,
            "cache_mib": m.cache_bytes / MIB,
            "staging_mib": (m.staging_bytes + m.prefetch_buffer_bytes) / MIB,
            "kv_cache_mib": m.kv_cache_bytes / MIB,
            "activation_mib": m.activation_bytes / MIB,
            "reserve_mib": m.reserve_bytes / MIB,
            "build_transient_mib": m.build_transient_bytes / MIB,
            "hit_rate": self.hit_rate,
            "prefill_hit_rate": self.prefill_hit_rate,
            "prefetch_issued": self.prefetch_issued,
            "prefetch_precision": self.prefetch_precision,
            "prefetch_recall": self.prefetch_recall,
            "h2d_mib": self.h2d_bytes / MIB,
            "d2h_mib": self.d2h_bytes / MIB,
            "stall_s": self.stall_s,
            "gpu_util": self.gpu_util,
            "h2d_util": self.h2d_util,
            "d2h_util": self.d2h_util,
            "cpu_util": self.cpu_util,
            "cpu_expert_fraction": self.cpu_expert_fraction,
            "gated_fraction": self.gated_fraction,
            "sim_events": self.sim_events,
            "run_key": lab.key(),
        }

    def to_dict(self) -> dict[str, Any]:
        d = self.to_row()
        d["hit_rate_per_layer"] = list(self.hit_rate_per_layer)
        return d


ROW_COLUMNS: tuple[str, ...] = tuple(
    SimResult(
        label=RunLabel("", "", "", "", "", "", "", "", "", 0, -1.0, 0.0, "", "", 1),
        feasible=False, reason="", memory=MemoryBreakdown(0, 0, 0, 0, 0, 0, 0), cache_slots=0,
    ).to_row()
)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def mean(values: list[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan
