"""Machines as three stated parts: a GPU (``calib.specs.GPUS``), a host CPU and the link between them.

A spec profile used to carry one assumed host per GPU and CPU/link factors borrowed from whatever machine
was measured (an AMX Xeon's CPU expert rate, an H100 box's PCIe efficiencies). A published measurement
names its own host, so here the host is stated on its own and its CPU side is derived from that host's
cores, instruction set and memory channels, and the link's efficiency from measurements on the same PCIe
generation. ``compose_profile("a6000", "xeon-gold-6126-x2", "pcie3")`` builds the profile;
``moesim simulate --host NAME [--link pcie3]`` does the same from the command line.

The CPU expert at decode batch sizes is bound by memory bandwidth, so its time is the expert's bytes over
(socket bandwidth x ``CPU_MEMORY_EFFICIENCY``) times the kernel class's factor for the instruction set
(``CPU_BF16_KERNEL_FACTOR``): PyTorch's bf16 matmul on x86 without native bf16 instructions up-converts
to fp32, and on AVX-512 that path grows linearly with the tokens from a few tokens on
(``CPU_BF16_AVX512_PER_CORE_FLOPS``, Fiddler's own per-token cost). Before PyTorch 2.6 AVX2-only machines
had no bf16 GEMV path at all: there the expert is bound by the fallback's own rate (``CPU_BF16_AVX2_FLOPS``),
not by the socket. The CPU-expert systems pin PyTorch 2.1 (Fiddler), so these are the kernel classes their
CPU experts run.

A host states the newest PCIe generation its CPU runs, and a link trains at the older of the card's and the
host's (Fiddler's Env2 runs its PCIe 4.0 L4 in a PCIe 3.0 Cascade Lake server).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

from moesim.errors import MoesimError
from moesim.fitted import FittedTable
from moesim.calib.specs import GB, GIB, GPUS, Efficiency, GpuSpec, HostSpec, build_spec_profile

ISAS = ("avx2", "avx512", "avx512_bf16", "amx")


@dataclass(frozen=True)
class HostCpu:
    name: str
    cpu_name: str
    description: str
    cores: int  # cores of the socket the process runs on
    isa: str  # widest vector/matrix extension PyTorch's bf16 matmul can use
    memory_bandwidth: float  # bytes/s peak of one socket's channels
    memory_bytes: int
    source: str
    # newest PCIe generation the CPU's root ports run: a faster card trains down to it (5: no limit known)
    pcie_gen: int = 5
    # sockets (NUMA nodes) of the machine; ``cores`` and ``memory_bandwidth`` are one socket's. Only a runtime
    # that splits each host expert over the sockets (simulator/runtime.py numa_split) uses more than one
    sockets: int = 1
    # the kind of socket ("server", or "" for none): its key in FITTED_CPU_INT4_RATE and
    # FITTED_CPU_INT4_COMPUTE_RATE, the fitted factors on the CPU int4 class's rates for such sockets' cores
    socket_class: str = ""

    def __post_init__(self):
        if self.isa not in ISAS:
            raise MoesimError(f"host {self.name}: isa '{self.isa}', expected one of {', '.join(ISAS)}")

    def as_host_spec(self) -> HostSpec:
        return HostSpec(self.description, self.cpu_name, self.cores, self.memory_bytes, self.memory_bandwidth,
                        self.source)


HOSTS: dict[str, HostCpu] = {h.name: h for h in (
    HostCpu("xeon-gold-6126-x2", "Intel Xeon Gold 6126 (2 sockets)",
            "Fiddler Env1 host: 2 x Xeon Gold 6126 (Skylake-SP, 12 cores each), 6 x DDR4-2666 per socket", 12,
            "avx512", 6 * 21.33 * GB, 192 * GIB,
            "Intel ARK Xeon Gold 6126: 12 cores, AVX-512, 6 channels DDR4-2666 (6 x 21.33 GB/s); Fiddler "
            "README (48-core Skylake) and ICLR'25 text (2 x Xeon Gold 6126); Intel ARK: PCI Express Revision 3.0",
            pcie_gen=3, sockets=2, socket_class="server"),
    HostCpu("cascade-lake-32c", "Intel Xeon Cascade Lake (32 cores)",
            "Fiddler Env2 host: 32-core Intel Cascade Lake, 6 x DDR4-2933", 32, "avx512", 6 * 23.47 * GB, 128 * GIB,
            "Fiddler README (L4 + 32-core Cascade Lake); Intel ARK 2nd-gen Xeon Scalable: AVX-512 (VNNI, no "
            "BF16), 6 channels DDR4-2933 per socket, PCI Express Revision 3.0 (48 lanes)", pcie_gen=3,
            socket_class="server"),
    HostCpu("xeon-gold-5220r-10c", "Intel Xeon Gold 5220R (10 cores used)",
            "HybriMoE host: Xeon Gold 5220R restricted to 10 cores", 10, "avx512", 6 * 23.47 * GB, 256 * GIB,
            "arXiv 2504.05897 VI; Intel ARK Xeon Gold 5220R: AVX-512, 6 channels DDR4-2933, PCI Express "
            "Revision 3.0", pcie_gen=3, socket_class="server"),
    HostCpu("threadripper-pro-5965wx", "AMD Ryzen Threadripper PRO 5965WX",
            "typical workstation: 24-core Zen 3 (AVX2, no AVX-512), 8 x DDR4-3200", 24, "avx2", 8 * 25.6 * GB,
            256 * GIB, "AMD product page: 24 cores, 8 channels DDR4-3200, PCIe 4.0; Zen 3 has AVX2 and no AVX-512",
            pcie_gen=4),
    HostCpu("xeon-gold-6454s", "Intel Xeon Gold 6454S", "KTransformers' single-socket runs: one Xeon Gold 6454S "
            "(Sapphire Rapids, 32 cores), 8 x DDR5-4800", 32, "amx", 8 * 38.4 * GB, 382 * GIB,
            "kvcache-ai/ktransformers 95009ea doc/en/DeepseekR1_V3_tutorial.md (Xeon Gold 6454S, 32 cores per socket, "
            "DDR5-4800 8 channels per socket; single-socket runs use 382 GB); 4th-gen Xeon Scalable: AMX, PCI "
            "Express 5.0; DDR5-4800: 4800 MT/s x 8 B = 38.4 GB/s per channel", pcie_gen=5,
            socket_class="server"),
    HostCpu("xeon-gold-6454s-x2", "Intel Xeon Gold 6454S (2 sockets)", "KTransformers' dual-socket host: 2 x Xeon "
            "Gold 6454S (2 NUMA nodes), 8 x DDR5-4800 per socket, 1 TB", 32, "amx", 8 * 38.4 * GB, 1024 * GIB,
            "kvcache-ai/ktransformers 95009ea doc/en/DeepseekR1_V3_tutorial.md; cores and bandwidth are one "
            "socket's", pcie_gen=5, sockets=2, socket_class="server"),
    HostCpu("xeon-platinum-8352y", "Intel Xeon Platinum 8352Y", "a KTransformers user's host (issue #319): one "
            "Xeon Platinum 8352Y (Ice Lake-SP, 32 cores), 8 x DDR4-3200 assumed (memory not stated)", 32, "avx512",
            8 * 25.6 * GB, 512 * GIB, "Intel ARK Xeon Platinum 8352Y: 32 cores, AVX-512, 8 channels DDR4-3200, "
            "PCI Express 4.0; the report gives cpu_infer 65 and no socket count: one socket assumed",
            pcie_gen=4, socket_class="server"),
    HostCpu("epyc-7c13-4ch", "AMD EPYC 7C13 (4 channels populated)", "a KTransformers user's host (issue #319): 2 x "
            "EPYC 7C13 with 8 x 64 GB DDR4-2933, i.e. 4 channels per socket; 56 cores used", 56, "avx2",
            4 * 23.47 * GB, 512 * GIB, "AMD EPYC 7C13 (Zen 3, 64 cores, AVX2, no AVX-512, 8 channels DDR4-3200, "
            "PCIe 4.0); the report's 8 DIMMs over two sockets populate 4 channels each, at 2933 MT/s; "
            "KTransformers without its NUMA build reads one node's memory: one socket's channels",
            pcie_gen=4, socket_class="server"),
    HostCpu("epyc-9654", "AMD EPYC 9654", "a KTransformers user's host (issue #477): one EPYC 9654 (Zen 4, 96 "
            "cores), 12 x DDR5-4800 assumed (memory not stated)", 96, "avx512_bf16", 12 * 38.4 * GB, 768 * GIB,
            "AMD EPYC 9654: 96 cores, Zen 4 (AVX-512 with BF16), 12 channels DDR5-4800, PCIe 5.0",
            pcie_gen=5, socket_class="server"),
    HostCpu("i9-10900x", "Intel Core i9-10900X", "llmfit PR #755 host: 10 cores, quad-channel DDR4", 10, "avx512",
            102 * GB, 128 * GIB, "AlexsJones/llmfit PR #755 (~102 GB/s measured quad-channel DDR4); Intel ARK "
            "Core i9-10900X (Cascade Lake-X): PCI Express Revision 3.0", pcie_gen=3),
)}

# The host a study left unstated: the GPU spec's own typical host, and the result says it was assumed.
UNSTATED = "unstated"

# Instruction set of the spec profiles' typical hosts (calib.specs), by cpu_name.
TYPICAL_HOST_ISA = {
    "8-core desktop CPU (DDR4-3200 x2)": ("avx2", "assumed: current desktop cores (Intel 12th gen and later, AMD "
                                                  "Zen 2/3) have AVX2 and no AVX-512"),
    "8-core mobile CPU (DDR4-3200 x2)": ("avx2", "assumed: mobile Intel/AMD cores of the RTX 30 laptop era have "
                                                 "AVX2 and no AVX-512"),
    "AMD Ryzen 9 7950X": ("avx512_bf16", "AMD Zen 4 supports AVX-512 including AVX512_BF16 (AMD product page)"),
    "AMD Ryzen Threadripper PRO 5965WX": ("avx2", "Zen 3: AVX2, no AVX-512"),
    "Intel Xeon Platinum 8259CL (8 vCPU)": ("avx512", "Cascade Lake: AVX-512 and VNNI, no BF16 (Intel ARK)"),
    "Intel Xeon Cascade Lake (16 vCPU)": ("avx512", "Cascade Lake: AVX-512 and VNNI, no BF16 (Intel ARK)"),
    "AMD EPYC 7742": ("avx2", "Zen 2: AVX2, no AVX-512"),
    "Intel Xeon Platinum 8480C": ("amx", "Sapphire Rapids: AMX-BF16 (Intel ARK)"),
}

# The spec profiles' typical hosts that are server sockets (their CPU int4 class takes the "server" rates of
# FITTED_CPU_INT4_RATE and FITTED_CPU_INT4_COMPUTE_RATE, as the named server hosts above do); a cloud instance's
# vCPUs are a slice of one.
TYPICAL_HOST_SERVER = {"AMD EPYC 7742", "Intel Xeon Platinum 8480C", "Intel Xeon Platinum 8259CL (8 vCPU)",
                       "Intel Xeon Cascade Lake (16 vCPU)"}

# Newest PCIe generation of the spec profiles' typical hosts, where it limits the card (Intel ARK: 2nd-gen Xeon
# Scalable (Cascade Lake) root ports run PCI Express 3.0); a host not listed does not limit its card.
TYPICAL_HOST_PCIE = {
    "Intel Xeon Platinum 8259CL (8 vCPU)": (3, "Intel ARK 2nd Gen Xeon Scalable (Cascade Lake): PCI Express 3.0"),
    "Intel Xeon Cascade Lake (16 vCPU)": (3, "Intel ARK 2nd Gen Xeon Scalable (Cascade Lake): PCI Express 3.0"),
}

# Fraction of a socket's memory-channel peak that a batch-1 bf16 expert GEMV reaches with PyTorch on the CPU.
CPU_MEMORY_EFFICIENCY = Efficiency(
    0.88, "llama.cpp Mixtral fp16 on a Xeon E5-2683 v4 (quad-channel DDR4-2133): 2.32 tok/s = about 60 GB/s of "
          "68 GB/s peak (component-costs.md 2.9 and 6); a memory-bound GEMV streams the weights once")
# The same for ggml's quantized mat-vec (the CPU int4 kernel of spec profiles, calib.specs.SPEC_CPU_INT4), which
# dequantizes in registers whatever the instruction set: a second llama.cpp measurement, on quantized weights.
CPU_QUANT_MEMORY_EFFICIENCY = Efficiency(
    0.85, "llama.cpp Mixtral Q8_0 on a Ryzen 9 5900X with dual-channel DDR4-3600 (57.6 GB/s): 3.58 tok/s x about "
          "12.9 B active weights x 8.5 bits = 49 GB/s (llama.cpp issue #4716; component-costs.md 2.10)")
# The fraction of the CPU int4 class's streaming rate above that ggml-family int4 kernels reach on a class of host,
# where published runs say it is below it; fitted by ``moesim reproduce`` (reproduce/fit.py lists the points), 1.0
# where nothing is fitted. "server": the Xeon Scalable and EPYC sockets here.
# KTransformers V0.2's decode on one Xeon Gold 6454S socket (115 ms per DeepSeek-V3 token) leaves about 100 ms for
# 11.5 GB of Q4_K experts, about 0.4 of the socket's 307 GB/s channel peak, where the class assumes 0.85 (llama.cpp
# on a desktop's two channels). The socket itself streams more: 220 GB/s measured within one socket of a Xeon
# Platinum 8452Y with the same 8 x DDR5-4800 (KTransformers SOSP'25 section 6; component-costs 2.7), 0.72 of the
# peak. Users' KTransformers reports on an Ice Lake Xeon and on EPYC Milan and Genoa sockets share the fit (the
# catalogue's ktransformers-issues rows).
FITTED_CPU_INT4_RATE: dict[str, float] = FittedTable("FITTED_CPU_INT4_RATE", {"server": 0.4649})
# ggml's quantized dot products: int8 multiply-adds on the vector units, about one instruction's lanes x 2 flop
# per cycle at about 2 GHz (stated, not measured); a batch-1 expert stays bandwidth-bound, so only prefill sees it
CPU_QUANT_LANES = {"avx2": 32, "avx512": 64, "avx512_bf16": 64, "amx": 64}
# The fraction of that computing rate the same kernels reach on a class of host, fitted as the streaming rate is
# (1.0 where nothing is fitted). Only a prefill step puts enough tokens on one host expert to be bound by it, and
# the only prefill rates of CPU-expert runs with a stated machine are KTransformers V0.2's on its Xeon Gold 6454S
# host (one source, five runs; reproduce/fit.py). No source says why the fit is a quarter of the stated rate:
# ggml's x86 K-quant dot products are 256-bit AVX2 code even on AVX-512 cores (ggml-cpu/arch/x86/quants.c), while
# llamafile's iqk_mul_mat, which KTransformers builds, has AVX-512 paths; each block of columns dequantizes again.
FITTED_CPU_INT4_COMPUTE_RATE: dict[str, float] = FittedTable("FITTED_CPU_INT4_COMPUTE_RATE",
                                                             {"server": 0.2864})
# Slowdown of PyTorch's bf16 matmul by instruction set, relative to a native bf16 GEMV (sources per entry).
CPU_BF16_KERNEL_FACTOR: dict[str, Efficiency] = {
    "avx2": Efficiency(1.0, "bound by the fallback's rate, not by bandwidth: CPU_BF16_AVX2_FLOPS"),
    "avx512": Efficiency(2.0, "pytorch/torchchat#1253: on x86 without hardware bf16, MKL up-converts bf16 to fp32 "
                              "and calls SGEMM, so bf16 decode is no faster than fp32 (twice the bytes of bf16); "
                              "component-costs 2.11"),
    "avx512_bf16": Efficiency(1.0, "native AVX512_BF16 dot products (PyTorch PR #139220: no change on such a CPU)"),
    "amx": Efficiency(1.0, "native AMX bf16 tiles"),
}

# PyTorch <= 2.5 on an AVX2-only x86 CPU (no AVX-512, so no oneDNN bf16 matmul either) had no bf16 GEMV:
# a bf16 linear fell back to a serial loop that converts each weight to fp32, so it is bound by that loop,
# not by the memory channels, gains nothing from more threads or channels, and grows linearly with the
# tokens. ``benchmarks/cpu_expert_kernel.py`` shows all three for torch 2.1.2 (what Fiddler pins) on an AVX2
# EPYC core: one Mixtral expert takes 112-115 ms of CPU time at 1 token (3.1 GFLOP/s) and 4.1x that at 4,
# all of it on the calling thread with 2 threads allowed, where torch 2.13 takes 38 ms and splits it over
# both. That core was a shared 2-core VM under load 13, so the rate comes from a quieter machine:
CPU_BF16_AVX2_FLOPS = Efficiency(
    5.2e9, "PyTorch PR #139220 (swolchok, 2024-10-29): torchchat llama3.2-1b bf16 decode 'from ~2.1 tok/sec' "
           "before the bf16 GEMV on an x86 machine with only AVX2: 1.24e9 weights x 2 flop x 2.1 tok/s = 5.2 "
           "GFLOP/s (component-costs 2.12); benchmarks/cpu_expert_kernel.py measured 3.1 GFLOP/s for torch "
           "2.1.2 on a loaded EPYC VM core, serial and linear in tokens")

# PyTorch <= 2.5's bf16 linear on AVX-512 without BF16 goes through oneDNN's avx512_core path, which
# up-converts to fp32: at a few tokens it is bound by that conversion and arithmetic, not by the channels,
# so it grows linearly with the tokens. Fiddler's authors, who run exactly this kernel (torch 2.1.2, bf16 HF
# expert on their Env1 Xeon Gold 6126), model it as 7 ms per token per Mixtral expert:
CPU_BF16_AVX512_PER_CORE_FLOPS = Efficiency(
    2 * 176_160_768 / 7e-3 / 12,
    "efeslab/fiddler 227715b src/fiddler/mixtral.py: latency_cpu = 7 (ms), CPU cost = tokens x latency_cpu "
    "(component-costs 2.1; ICLR'25 §3: CPU latency linear in tokens, 2.6); 2 x 176.16 M flop / 7 ms over the "
    "12 cores of one Xeon Gold 6126 socket = 4.19 GFLOP/s per core. ASSUMED: the constant was taken on "
    "Env1 (the code does not say; cppExpert 91ebb37 keeps the same 7 ms for one token)")

# Host-to-device copy efficiency by PCIe generation (fraction of the x16 payload rate), with sources.
LINK_PINNED: dict[int, Efficiency] = {
    3: Efficiency(0.77, "bandwidthTest pinned 32 MiB, P100 on PCIe Gen3, NUMA-local: 12.15 GB/s of 15.75 "
                        "(gearshifft PR #82; component-costs 3.7)"),
    4: Efficiency(0.83, "PCIe 4.0 x16 H2D pinned 26.2 GB/s of 31.5 (Threadripper 5975WX + RTX 3090/A6000; "
                        "component-costs 3.8); nvbandwidth 23.9-26.4 GB/s on RTX 4090 (3.2)"),
    5: Efficiency(0.56, "H100 H2D SM copy 35.0-35.4 GB/s of 63.0 (nvbandwidth issue #24; component-costs 3.4); "
                        "used only without a measured Gen5 profile"),
}
MEASURED_LINK_GEN = 5  # the PCIe generation of the measured GPU profile (h100-measured)
LINK_PAGEABLE_OVER_PINNED = Efficiency(
    0.55, "PCIe 4.0 x16 H2D pageable 14.4 GB/s vs pinned 26.2 GB/s (component-costs 3.8); applied to every "
          "generation (no per-generation pageable figure was found)")
# A swap on the compute stream (Mixtral-Offloading) copies at the pinned rate: 26.15 GB/s with the compute
# stream saturated vs 26.2 alone on PCIe 4.0 (component-costs 3.8), so it needs no factor of its own.
LINK_BIDIRECTIONAL = Efficiency(
    0.73, "nvbandwidth README: H2D 18.4-19.6 GB/s while D2H runs vs 25.9-26.2 GB/s alone (component-costs 3.1)")
COPY_LATENCY_PINNED_S = (6e-6, "cudaMemcpyAsync submission about 5-7 us (DualPath arXiv 2602.21548 5.2; "
                               "component-costs 3.10)")
COPY_LATENCY_PAGEABLE_S = (45e-6, "a synchronous copy: single 8 KiB D2H + synchronize 45.4 us, size-independent "
                                  "to 1 MiB (kekzl/imp PR #1357; component-costs 3.11)")

LINKS = {"pcie3": 3, "pcie4": 4, "pcie5": 5}

TURING_NOTES = "Turing: no bf16 (the 16-bit kernel runs fp16), no int4 tinygemm kernel."
EXTRA_GPUS: tuple[GpuSpec, ...] = (
    GpuSpec(
        "quadro-rtx-6000", "Quadro RTX 6000", 24 * GIB, 672 * GB, 130.5e12, 261e12, "7.5", 3, 16,
        HOSTS["xeon-gold-6126-x2"].as_host_spec(),
        sources={
            "memory": "NVIDIA Quadro RTX 6000 datasheet (24 GB GDDR6, 672 GB/s; https://www.nvidia.com/content/dam/"
                      "en-zz/Solutions/design-visualization/quadro-product-literature/quadro-rtx-6000-us-nvidia-"
                      "704093-r4-web.pdf)",
            "memory_bandwidth": "NVIDIA Quadro RTX 6000 datasheet: 672 GB/s",
            "flops": "NVIDIA Quadro RTX 6000 datasheet: 130.5 TFLOPS tensor (fp16; Turing has no bf16), INT8 261 TOPS",
            "pcie": "NVIDIA Quadro RTX 6000 datasheet: PCI Express 3.0 x16",
        },
        notes=TURING_NOTES,
    ),
    GpuSpec(
        "rtx-2080", "NVIDIA GeForce RTX 2080", 8 * GIB, 448 * GB, 40.3e12, 161.1e12, "7.5", 3, 16,
        HOSTS["i9-10900x"].as_host_spec(),
        sources={
            "memory": "GeForce RTX 2080: 8 GB GDDR6 at 14 Gbps on a 256-bit bus (NVIDIA Turing whitepaper)",
            "memory_bandwidth": "14 Gbps x 256 bit / 8 = 448 GB/s",
            "flops": "Turing whitepaper rates: 368 tensor cores x 64 FMA x 2 flop x 1.71 GHz boost = 80.5 TFLOPS FP16 "
                     "with FP16 accumulate, half that with FP32 accumulate on GeForce (40.3; the 2080 Ti's 56.9 by "
                     "the same rule, as nlzy/turing-unlock quotes the whitepaper); INT8 4x the FP32-accumulate rate "
                     "(measured 238.6 vs 59.9 on a 2080 Ti, KohakuBlueleaf/KohakUnlock RESULTS.md)",
            "pcie": "GeForce RTX 2080: PCI Express 3.0 x16",
        },
        notes=TURING_NOTES,
    ),
    GpuSpec(
        "rtx-4090d", "NVIDIA GeForce RTX 4090 D", 24 * GIB, 1008 * GB, 147.09e12, 588.35e12, "8.9", 4, 16,
        HOSTS["xeon-gold-6454s-x2"].as_host_spec(),
        sources={
            "memory": "GeForce RTX 4090 D: 24 GB GDDR6X, 384-bit, 21 Gbps, 1008 GB/s (114 SMs, 14592 CUDA cores; "
                      "hmc-tech.com/gpu/nvidia-geforce-rtx-4090-d)",
            "memory_bandwidth": "1008 GB/s (21 Gbps x 384 bit / 8)",
            "flops": "BF16 tensor 147.09 TFLOPS with FP32 accumulate (dense), INT8 tensor 588.35 TOPS (dense) "
                     "(hmc-tech.com/gpu/nvidia-geforce-rtx-4090-d): the RTX 4090's 165.2 x 114/128 SMs",
            "pcie": "PCIe 4.0 x16, as the RTX 4090 (AD102)",
        },
    ),
    GpuSpec(
        "rtx-5090", "NVIDIA GeForce RTX 5090", 32 * GIB, 1792 * GB, 209.6e12, 838.4e12, "12.0", 5, 16,
        HostSpec("typical desktop: 16-core CPU, dual-channel DDR5-5600, 128 GB", "16-core desktop CPU (DDR5-5600 x2)",
                 16, 128 * GIB, 2 * 44.8 * GB, "JEDEC DDR5-5600: 5600 MT/s x 8 B = 44.8 GB/s per channel; 2 channels "
                 "on desktop platforms; ASSUMED: no host was stated with this card"),
        sources={
            "memory": "GeForce RTX 5090: 32 GB GDDR7, 512-bit, 28 Gbps, 1792 GB/s (Linux Format May 2025 review specs; "
                      "spheron.network RTX 5090 datasheet)",
            "memory_bandwidth": "1792 GB/s (28 Gbps x 512 bit / 8)",
            "flops": "FP16 tensor 838.4 TFLOPS sparse with FP16 accumulate (spheron.network datasheet): 419.2 dense, "
                     "209.6 with FP32 accumulate (half rate on GeForce, as the Ada whitepaper's 4090: 660.6 sparse to "
                     "165.2); FP8/INT8 1676.8 sparse, 838.4 dense",
            "pcie": "GeForce RTX 5090: PCI Express 5.0 x16",
        },
        notes="Blackwell consumer (sm_120); the int4 tinygemm kernel is assumed to run as on sm_80+.",
    ),
)


def gpu_spec(name: str) -> GpuSpec:
    for g in GPUS + EXTRA_GPUS:
        if g.name == name:
            return g
    raise MoesimError(f"GPU '{name}': expected one of {', '.join(g.name for g in GPUS + EXTRA_GPUS)}")


def host_cpu(name: str) -> HostCpu:
    if name not in HOSTS:
        raise MoesimError(f"host '{name}': expected one of {', '.join(HOSTS)} (or '{UNSTATED}')")
    return HOSTS[name]


@lru_cache(maxsize=1)
def _base_factors():
    """The spec profiles' GPU-side factors (measured on the H100 box where measured, else stated)."""
    from moesim.calib.profile import load_profile
    from moesim.calib.specs import efficiencies_from_profiles

    return efficiencies_from_profiles(load_profile("h100-measured"), load_profile("cpu-calibrated"))


def host_of_spec(spec: GpuSpec) -> HostCpu:
    """The GPU spec's own typical host as a :class:`HostCpu` (its ISA from :data:`TYPICAL_HOST_ISA`)."""
    known = next((x for x in HOSTS.values() if x.cpu_name == spec.host.cpu_name), None)
    if known is not None:
        return known
    isa, why = TYPICAL_HOST_ISA.get(spec.host.cpu_name, ("avx2", "assumed: AVX2, the common x86 baseline"))
    gen, gen_why = TYPICAL_HOST_PCIE.get(spec.host.cpu_name, (5, ""))
    return HostCpu("typical", spec.host.cpu_name, spec.host.description, spec.host.cores, isa,
                   spec.host.memory_bandwidth, spec.host.memory_bytes,
                   f"{spec.host.source}; ISA: {why}" + (f"; PCIe: {gen_why}" if gen_why else ""), pcie_gen=gen,
                   socket_class="server" if spec.host.cpu_name in TYPICAL_HOST_SERVER else "")


def host_and_link_factors(eff: dict[str, Efficiency], lat: dict, cpu: HostCpu, gen: int):
    """The spec profile's factors with the CPU side taken from ``cpu`` and the link from PCIe ``gen``."""
    eff, lat = dict(eff), dict(lat)
    factor = CPU_BF16_KERNEL_FACTOR[cpu.isa]
    eff["host_memory"] = Efficiency(CPU_MEMORY_EFFICIENCY.value / factor.value,
                                    f"{CPU_MEMORY_EFFICIENCY.source}; divided by {factor.value:g} for {cpu.isa}: "
                                    f"{factor.source}") if factor.value != 1.0 else CPU_MEMORY_EFFICIENCY
    # AVX-512 without BF16: the rate Fiddler's authors state for this kernel class (CPU_BF16_AVX512_PER_CORE_FLOPS);
    # the native bf16 classes: 2 FMA x their lanes per cycle at about 2 GHz (stated, not measured), where
    # batch-1 experts stay bandwidth-bound and the flop side only matters for prefill
    lanes = {"avx2": 32, "avx512": 64, "avx512_bf16": 128, "amx": 1024}[cpu.isa]
    eff["cpu_bf16_per_core_flops"] = CPU_BF16_AVX512_PER_CORE_FLOPS if cpu.isa == "avx512" else Efficiency(
        lanes * 2.0e9 / factor.value, f"{cpu.isa}: {lanes} flop/cycle x 2 GHz, over the kernel factor")
    rate, compute_rate, why, compute_why = 1.0, 1.0, "", ""
    if cpu.socket_class:
        rate = FITTED_CPU_INT4_RATE[cpu.socket_class]
        compute_rate = FITTED_CPU_INT4_COMPUTE_RATE[cpu.socket_class]
        why = (f"; x {rate:.4g}: the fitted streaming rate of ggml-family int4 kernels on {cpu.socket_class} sockets "
               f"(calib/hosts.py FITTED_CPU_INT4_RATE, reproduce/fit.py)")
        compute_why = (f"; x {compute_rate:.4g}: the fitted computing rate of ggml-family int4 kernels on "
                       f"{cpu.socket_class} sockets (calib/hosts.py FITTED_CPU_INT4_COMPUTE_RATE, reproduce/fit.py)")
    eff["host_memory_quantized"] = Efficiency(CPU_QUANT_MEMORY_EFFICIENCY.value * rate,
                                              CPU_QUANT_MEMORY_EFFICIENCY.source + why)
    eff["cpu_quant_per_core_flops"] = Efficiency(CPU_QUANT_LANES[cpu.isa] * 2 * 2.0e9 * compute_rate,
                                                 f"{cpu.isa}: {CPU_QUANT_LANES[cpu.isa]} int8 lanes x 2 flop x 2 GHz "
                                                 f"(stated, not measured){compute_why}")
    eff.pop("cpu_bf16_total_flops", None)
    if cpu.isa == "avx2":
        eff["cpu_bf16_total_flops"] = CPU_BF16_AVX2_FLOPS
    if gen == MEASURED_LINK_GEN and eff["pcie_pinned"].source.startswith("measured"):
        # the measured GPU profile (h100-measured) was taken on a PCIe Gen5 link: its own copies apply as
        # measured (pinned, pageable, bidirectional and their latencies)
        return eff, lat
    eff["pcie_pinned"] = LINK_PINNED[gen]
    eff["pcie_pageable"] = Efficiency(LINK_PINNED[gen].value * LINK_PAGEABLE_OVER_PINNED.value,
                                      f"{LINK_PINNED[gen].source}; x {LINK_PAGEABLE_OVER_PINNED.source}")
    eff["pcie_concurrent"] = LINK_BIDIRECTIONAL
    lat["copy_pinned_s"] = COPY_LATENCY_PINNED_S
    lat["copy_pageable_s"] = COPY_LATENCY_PAGEABLE_S
    return eff, lat


def finish_profile(profile, cpu: HostCpu, stated: bool, gen: int):
    """Say in the profile which host it assumes and where its link figures come from."""
    profile.sources["host"] = cpu.source + ("" if stated else "; ASSUMED: the source does not state its host CPU")
    profile.host.facts["isa"] = cpu.isa
    profile.host.facts["stated"] = stated
    profile.host.facts["sockets"] = cpu.sockets
    profile.sources["link"] = f"PCIe Gen{gen} x16: {LINK_PINNED[gen].source}"
    return profile


def compose_profile(gpu: str, host: str = UNSTATED, link: str | None = None):
    """A spec profile for ``gpu`` on ``host`` over ``link`` (pcie3/4/5; default: the GPU's own generation)."""
    spec = gpu_spec(gpu)
    if link is not None and link not in LINKS:
        raise MoesimError(f"link '{link}': expected one of {', '.join(LINKS)}")
    cpu = host_of_spec(spec) if host == UNSTATED else host_cpu(host)
    # a link trains at the older generation of its two ends (a PCIe 4.0 L4 in a Cascade Lake server runs Gen3)
    gen = min(LINKS[link] if link else spec.pcie_gen, cpu.pcie_gen)
    eff, lat = host_and_link_factors(*_base_factors(), cpu, gen)
    composed = replace(spec, name=f"{gpu}+{cpu.name}+pcie{gen}", host=cpu.as_host_spec(), pcie_gen=gen)
    profile = build_spec_profile(composed, eff, lat, ("h100-measured (GPU side)",))
    return finish_profile(profile, cpu, host != UNSTATED, gen)
