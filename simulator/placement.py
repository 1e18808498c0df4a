"""Execution placement: which of a layer-step's experts run on the host CPU instead of the GPU.

``gpu``       every expert runs on the GPU; a non-resident one is loaded first.
``fiddler``   Fiddler (``src/fiddler/mixtral.py``): a resident expert runs on the GPU; a non-resident one
              runs on the CPU when computing its tokens there is cheaper than bringing its weights over.
              ``rule="profile"`` uses the profile's real costs (CPU time for that many tokens versus the
              copy time of one expert with the run's transfer mode); ``rule="code"`` uses the released
              constants (``latency_cpu=7`` per token versus ``latency_gpu=70``, i.e. CPU below 10 tokens).
              The code enumerates all 2^E assignments for the minimum *sum*, which is this per-expert rule.
``hybrimoe``  HybriMoE's HSS decode scheduler (``ktransformers/operators/experts.py``): resident experts
              then non-resident ones, each sorted by token count; the GPU takes the head of the list
              (a non-resident expert waits for its copy on the copy stream), the CPU the tail, whichever
              finishes earlier. Prefill runs everything on the GPU. ``rule="profile"`` uses the profile's
              costs; ``rule="code"`` the released constants (CPU 1 ms/token + 0.79 ms, GPU 0.5 ms per
              expert, copy 0.418 ms).
``cpu``       llama.cpp's ``--cpu-moe`` / ``--n-cpu-moe N``: a layer's experts live either in GPU memory or in
              host memory, and an expert in host memory runs on the CPU, except in a prefill step of at least
              ``CostTables.prefill_offload_tokens`` tokens (llama.cpp's op offload, a runtime fact: 32 for the
              released code, 0 for an engine's run), where it is uploaded for the step and runs on the GPU.

Placements are plain Python over the per-run cost tables (:class:`moesim.simulator.costs.CostTables`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from moesim.errors import MoesimError
from moesim.simulator.costs import CostTables
from moesim.simulator.policies import Registry
from moesim.tracer import PREFILL

RULES = ("profile", "code")


@dataclass(frozen=True)
class PlacementSpec:
    policy: str = "gpu"
    rule: str = "profile"

    def __post_init__(self):
        if self.rule not in RULES:
            raise MoesimError(f"placement rule '{self.rule}': expected one of {', '.join(RULES)}")


class Placement:
    name = "base"
    needs_cpu = False
    # False when a non-resident expert never comes to the GPU (it runs where it lives): such a run may
    # hold no expert buffer on the device at all (llama.cpp's --cpu-moe)
    copies_misses = True

    def __init__(self, costs: CostTables, spec: PlacementSpec, copy_by_layer: Sequence[float]):
        self.costs = costs
        self.spec = spec
        self.copy_by_layer = list(copy_by_layer)  # seconds to bring one expert of each layer to the GPU

    def place(self, layer: int, phase: int, experts: Sequence[int], tokens: Sequence[int],
              resident: Callable[[int, int], bool]) -> Optional[list[bool]]:
        """Per expert True for CPU; None when everything runs on the GPU."""
        raise NotImplementedError


PLACEMENTS: Registry[type[Placement]] = Registry("placement")


@PLACEMENTS.register("gpu")
class GpuOnly(Placement):
    name = "gpu"

    def place(self, layer, phase, experts, tokens, resident):
        return None


@PLACEMENTS.register("fiddler")
class FiddlerPlacement(Placement):
    name = "fiddler"
    needs_cpu = True
    CODE_CPU_PER_TOKEN = 7.0
    CODE_GPU_TRANSFER = 70.0

    def place(self, layer, phase, experts, tokens, resident):
        out = None
        code = self.spec.rule == "code"
        cpu = self.costs.cpu_expert
        copy = self.copy_by_layer[layer]
        for i, e in enumerate(experts):
            if resident(layer, e):
                continue
            t = tokens[i]
            to_cpu = (t * self.CODE_CPU_PER_TOKEN < self.CODE_GPU_TRANSFER) if code else (cpu[t] < copy)
            if to_cpu:
                if out is None:
                    out = [False] * len(experts)
                out[i] = True
        return out


@PLACEMENTS.register("hybrimoe")
class HybriMoEPlacement(Placement):
    name = "hybrimoe"
    needs_cpu = True
    CODE_CPU_PER_TOKEN_S = 1e-3
    CODE_CPU_BASE_S = 0.79e-3
    CODE_GPU_S = 0.5e-3
    CODE_MOVE_S = 0.418e-3

    def place(self, layer, phase, experts, tokens, resident):
        if phase == PREFILL or not experts:
            return None
        code = self.spec.rule == "code"
        gpu_t = self.costs.gpu_expert
        cpu_t = self.costs.cpu_expert
        move = self.CODE_MOVE_S if code else self.copy_by_layer[layer]
        res = [resident(layer, e) for e in experts]
        idx = sorted(range(len(experts)), key=lambda i: (not res[i], -tokens[i], experts[i]))
        gpu_end = xfer_end = cpu_end = 0.0
        lo, hi = 0, len(idx) - 1
        out = [False] * len(experts)
        while lo <= hi:
            g = idx[lo]
            t = tokens[g]
            g_cost = self.CODE_GPU_S if code else gpu_t[t]
            if res[g]:
                new_gpu = gpu_end + g_cost
                new_xfer = xfer_end
            else:
                new_xfer = xfer_end + move
                new_gpu = max(gpu_end, new_xfer) + g_cost
            c = idx[hi]
            tc = tokens[c]
            new_cpu = cpu_end + (self.CODE_CPU_PER_TOKEN_S * tc + self.CODE_CPU_BASE_S if code else cpu_t[tc])
            if new_gpu <= new_cpu:
                gpu_end, xfer_end = new_gpu, new_xfer
                lo += 1
            else:
                cpu_end = new_cpu
                out[c] = True
                hi -= 1
        return out if any(out) else None


@PLACEMENTS.register("cpu")
class CpuForHostExperts(Placement):
    name = "cpu"
    needs_cpu = True
    copies_misses = False

    def place(self, layer, phase, experts, tokens, resident):
        offload = self.costs.prefill_offload_tokens
        # every token of a step routes top_k experts in each layer: the step's tokens are their sum over top_k
        if offload and phase == PREFILL and sum(tokens) >= offload * self.costs.top_k:
            return None
        out = [not resident(layer, e) for e in experts]
        return out if any(out) else None


def make_placement(spec: PlacementSpec, costs: CostTables, copy_by_layer: Sequence[float]) -> Placement:
    return PLACEMENTS.get(spec.policy, "--placement")(costs, spec, copy_by_layer)
