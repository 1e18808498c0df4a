"""Implementation costs of a system's released runtime: what its Python/C++ code adds to every expert call
and every layer, beyond the kernels' arithmetic and the copies.

The released systems drive one expert at a time from Python, synchronise with the GPU inside that loop,
and (Mixtral-Offloading) run HQQ experts through dequantize-then-matmul kernels. Each term below is a count
read from the released code times a unit cost with a source; the counts and their code locations are in
:data:`RUNTIMES`. A runtime style belongs to a preset (``PolicySpec.runtime``); ``none`` adds nothing (the
idealised engine the other presets describe).

Unit costs:

``LAUNCH_S``  one eager kernel launch, about 5 us (component-costs.md 4.1: 4-6 us per launch; 4.2: llama.cpp
              5 us average). Counted only where a host synchronisation in the same loop exposes it.
``SYNC_S``    one host synchronisation with an idle GPU, 35 us (component-costs 3.11: kernel launch +
              synchronize 34.6 us, median of 300, size-independent).

HQQ data movement (component-costs section 6, derived from hqq@37502bea): each HQQ linear call
dequantizes its 8-bit scale and zero with 3 elementwise kernels each before one Triton matmul, so an
expert moves about 5x its packed bytes through GPU memory per call (``hqq_traffic_factor``); 4-bit HQQ
attention likewise moves about 5x its packed bytes (on a profile without a 4-bit non-expert kernel, which times
it at 16 bits: 1.25x those bytes, 5 x 4/16). The Triton matmul works in tiles of 16 rows (component-costs 1.6),
so a prefill call of up to 16 tokens costs what a one-token call does (``hqq_tile_rows``).

A graph runtime (``llama-cpp``, ``ktransformers``; ``RuntimeCosts.graph_layers``) runs each decoder layer as a
few fused kernels launched back to back (llama.cpp) or replays the whole decode step as one captured CUDA graph
(KTransformers) rather than an eager PyTorch module: the profile's eager per-layer host costs (the non-expert
call's latency and the per-MoE-layer overhead, measured on HF eager) give way to its own launches. Both run a
layer's host experts as one op (``cpu_layer_op``): one dispatch and one copy of the activations each way per
layer, where the engine and Fiddler pay them per expert.

Terms fitted to published measurements (their values here; what each is, its points and bounds in
``moesim.reproduce.fit.REGISTRY``, which ``moesim reproduce`` refits and holds out source by source):
``weight_overhead_s`` (``accelerate``: the hook's fixed cost per offloaded weight matrix per forward),
``expert_fitted_s`` (``moe-infinity``: the dispatcher's cost per GPU expert call beyond its counted launches
and syncs), both in :data:`FITTED_UNIT_COSTS`, and ``layer_fitted_s`` (a per-MoE-layer cost, :data:`FITTED`;
none fitted). The rate of ggml-family int4 kernels on a host's CPU cores is fitted in the same registry and
lives with the host (``calib/hosts.py FITTED_CPU_INT4_RATE``).

Three implementation facts come with a runtime rather than a profile: its own 4-bit GPU kernels where PyTorch has
none (``gpu_quant_kernels``: llama.cpp's run on a Turing card, :func:`runtime_profile`), KTransformers' split of
each host expert over the sockets of a two-socket host (``numa_split``), and llama.cpp's op offload, which runs a
prefill step's host experts on the GPU (``prefill_op_offload_tokens``; placement.py ``cpu``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from moesim.errors import MoesimError
from moesim.fitted import FittedTable

LAUNCH_S = 5e-6
SYNC_S = 35e-6


@dataclass(frozen=True)
class RuntimeCosts:
    name: str = "none"
    expert_kernels: int = 0  # launches per GPU expert call exposed by a sync in the same loop
    expert_syncs: int = 0  # host synchronisations per GPU expert call
    hqq_expert_launches: int = 0  # extra launches per expert when the experts are HQQ-quantized
    cpu_expert_syncs: int = 0  # host synchronisations per CPU expert call
    layer_kernels: int = 0  # exposed launches per MoE layer (outside the experts)
    layer_syncs: int = 0  # host synchronisations per MoE layer
    hqq_attention_launches: int = 0  # extra launches per layer when attention is HQQ-quantized
    hqq_traffic_factor: float = 1.0  # bytes moved per packed byte by an HQQ expert call
    # the row tile (BLOCK_M) of the system's HQQ Triton matmul: a call of n tokens runs ceil(n / rows) tiles,
    # each streaming and dequantizing the weights as a one-token call does (a one-token input is padded to a
    # full tile), in place of the profile's kernel class; 0: the profile's class. Only for the released
    # system's run, and only for HQQ experts
    hqq_tile_rows: int = 0
    # the released build first creates the dense trunk on the GPU at this width and swaps in the final
    # (quantized) layers after; the freed 16-bit blocks stay reserved while the expert cache is allocated
    # (0: built at its final format; simulator.memory.build_transient_bytes)
    build_trunk_bits: int = 0
    # each decoder layer runs as fused kernels launched back to back (ggml-cuda), not as an eager PyTorch module:
    # the profile's per-layer host costs, measured on eager PyTorch (the non-expert call's latency and the
    # per-MoE-layer overhead), give way to layer_kernels launches; only for the released system's own run
    graph_layers: bool = False
    # a layer's host experts run as one op (ggml's MUL_MAT_ID; KTransformers' CPUInfer task): one dispatch and
    # one copy of the layer's activations each way per layer, not per expert; only for the released system's run
    cpu_layer_op: bool = False
    # the system's own quantized GPU kernels, where they run on cards PyTorch's 4-bit kernel does not (tinygemm
    # needs compute capability 8.0): a profile without an int4 class gets one for this runtime's run
    # (runtime_profile); empty: the profile's kernel classes as they are
    gpu_quant_kernels: str = ""
    # each host expert is split over every socket of the host, each computing its share from its own NUMA node's
    # copy of the weights (KTransformers' dual-socket mode): beyond its dispatch, a host expert takes one socket's
    # time over 1 + gain x (sockets - 1), the gain fitted (numa_split_gain); only for the released system's run
    numa_split: bool = False
    # a prefill step of at least this many tokens runs the host layers' experts on the GPU, their weights
    # uploaded for the step (llama.cpp's op offload; 0: never); only for the released system's run
    prefill_op_offload_tokens: int = 0
    where: str = ""  # code locations of the counts
    fitted: bool = True  # the fitted unit costs apply (the released code's run, not an engine's of the same preset)

    @property
    def op_offload_tokens(self) -> int:
        """The prefill step size from which host experts are uploaded and run on the GPU in this run (0: never;
        an engine's run of the preset, ``fitted`` False, never uploads)."""
        return self.prefill_op_offload_tokens if self.fitted else 0

    @property
    def layer_fitted_s(self) -> float:
        return FITTED.get(self.name, (0.0, ()))[0]

    @property
    def expert_fitted_s(self) -> float:
        """MoE-Infinity's fitted cost per GPU expert call beyond its counted launches and syncs (0 elsewhere)."""
        fitted = self.fitted and self.name == "moe-infinity"
        return FITTED_UNIT_COSTS["moe-infinity.expert_overhead_s"] if fitted else 0.0

    @property
    def numa_split_gain(self) -> float:
        """What each further socket adds to one socket's rate on a host expert split over the sockets (fitted;
        1 would be an ideal split)."""
        return FITTED_UNIT_COSTS["ktransformers.numa_split_gain"]

    @property
    def weight_overhead_s(self) -> float:
        """accelerate's hook cost per offloaded weight matrix per forward (fitted; 0 for other runtimes)."""
        fitted = self.fitted and self.name == "accelerate"
        return FITTED_UNIT_COSTS["accelerate.weight_overhead_s"] if fitted else 0.0


RUNTIMES: dict[str, RuntimeCosts] = {r.name: r for r in (
    RuntimeCosts("none"),
    RuntimeCosts(
        "mixtral-offloading", expert_kernels=8, expert_syncs=2, hqq_expert_launches=18, layer_syncs=1,
        hqq_attention_launches=24, hqq_traffic_factor=5.0, hqq_tile_rows=16, build_trunk_bits=16,
        where="dvmazur/mixtral-offloading ce54518 src/custom_layers.py:243-314 (per expert: 3 linears, SiLU, "
              "multiply, torch.where + index_add_, two .tolist() syncs; per layer: unique().tolist()); "
              "custom_layers.py:55-92 (per HQQ linear: 6 dequant kernels for scale and zero, then the Triton "
              "matmul; 4 HQQ attention projections per layer); src/triton_kernels.py:6-36, 194-224, 383-395 (one "
              "autotune config per kernel, BLOCK_M=16, grid cdiv(M, 16) x cdiv(N, 32), each program looping over "
              "all of K: component-costs 1.6); src/build_model.py build_model (the trunk is "
              "built on the GPU under with_default_dtype(torch.float16) with num_local_experts=0, then "
              "replace_attn_layers swaps in HQQ attention; ExpertCache allocates every main module and "
              "device buffer before the first torch.cuda.empty_cache(), inside the expert-loading loop)"),
    RuntimeCosts(
        "moe-infinity", expert_kernels=5, expert_syncs=2, layer_syncs=1,
        where="EfficientMoE/MoE-Infinity d617801 core/parallel/expert_dispatcher.cpp:37-69, 339, 385, 392 "
              "(cudaStreamSynchronize before and stream.synchronize after every expert; plain torch::matmul x3 "
              "+ silu + multiply); moe_infinity/models/mixtral.py:40-118 (dispatch_local, output gathered "
              "per layer)"),
    RuntimeCosts(
        "fiddler", expert_kernels=8, cpu_expert_syncs=1, layer_syncs=1,
        where="efeslab/fiddler 227715b src/fiddler/mixtral.py:565-637 (HF expert module per expert with "
              "torch.where/index_add_; current_state.to('cpu') per CPU expert is a synchronous copy; per layer "
              "the routing is read on the host)"),
    RuntimeCosts(
        "llama-cpp", layer_kernels=49, graph_layers=True, cpu_layer_op=True,
        gpu_quant_kernels="ggml-cuda mul_mat_vec_q (quantized dot products with dp4a, compute capability >= 6.1; "
                          "ggml/src/ggml-cuda/mmvq.cu)",
        prefill_op_offload_tokens=32,
        where="KTransformers SOSP'25 Fig. 4 (component-costs 4.2): llama.cpp issues about 3,000 CUDA launches per "
              "DeepSeek-V3 token, 49 per layer of its 61, averaging 5 us; each CPU layer's split synchronises "
              "(ggml_backend_sched copies its activations to the host), so the next split's launches are exposed; "
              "the host experts of a layer are one MUL_MAT_ID op per projection on the CPU backend, fed by one "
              "copy of the split's input (offloading-systems 7.5); op offload (on by default): an op whose weights "
              "are in host memory runs on the GPU, its weights uploaded, when the batch has at least "
              "GGML_OP_OFFLOAD_MIN_BATCH = 32 tokens (ggml/src/ggml-backend.cpp, ggml-cuda.cu; offloading-systems "
              "7.5), so a prefill ubatch streams every host layer's experts over the link"),
    RuntimeCosts(
        "ktransformers", graph_layers=True, cpu_layer_op=True, numa_split=True,
        where="kvcache-ai/ktransformers 95009ea (offloading-systems 7.4; SOSP'25 via component-costs 4.2): the decode "
              "step is one captured CUDA graph (its CPU experts joined to the stream by host functions), so no "
              "launch is exposed per layer; a layer's routed experts are one CPUInfer task on its own thread pool, "
              "its activations copied once each way; on two sockets it holds the experts once per NUMA node (the "
              "tutorial's dual-socket runs need 1 TB where one socket's need 382 GB) and splits each expert's rows "
              "between the sockets (SOSP'25: NUMA-aware tensor parallelism)"),
    RuntimeCosts(
        "accelerate",
        where="huggingface/accelerate v0.26 hooks.py:279-310 (AlignDevicesHook per module: one synchronous "
              "pageable .to(device) per parameter); modelled in the 'layer' transfer itself: each offloaded "
              "layer's copy pays a copy's fixed latency per expert weight matrix (simulator/run.py)"),
)}

# Fitted per-MoE-layer costs: runtime -> (seconds, catalogue point ids it was fitted on). Empty: nothing
# is fitted; ``moesim reproduce --fit`` prints the values that would be fitted.
FITTED: dict[str, tuple[float, tuple[str, ...]]] = {}

# Unit costs of modelled mechanisms that no source gives, fitted to published measurements. Each is declared
# in moesim.reproduce.fit.REGISTRY (what it is, the catalogue points it is fitted to, its bounds), which
# `moesim reproduce` refits and holds out source by source; the values here are what every simulation uses.
FITTED_UNIT_COSTS: dict[str, float] = FittedTable("FITTED_UNIT_COSTS", {
    # accelerate, per offloaded expert weight matrix per forward, beyond its copy (moesim/simulator/run.py
    # accelerate_layer_copy_s); fitted on study-baseline-tpot, mir-mixtral-acc, mir-dsl-acc
    "accelerate.weight_overhead_s": 8.223e-4,
    # MoE-Infinity, per GPU expert call, beyond its counted launches and syncs (RuntimeCosts.expert_fitted_s);
    # fitted on its ten TPOT/throughput points, in effect on the DeepSeek-V2-Lite 155 ms (reproduce/fit.py)
    "moe-infinity.expert_overhead_s": 3.990e-4,
    # KTransformers' dual-socket split, what the second socket adds to one socket's rate on a host expert (a
    # fraction; RuntimeCosts.numa_split_gain); fitted on its two-socket decode rates (reproduce/fit.py)
    "ktransformers.numa_split_gain": 0.6667,
})


def runtime_costs(name: str, fitted: bool = True) -> RuntimeCosts:
    """The runtime ``name``; ``fitted`` False leaves out its fitted unit costs (PolicySpec.released_code_costs)."""
    if name not in RUNTIMES:
        raise MoesimError(f"runtime '{name}': expected one of {', '.join(RUNTIMES)}")
    return RUNTIMES[name] if fitted else replace(RUNTIMES[name], fitted=False)


_RUNTIME_PROFILES: dict = {}


def runtime_profile(profile, runtime: RuntimeCosts):
    """``profile`` as the released system's run sees it: where the system brings its own 4-bit GPU kernels
    (``gpu_quant_kernels``) and the profile has no int4 class (a Turing card: PyTorch's tinygemm needs sm80),
    an int4 class that streams the packed bytes at the rate the profile's own classes stream theirs (experts
    at the int8 kernel's, the non-expert layer at its 16-bit one's; not measured). Unchanged otherwise, and for
    an engine's run of the preset (``fitted`` False), which runs PyTorch's kernels."""
    if not (runtime.gpu_quant_kernels and runtime.fitted) or "int4" in profile.expert_models \
            or "int8" not in profile.expert_models:
        return profile
    key = (id(profile), profile.name, runtime.name)
    if key not in _RUNTIME_PROFILES:
        from moesim.calib.profile import KERNEL_BITS, ExpertKernelModel

        base = profile.expert_models["int8"]
        library = f"{runtime.gpu_quant_kernels}; timed at the profile's int8 kernel's rates (not measured)"
        expert = {**profile.expert_models, "int4": ExpertKernelModel("int4", library, KERNEL_BITS["int4"], base.model)}
        non_expert = dict(profile.non_expert_models)
        if "int4" not in non_expert and "bf16" in non_expert:
            non_expert["int4"] = non_expert["bf16"]  # the layer's bytes are counted at the int4 kernel's bits
        device = dict(profile.non_expert_device_models)
        if device and "int4" not in device and "bf16" in device:
            device["int4"] = device["bf16"]
        derived = replace(profile, name=f"{profile.name}+{runtime.name}-kernels", expert_models=expert,
                          non_expert_models=non_expert, non_expert_device_models=device)
        # the entry keeps ``profile`` alive, so its id is not reused while the derived profile is remembered
        _RUNTIME_PROFILES[key] = (profile, derived)
    return _RUNTIME_PROFILES[key][1]


def apply_runtime(tables, runtime: RuntimeCosts, expert_hqq: bool, attention_hqq: bool):
    """Cost tables with the runtime's terms added (a new object; the memoised tables are not touched)."""
    if runtime.name == "none":
        return tables
    # a graph runtime (llama.cpp) pays its own launches per layer instead of the eager layer's host costs; an
    # engine's run of the same preset (fitted False) is eager: it keeps those costs and pays no graph launches
    graph = runtime.graph_layers and runtime.fitted
    layer_kernels = 0 if runtime.graph_layers and not graph else runtime.layer_kernels
    expert_s = runtime.expert_kernels * LAUNCH_S + runtime.expert_syncs * SYNC_S + runtime.expert_fitted_s
    layer_s = layer_kernels * LAUNCH_S + runtime.layer_syncs * SYNC_S + runtime.layer_fitted_s
    extra_ne = 0.0
    if expert_hqq:
        expert_s += runtime.hqq_expert_launches * LAUNCH_S
        # dequantize-then-matmul moves hqq_traffic_factor x the packed bytes; the profile's kernel already
        # charges them once, and its one-token call is bound by reading them
        expert_s += (runtime.hqq_traffic_factor - 1.0) * tables.gpu_expert[1]
    if attention_hqq:
        layer_s += runtime.hqq_attention_launches * LAUNCH_S
        one = tables.decode_non_expert.get(1)
        one = one[1] if one and len(one) > 1 else 0.0
        if tables.non_expert_kernel == "int4":
            # timed with the profile's 4-bit kernel, which streams the packed bytes once; HQQ's dequantize-then-
            # matmul moves hqq_traffic_factor x them: the difference on the call's streaming part (not its latency)
            extra_ne = (runtime.hqq_traffic_factor - 1.0) * max(0.0, one - tables.decode_non_expert_latency_s)
        else:
            # timed as bf16 (the profile has no 4-bit non-expert model); HQQ moves 5 x 4/16 = 1.25x that
            extra_ne = 0.25 * one
    cpu_s = runtime.cpu_expert_syncs * SYNC_S
    gpu = tables.gpu_expert
    if expert_hqq and runtime.hqq_tile_rows and runtime.fitted and len(gpu) > 1:
        # the Triton matmul's cost per row tile is the one-token call's: prefill tokens up to a tile are free
        rows, one = runtime.hqq_tile_rows, tables.gpu_expert[1]
        gpu = [-(-i // rows) * one if i else t for i, t in enumerate(gpu)]
    gpu = [t + expert_s if i else t for i, t in enumerate(gpu)]
    cpu = list(tables.cpu_expert)
    sockets = tables.host_sockets
    if runtime.numa_split and runtime.fitted and sockets > 1:
        lat = tables.cpu_expert_latency_s
        speedup = 1.0 + runtime.numa_split_gain * (sockets - 1)
        cpu = [lat + (t - lat) / speedup if i else t for i, t in enumerate(cpu)]
    cpu = [t + cpu_s if i else t for i, t in enumerate(cpu)]
    act = {}
    k = tables.top_k
    if runtime.cpu_layer_op and runtime.fitted and k > 1:
        # One op per layer, spread over the layer's expert calls: each pays 1/k of the dispatch and of the
        # activations' copies. At decode every layer routes k experts per token, so the layer pays exactly one
        # dispatch and one copy of its tokens each way; in prefill the tokens' bytes sum right (each token goes
        # to k experts) and the layer pays between 1 and E/k dispatches for its distinct experts.
        spare = tables.cpu_expert_latency_s * (1.0 - 1.0 / k)
        cpu = [max(t - spare, 0.0) if i else t for i, t in enumerate(cpu)]
        act = {name: [t / k for t in getattr(tables, name)]
               for name in ("act_d2h", "act_h2d", "act_d2h_conc", "act_h2d_conc")}
    drop_dec = tables.decode_non_expert_latency_s if graph else 0.0
    drop_pre = tables.prefill_non_expert_latency_s if graph else 0.0
    decode = {b: [max(0.0, v - drop_dec) + extra_ne for v in vals] for b, vals in tables.decode_non_expert.items()}
    prefill = {p: max(0.0, v - drop_pre) + extra_ne for p, v in tables.prefill_non_expert.items()}
    return replace(tables, gpu_expert=gpu, cpu_expert=cpu, decode_non_expert=decode, prefill_non_expert=prefill, **act,
                   prefill_offload_tokens=runtime.op_offload_tokens,
                   layer_overhead_s=(0.0 if graph else tables.layer_overhead_s) + layer_s,
                   prefill_non_expert_latency_s=tables.prefill_non_expert_latency_s - drop_pre,
                   decode_non_expert_latency_s=tables.decode_non_expert_latency_s - drop_dec)

