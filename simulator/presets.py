"""Named presets: each published system's policy composed from the parts (offloading-systems.md §10).

Quantization is not part of a preset: every preset runs at the trace's dtype unless ``--expert-bits`` /
``--non-expert-bits`` say otherwise, so presets compare like for like. Each preset's docstring says what
it models, what it leaves out, and whether it follows the released code or the paper.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from moesim.simulator.config import CacheSpec, PolicySpec
from moesim.simulator.gating import GatingSpec
from moesim.simulator.placement import PlacementSpec
from moesim.simulator.policies import Registry
from moesim.simulator.prefetch import PrefetchSpec
from moesim.simulator.prefetch_eam_all import EAMEveryLayerPrefetch  # noqa: F401  (registers eam-all)
from moesim.simulator.transfer import transfer_spec

PRESETS: Registry[Callable[[], PolicySpec]] = Registry("policy")
DEFAULT_SWEEP_POLICIES = ("lru", "mixtral-offloading", "moe-infinity", "fiddler", "adapmoe", "hybrimoe",
                          "predictive", "belady")


def _spec(name: str, cache: CacheSpec, prefetch: str = "none", placement: str = "gpu", transfer: str = "stream",
          gating: GatingSpec = GatingSpec(), memory_fraction: float = 1.0, all_resident: bool = False,
          memory_rule: str = "free", runtime: str = "none", placement_rule: str = "profile",
          **transfer_changes) -> PolicySpec:
    return PolicySpec(name=name, cache=cache, prefetch=PrefetchSpec(prefetch),
                      placement=PlacementSpec(placement, placement_rule),
                      transfer=transfer_spec(transfer, **transfer_changes), gating=gating,
                      memory_fraction=memory_fraction, all_resident=all_resident, memory_rule=memory_rule,
                      runtime=runtime)


@PRESETS.register("lru")
def lru() -> PolicySpec:
    """Per-layer LRU expert cache with demand loads on a separate copy stream (overlapping compute).

    The plain reference cache: no prefetch, no CPU compute. ``--scope global`` gives one LRU over all
    layers (BigMoeOnEdge's engine, with ``--cache-experts`` or ``--gpu-mem`` sizing the pool).
    """
    return _spec("lru", CacheSpec("lru"))


@PRESETS.register("lfu")
def lfu() -> PolicySpec:
    """Per-layer LFU with per-request visit counts kept across evictions (MoE-Infinity's rule, without its
    global pool), copy stream. ``--eviction lfu-forget`` is the textbook LFU that forgets on eviction."""
    return _spec("lfu", CacheSpec("lfu"))


@PRESETS.register("fifo")
def fifo() -> PolicySpec:
    """Per-layer FIFO cache, copy stream: the baseline a recency rule must beat."""
    return _spec("fifo", CacheSpec("fifo"))


@PRESETS.register("mixtral-offloading")
def mixtral_offloading() -> PolicySpec:
    """Mixtral-Offloading as released (dvmazur/mixtral-offloading ``ce54518``).

    Models: per-layer LRU of ``--cache-experts`` slots (``8 - offload_per_layer``), starting full with the
    highest-index experts (``expert_idx >= offload_per_layer`` start on the GPU); a miss is a *swap*
    (H2D of the needed expert plus D2H of the evicted one, the host keeping only ``offload_size`` pinned
    slots), both on the compute stream, so copies and expert GEMMs serialize; ``buffer_size=4`` device
    staging buffers; no prefetch; prefill streams the union of the prompt's experts through the same LRU.
    Runtime costs (``simulator/runtime.py``, ``mixtral-offloading``): the Python per-expert loop's launches
    and two host syncs per expert, one sync per layer, and for HQQ formats the dequantize-then-matmul
    traffic (5x the packed bytes) and HQQ attention's launches and traffic.
    Leaves out: the 3-deep loading window (with everything on one stream it does not change the time);
    quantization (the demo's HQQ 4-bit attention / 2-bit experts is ``--expert-bits int2-g16-m8
    --non-expert-bits int4-g64-m8``).
    """
    return _spec("mixtral-offloading", CacheSpec("lru", initial="last-experts"), transfer="swap", staging_experts=4,
                 runtime="mixtral-offloading")


@PRESETS.register("mixtral-offloading-paper")
def mixtral_offloading_paper() -> PolicySpec:
    """Mixtral-Offloading as the paper describes it (arXiv 2312.17238 §3), with speculative expert loading.

    Models: per-layer LRU (k slots), layer l+1's gate applied to layer l's hidden state guesses l+1's
    experts and every guessed non-resident expert is loaded into the LRU in the background on a copy
    stream while layer l computes (wrong guesses cost only bandwidth); 4 staging buffers.
    Leaves out: the released code's swap write-back (the paper's system keeps all experts on the host).
    The guess is the trace's ``next_layer_guess``; a trace without it gets the guess model (layer l+1's
    real experts kept with a stated per-slot accuracy, ``--guess``), and the result reports the prefetch
    precision and recall.
    """
    return _spec("mixtral-offloading-paper", CacheSpec("lru", initial="last-experts"), prefetch="next-layer",
                 staging_experts=4)


@PRESETS.register("moe-infinity")
def moe_infinity() -> PolicySpec:
    """MoE-Infinity as released (EfficientMoE/MoE-Infinity ``d617801``).

    Models: one global expert cache sized in bytes (``device_memory_ratio`` 0.9 of the GPU minus the
    dense weights when sized from memory; ``--knob device_memory_ratio=R``), evicting the expert with the fewest in-request visits
    (``incache_visit_count``: every dispatch counts, reset after prefill and after each request; ties in the
    dispatcher's scan order, lowest expert index then layer; ``simulator/cache.py``), a dedicated fetch stream
    (pinned host memory) where on-demand fetches go before queued prefetches; prefetch is disabled as in
    ``ArcherConfig.prefetch=False`` (``--prefetch eam`` enables the activation-matrix matching).
    Runtime costs (``moe-infinity``): two stream synchronisations and five launches per expert, one per layer,
    and a fitted 0.4 ms per expert call for the dispatcher's thread hand-offs (``simulator/runtime.py``).
    Leaves out: the SSD-to-host cold start, the 8 exec streams (experts of a layer run back to back here).
    """
    return _spec("moe-infinity", CacheSpec("lfu", scope="global", unit="bytes"), memory_fraction=0.9,
                 memory_rule="pool", demand_priority=True, runtime="moe-infinity")


@PRESETS.register("moe-infinity-2024")
def moe_infinity_2024() -> PolicySpec:
    """MoE-Infinity as released in 2024 (TorchMoE/MoE-Infinity, the code of the README table of 87eacf7,
    2024-04-09): the ``moe-infinity`` preset's cache and fetch stream, plus the per-layer prefetch that code
    ran and the 2025 rewrite (``d617801``, the ``moe-infinity`` preset) comments out.

    Models: at every MoE layer of every forward, prefill and decode, the EAM predictor's scores for the
    current and every later layer, every expert above zero (``+1e-8``), so every non-resident expert of
    layers ``l..L-1`` is enqueued best first (``prefetch=eam-all``, :mod:`moesim.simulator.prefetch_eam_all`
    cites the code). The one fetch thread serves queued demand fetches first but never interrupts the copy
    in flight, so a layer whose expert misses waits for the prefetch on the link, then for its own copy.
    The prefetcher issues one expert per layer call (``limit``). Three mechanics of the task queue and
    copy path, each read from the code and each a switchable part:
    copies serialise with compute (``transfer.default_stream``): ``GPUThreadFunc`` (``task_scheduler.cpp``
    @87eacf7) calls ``SetDevice(dst, on_demand)`` with no stream, and ``Node::SetDevice``
    (``core/model/model_topology.cpp`` @1f117f7) then runs a synchronous ``cudaMemcpy`` on the legacy
    default stream, which waits for the kernels issued before it and holds back those issued after;
    each layer call drops the queued prefetches not started yet (``prefetch.replaces_queue``):
    ``prefetch_experts`` (``memory/expert_prefetcher.py`` @1f117f7) calls ``replace_cache_candidates``,
    whose ``ReplaceCacheCandidates`` (``task_scheduler.h``) clears every prefetch priority queue;
    a prefetch may evict only experts of earlier layers (``prefetch.evicts_earlier_layers_only``): the
    candidates it sets are every expert of layers ``l..L-1`` and ``RemoveCachedSparseNode`` skips them.
    Effect on the MoE-Infinity points (predicted / published TPOT): the serial copies move the study's
    four from 0.72-0.88 to 0.92-0.98 and the 2024 README's from 1.19 to 1.31; earlier-layer eviction then
    gives 0.89-0.95 and 1.27; dropping the queue changes nothing at one prefetch per call (no prefetch is
    still queued at the next layer call: 0 drops in 3,264 calls at study mem 0.25).
    Leaves out: that ``RemoveCachedSparseNode`` also limits a *demand* fetch to earlier layers' experts
    (when none can go, the fetch overflows the cache; here a demand fetch evicts by the cache's rule) and
    evicts the most visited first (here the ``moe-infinity`` cache's fewest-visits rule); that the code
    evicts when a copy starts, where moesim evicts when it issues, which is why the limit stays at one
    (the code enqueues every candidate: limits 4 and 64 give the study 1.08-1.21 and the README 1.60-1.63,
    the evictions of never-copied prefetches); whether the expert dispatcher's exec streams are blocking
    (here all of a layer's compute waits for the copy in flight); the predictor's own GPU kernels and
    host sync per layer.
    Which version a published number ran is stated per point in ``reproduce/catalogue.csv``: the 2024-04
    README table ran this code; the design-space study (submitted to ACL ARR in May 2025) names no version,
    and is taken to have run this one (a judgement: the rewrite's README table dates from 2025-02-23).
    Checked on every MoE-Infinity point (predicted / published TPOT, ``moe-infinity`` then this preset
    without the three mechanics, then with them): study mem 0.95/0.75/0.50/0.25 0.49/0.54/0.55/0.62, then
    0.72/0.80/0.82/0.88, then 0.93/0.95/0.89/0.93; 2024-04 README 0.82, 1.19, 1.27; its batch-32
    throughput 0.68 then 0.64; the 2025 README and the paper v3 stay on ``moe-infinity`` (0.99, 0.87);
    DeepSeek-V2-Lite 0.53 either way. (All before the fitted per-expert cost; with it: study 0.95/0.97/0.90/
    0.94, 2024-04 README 1.29, batch 32 0.62, 2025 README and paper v3 1.02 and 0.89, DeepSeek-V2-Lite 0.99.)
    """
    base = moe_infinity()
    prefetch = PrefetchSpec("eam-all", limit=1, replaces_queue=True, evicts_earlier_layers_only=True)
    return base.with_parts(name="moe-infinity-2024", prefetch=prefetch,
                           transfer=replace(base.transfer, default_stream=True))


@PRESETS.register("fiddler")
def fiddler() -> PolicySpec:
    """Fiddler as released (efeslab/fiddler ``227715b``, ``src/fiddler/mixtral.py``).

    Models: a static placement of the most popular experts filling the GPU (0.95 of device memory
    minus what is allocated; popularity from the simulated trace, where Fiddler uses a profile of other
    data); per layer and per expert, a resident expert runs on the GPU, a non-resident one on the CPU
    when its tokens' CPU time is below one expert's copy time (the profile's real costs; ``--placement-rule
    code`` uses the released 7/70 constants), otherwise its weights are copied synchronously from pageable
    memory into one placeholder and never cached. Runtime costs (``fiddler``): per GPU expert the HF
    module's launches, per CPU expert a synchronous activation copy, per layer a host read of the routing.
    The CPU experts' rate is the host's kernel class (PyTorch 2.1 bf16: on AVX-512 without BF16, Fiddler's own
    7 ms per token per expert, ``calib/hosts.py``). Leaves out: the CPU and GPU work of one layer being
    issued from one Python loop, GPU experts first and then each CPU expert synchronously (here the CPU pool
    and the GPU run side by side); the per-layer Python loop over all 2^8 CPU/GPU assignments; beam search.
    """
    return _spec("fiddler", CacheSpec("static", scope="global", unit="bytes", initial="popular"),
                 placement="fiddler", placement_rule="code", transfer="sync", memory_fraction=0.95,
                 memory_rule="pool", runtime="fiddler")


@PRESETS.register("adapmoe")
def adapmoe() -> PolicySpec:
    """AdapMoE (PKU-SEC-Lab/AdapMoE ``2cfe8df``, ICCAD'24).

    Models: per-layer LRU whose sizes come from a DP splitting the total budget (``--cache-experts`` x
    layers) to minimise expected loads, here from per-layer LRU miss curves measured on the trace's decode
    (AdapMoE hard-codes profiled accuracies); caches start full; a separate copy stream (H2D only, all
    experts stay in pinned host memory); in decode, the first non-resident expert of layer l+1's guessed
    top-k is prefetched into a side buffer and enters the cache only if used; adaptive gating skips the
    second expert when its normalized weight is under sqrt(0.005/s_l); ``buffer_size=6``.
    Leaves out: per-linear (w1/w3/w2) copy events (an expert's GEMM waits for its whole copy).
    """
    return _spec("adapmoe", CacheSpec("lru", sizing="dp", initial="last-experts"), prefetch="first-non-resident",
                 gating=GatingSpec("adapmoe"), staging_experts=6, prefetch_buffer_experts=1)


@PRESETS.register("hybrimoe")
def hybrimoe() -> PolicySpec:
    """HybriMoE (PKU-SEC-Lab/HybriMoE ``508a85b``, DAC'25).

    Models: per-layer expert slots with MRS score eviction (alpha 0.5, top-p 12), all experts in pinned
    host memory, loads on a copy stream; in decode the HSS greedy split of each layer's experts between
    the GPU (resident first, non-resident after a copy) and the CPU (the tail), with the profile's costs
    (``--placement-rule code`` uses the released constants); prefill runs on the GPU. ``prefetch_size``
    defaults to 0 in the released code, so no prefetch. Leaves out: the GGUF CPU kernels (the profile's
    CPU expert kernel stands in).
    """
    return _spec("hybrimoe", CacheSpec("mrs"), placement="hybrimoe")


@PRESETS.register("predictive")
def predictive() -> PolicySpec:
    """Per-layer LRU plus a learned next-layer predictor (:mod:`moesim.simulator.predictor`): a logistic model
    over transition, recency and popularity features fitted on *other* traces, whose top-k guess for layer
    l+1 is loaded into the cache on the copy stream while layer l computes."""
    return _spec("predictive", CacheSpec("lru"), prefetch="predictive")


@PRESETS.register("static")
def static() -> PolicySpec:
    """Static per-layer placement of each layer's most popular experts; misses stream through a staging
    buffer on the copy stream and are not kept (what a fixed hot list achieves)."""
    return _spec("static", CacheSpec("static", initial="popular"), staging_experts=2)


@PRESETS.register("belady")
def belady() -> PolicySpec:
    """Per-layer Belady's MIN (with bypass), demand loads on a copy stream: the optimal eviction bound
    for these cache sizes. An oracle: it reads the future of the trace."""
    return _spec("belady", CacheSpec("belady"), staging_experts=2)


@PRESETS.register("all-gpu")
def all_gpu() -> PolicySpec:
    """No offloading: every expert resident. Reported as not fitting when the model does not fit."""
    return _spec("all-gpu", CacheSpec("static", initial="all"), all_resident=True)


@PRESETS.register("accelerate")
def accelerate() -> PolicySpec:
    """HF accelerate's naive offload (``device_map="auto"``): whole layers fill the GPU in order, and every
    other layer's experts (all of them, routed or not) are copied synchronously from pageable host memory
    at every forward pass, one synchronous copy per weight matrix (each pays the copy latency). Leaves out: offloaded layers' attention weights (kept on the GPU here)."""
    return _spec("accelerate", CacheSpec("static", initial="first-layers"), transfer="layer", runtime="accelerate")


@PRESETS.register("llama-cpp")
def llama_cpp() -> PolicySpec:
    """llama.cpp with ``--n-cpu-moe N`` (``--cpu-moe``: every layer; ggml-org/llama.cpp PR #15077).

    Models: a layer's routed experts are one merged tensor per projection, so placement is per layer: the
    experts of the first N MoE layers stay in host memory and run on the CPU (``MUL_MAT_ID`` on the CPU
    backend), the others live on the GPU; nothing is cached or copied per expert. ``--knob n_cpu_moe=N`` states
    N; a cache size (or the memory sizing) fills the GPU with whole layers from the last one back. A CPU layer
    sends its activations to the host and the outputs back (the CPU experts' chain of the Fiddler placement).
    Op offload: a prefill step of at least ``GGML_OP_OFFLOAD_MIN_BATCH`` = 32 tokens runs the host layers'
    experts on the GPU, each uploaded for the step (pinned copies on the compute stream, ahead of the layer's
    compute, as ggml's scheduler copies a split's inputs), the device holding one layer's experts for it.
    Leaves out: the upload of experts no token routed to (the merged tensor goes whole; at a ubatch of
    hundreds of tokens nearly every expert is routed), whether the host weights are pinned (mmap'd weights
    are pageable; not stated by the published runs); ggml's own kernel rates (the profile's kernels stand in;
    where a card has no 4-bit class because PyTorch's needs sm80, as on Turing, ggml's quantized kernels are
    timed at the profile's int8 and 16-bit classes' rates on their 4-bit bytes:
    ``RuntimeCosts.gpu_quant_kernels``); NUMA placement on a two-socket host (one socket's rate, no
    cross-socket cost). Runtime (``llama-cpp``): a layer is a few fused kernels, not an eager PyTorch module,
    so the profile's eager per-layer costs give way to llama.cpp's launches (simulator/runtime.py).
    """
    return _spec("llama-cpp", CacheSpec("static", initial="last-layers"), placement="cpu", runtime="llama-cpp",
                 transfer="sync", pinned=True, staging_experts=0)


@PRESETS.register("ktransformers")
def ktransformers() -> PolicySpec:
    """KTransformers (kvcache-ai/ktransformers V0.2, offloading-systems 7.4): attention, shared experts and the KV
    cache on the GPU, routed experts on the host CPU, placed per layer by its YAML optimize rules.

    Models: the placement of ``llama-cpp`` (a layer's routed experts live on the CPU or the GPU as a whole, none
    is cached or copied); ``--knob n_cpu_moe=N`` puts the first N MoE layers' experts on the CPU (the shipped
    DeepSeek-V3 rules put every layer's there: N at least the layer count). Runtime (``ktransformers``): the decode
    step replays one captured CUDA graph, so no launch is exposed per layer, and a layer's routed experts are one
    CPUInfer task (one dispatch, one copy of the activations each way); on a two-socket host each routed expert
    is split between the sockets, each computing from its own NUMA node's copy (``numa_split``: one socket's time
    beyond the dispatch over 1 + the fitted gain of the second socket, 0.67, which holds what the sockets lose
    meeting at every expert). Leaves out: its own CPU kernels (llamafile / AMX; the profile's CPU int4 class
    stands in, at the streaming and computing rates fitted for server sockets in calib/hosts.py) and the Marlin
    GPU kernels (the profile's 4-bit kernels stand in).
    """
    return _spec("ktransformers", CacheSpec("static", initial="last-layers"), placement="cpu",
                 runtime="ktransformers")


def get_preset(name: str) -> PolicySpec:
    return PRESETS.get(name, "--policy")()
