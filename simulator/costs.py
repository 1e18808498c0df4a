"""Per-run lookup tables from a hardware profile, so the engine's per-layer path is list indexing only.

Everything the engine needs is asked of the profile once, vectorised: an expert's FFN time for every
token count the workload can route to one expert, the CPU's time for the same, the copy time of one
expert of each layer (pinned/pageable, alone/under contention, each direction), the non-expert time of
one decoder layer for every (batch, context) a decode step can see and every prompt length, and the
head. No profile (or sklearn) call happens during the replay.

Kernels: an expert format's time comes from the profile's kernel for that format
(``WeightFormat.kernel``). When the profile has no such kernel (no bundled profile has int3/int2 GEMMs,
and CPU and non-expert models exist only for bf16) the next kernel with more bits that the profile does
have is used, and the substitution is reported in the result (``expert_kernel`` etc.), never silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from moesim.errors import MoesimError
from moesim.modelspec import ModelShape

KERNEL_LADDER = ("int2", "int3", "int4", "int8", "bf16")  # fewer bits first


def resolve_kernel(wanted: str, available: tuple[str, ...], what: str, profile_name: str) -> str:
    """``wanted`` if the profile has it, else the closest kernel with more bits, else an error."""
    if wanted in available:
        return wanted
    if wanted not in KERNEL_LADDER:
        raise MoesimError(f"kernel '{wanted}': expected one of {', '.join(KERNEL_LADDER)}")
    for k in KERNEL_LADDER[KERNEL_LADDER.index(wanted) + 1:]:
        if k in available:
            return k
    raise MoesimError(f"profile {profile_name} has no {what} kernel for {wanted} or wider "
                      f"(has: {', '.join(available) or 'none'})")


def kernel_label(wanted: str, used: str) -> str:
    return used if wanted == used else f"{used} (for {wanted})"


@dataclass
class CostTables:
    """Seconds, as Python lists for fast indexing. ``*_by_layer`` lists have one entry per MoE layer."""

    gpu_expert: list[float]  # [tokens] one expert on the GPU
    cpu_expert: list[float]  # [tokens] one expert on the host CPU
    act_d2h: list[float]  # [tokens] activations of that many tokens to the host
    act_h2d: list[float]  # [tokens] and back
    act_d2h_conc: list[float]  # the same while the other direction is busy
    act_h2d_conc: list[float]
    h2d_by_layer: list[float]  # one expert, pinned, alone
    h2d_conc_by_layer: list[float]  # while the other direction is busy
    h2d_pageable_by_layer: list[float]
    d2h_by_layer: list[float]
    d2h_conc_by_layer: list[float]
    prefill_non_expert: dict[int, float]  # prompt tokens -> one decoder layer
    decode_non_expert: dict[int, list[float]]  # batch -> [context] one decoder layer
    head: dict[int, float]  # rows -> embedding + final norm + lm_head
    layer_overhead_s: float
    step_overhead_s: float
    dense_layers: int  # decoder layers without routed experts (their attention is charged per step)
    shared_experts: int
    expert_kernel: str
    cpu_kernel: str
    non_expert_kernel: str
    expert_bytes_by_layer: list[int]
    # the profile's mutual slowdowns of compute and host->device copies (1.0 on a GPU; see HardwareProfile)
    compute_slowdown_with_copy: float = 1.0
    copy_slowdown_with_compute: float = 1.0
    # the non-expert layer's GPU kernel time alone (profile.non_expert_device_models), keyed as the two
    # tables above; None where the profile has none: the layer then costs its host-to-host time on the stream
    prefill_non_expert_device: Optional[dict[int, float]] = None
    decode_non_expert_device: Optional[dict[int, list[float]]] = None
    # the fixed latency of one non-expert layer call in the two tables above (the profile's model's ``latency_s``:
    # an eager PyTorch layer's launches and host work), which a graph runtime replaces by its own (runtime.py)
    prefill_non_expert_latency_s: float = 0.0
    decode_non_expert_latency_s: float = 0.0
    # the fixed latency of one CPU expert call in cpu_expert (its model's ``latency_s``: the host's dispatch of
    # a call), and the routed experts per token: a runtime that runs a layer's host experts as one op pays the
    # dispatch once per layer (runtime.py cpu_layer_op)
    cpu_expert_latency_s: float = 0.0
    top_k: int = 1
    # the host's sockets (NUMA nodes; the profile's host facts): cpu_expert is one socket's time, and a runtime
    # that splits each host expert over the sockets divides its work among them (runtime.py numa_split)
    host_sockets: int = 1
    # a prefill step of at least this many tokens runs host-placed experts on the GPU, their weights uploaded
    # for it (the runtime's op offload, runtime.py; 0: never; placement.py ``cpu``)
    prefill_offload_tokens: int = 0



def build_cost_tables(profile, shape: ModelShape, expert_bytes: list[int], expert_kernel: str,
                      non_expert_kernel: str, max_tokens: int, prompt_lengths: set[int],
                      decode_batches: set[int], max_context: int, needs_cpu: bool) -> CostTables:
    name = profile.name
    ek = resolve_kernel(expert_kernel, tuple(profile.expert_kernels), "expert", name)
    nk_avail = tuple(k for k in KERNEL_LADDER if k in profile.non_expert_models)
    nk = resolve_kernel(non_expert_kernel, nk_avail, "non-expert", name)
    tokens = np.arange(0, max_tokens + 1)
    gpu = np.asarray(profile.expert_time(shape, tokens, kernel=ek), dtype=np.float64)
    ck = ""
    if needs_cpu:
        ck = resolve_kernel(expert_kernel, tuple(profile.cpu_expert_kernels), "CPU expert", name)
        cpu = np.asarray(profile.cpu_expert_time(shape, tokens, kernel=ck), dtype=np.float64)
        cpu_latency = float(profile.cpu_expert_model(ck).model.latency_s)
    else:
        cpu = np.full(tokens.shape, np.inf)
        cpu_latency = 0.0
    act_bytes = tokens * shape.hidden_size * 2
    act_d2h = np.asarray(profile.copy_time(act_bytes, "d2h", pinned=True), dtype=np.float64)
    act_h2d = np.asarray(profile.copy_time(act_bytes, "h2d", pinned=True), dtype=np.float64)
    act_d2h_conc = np.asarray(profile.copy_time(act_bytes, "d2h", pinned=True, concurrent=True), dtype=np.float64)
    act_h2d_conc = np.asarray(profile.copy_time(act_bytes, "h2d", pinned=True, concurrent=True), dtype=np.float64)
    eb = np.asarray(expert_bytes, dtype=np.float64)

    def copy(direction: str, pinned: bool, concurrent: bool) -> list[float]:
        return np.asarray(profile.copy_time(eb, direction, pinned=pinned, concurrent=concurrent)).tolist()

    prefill = {}
    if prompt_lengths:
        lens = np.asarray(sorted(prompt_lengths))
        vals = np.asarray(profile.non_expert_time(shape, "prefill", lens, lens, 1, kernel=nk)).reshape(-1)
        prefill = {int(p): float(v) for p, v in zip(lens, vals)}
    contexts = np.arange(0, max_context + 2)
    decode = {}
    for b in sorted(decode_batches):
        vals = np.asarray(profile.non_expert_time(shape, "decode", b, contexts, b, kernel=nk)).reshape(-1)
        decode[int(b)] = vals.tolist()
    prefill_dev = decode_dev = None
    if set(profile.non_expert_device_models.get(nk, {})) == {"prefill", "decode"}:
        prefill_dev, decode_dev = {}, {}
        if prompt_lengths:
            vals = np.asarray(profile.non_expert_time(shape, "prefill", lens, lens, 1, kernel=nk,
                                                      device_only=True)).reshape(-1)
            # never above the host-to-host time: a kernel cannot outlast the call that waited for it
            prefill_dev = {int(p): min(float(v), prefill[int(p)]) for p, v in zip(lens, vals)}
        for b in sorted(decode_batches):
            vals = np.asarray(profile.non_expert_time(shape, "decode", b, contexts, b, kernel=nk,
                                                      device_only=True)).reshape(-1)
            decode_dev[int(b)] = np.minimum(vals, np.asarray(decode[int(b)])).tolist()
    rows = sorted({1} | set(decode_batches))
    head_vals = np.asarray(profile.head_time(shape, np.asarray(rows))).reshape(-1)
    return CostTables(
        gpu_expert=gpu.tolist(), cpu_expert=cpu.tolist(), act_d2h=act_d2h.tolist(), act_h2d=act_h2d.tolist(),
        act_d2h_conc=act_d2h_conc.tolist(), act_h2d_conc=act_h2d_conc.tolist(),
        h2d_by_layer=copy("h2d", True, False), h2d_conc_by_layer=copy("h2d", True, True),
        h2d_pageable_by_layer=copy("h2d", False, False), d2h_by_layer=copy("d2h", True, False),
        d2h_conc_by_layer=copy("d2h", True, True),
        prefill_non_expert=prefill, decode_non_expert=decode,
        head={int(r): float(v) for r, v in zip(rows, head_vals)},
        layer_overhead_s=float(profile.layer_overhead_s), step_overhead_s=float(profile.step_overhead_s),
        dense_layers=max(0, shape.num_model_layers - shape.num_moe_layers),
        shared_experts=int(shape.num_shared_experts),
        expert_kernel=kernel_label(expert_kernel, ek), cpu_kernel=kernel_label(expert_kernel, ck) if ck else "",
        non_expert_kernel=kernel_label(non_expert_kernel, nk),
        expert_bytes_by_layer=[int(b) for b in expert_bytes],
        compute_slowdown_with_copy=float(profile.compute_slowdown_with_copy),
        copy_slowdown_with_compute=float(profile.copy_slowdown_with_compute),
        prefill_non_expert_device=prefill_dev, decode_non_expert_device=decode_dev,
        prefill_non_expert_latency_s=float(profile.non_expert_models[nk]["prefill"].latency_s),
        decode_non_expert_latency_s=float(profile.non_expert_models[nk]["decode"].latency_s),
        cpu_expert_latency_s=cpu_latency, top_k=int(shape.top_k),
        host_sockets=max(1, int(profile.host.facts.get("sockets", 1))),
    )


def host_issues_ahead(costs: CostTables, transfer) -> bool:
    """Whether the host may launch a layer while the GPU still works through the previous one: the profile
    times the non-expert layer's kernels apart from its launches, and the copies leave the host free (not
    accelerate's per-parameter layer copies, not synchronous default-stream copies)."""
    return (costs.decode_non_expert_device is not None and costs.prefill_non_expert_device is not None
            and transfer.mode != "layer" and not (transfer.default_stream and not transfer.on_compute_stream))
