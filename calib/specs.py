"""Profiles for hardware nobody here has: built from public specifications and stated efficiency factors.

Every peak number carries the document it comes from; every efficiency factor (the fraction of a peak
that real kernels reach) says where it was taken from: a measured profile when one exists (the CPU
profile calibrated on this machine, or ``h100-measured`` once the lead has run ``moesim calib`` on a
lent H100), otherwise a stated assumption with its reasoning. Regenerate the bundled files with::

    python -m moesim.calib.specs [--measured calib/profiles/h100-measured.json] [--cpu calib/profiles/cpu-calibrated.json]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from moesim.errors import MoesimError

from moesim.calib.profile import (
    KERNEL_BITS,
    CopyModel,
    DeviceInfo,
    ExpertKernelModel,
    HardwareProfile,
    HostInfo,
    MeasuredRange,
    RooflineModel,
    copy_key,
    load_profile,
)

GB = 1e9
GIB = 2**30

# Per-direction payload rate of a x16 link after line encoding (8b/10b for Gen1-2, 128b/130b from Gen3).
PCIE_X16_BYTES_PER_S = {3: 15.754e9, 4: 31.508e9, 5: 63.015e9}
PCIE_SOURCE = ("PCI-SIG, PCI Express Base Specification Rev. 3.0/4.0/5.0: 8/16/32 GT/s per lane, 128b/130b "
               "encoding (https://pcisig.com/specifications)")

KERNEL_LIBRARY_CUDA = {
    "bf16": "torch.matmul (cuBLAS), bf16 weights and activations",
    "int8": "torch._int_mm (cuBLASLt int8 GEMM, W8A8 with per-token activation quantization)",
    "int4": "torch._weight_int4pack_mm (tinygemm, W4A16, group 128; needs compute capability >= 8.0)",
}
KERNEL_LIBRARY_CPU = {
    "bf16": "torch.matmul (oneDNN), bf16 weights and activations",
    "int8": "torch._weight_int8pack_mm (W8A16, per-channel scales)",
    "int4": "torch._weight_int4pack_mm_for_cpu (W4A16, group 128)",
}
# A spec profile's CPU int4 kernel is the one the CPU-expert systems that run 4-bit experts use: ggml's quantized
# mat-vec (llama.cpp's CPU backend, which kTransformers/HybriMoE and llama.cpp --n-cpu-moe run on GGUF Q4_K:
# 256-weight super-blocks of 144 bytes, 4.5 bits per weight)
SPEC_CPU_INT4 = ("ggml quantized mat-vec (llama.cpp CPU backend), GGUF Q4_K", 4.5)


@dataclass(frozen=True)
class HostSpec:
    description: str
    cpu_name: str
    cores: int
    memory_bytes: int
    memory_bandwidth: float  # bytes/s peak of the memory channels the GPU's process can use
    source: str


@dataclass(frozen=True)
class GpuSpec:
    name: str  # profile name
    device_name: str  # as torch.cuda.get_device_name would print it
    memory_bytes: int
    memory_bandwidth: float  # bytes/s
    bf16_flops: float  # dense tensor-core FLOP/s for 16-bit inputs with fp32 accumulation (fp16 on Turing)
    int8_ops: float  # dense int8 tensor-core OP/s
    compute_capability: str
    pcie_gen: int
    pcie_lanes: int
    host: HostSpec
    sources: dict[str, str] = field(default_factory=dict)
    notes: str = ""

    @property
    def kernels(self) -> tuple[str, ...]:
        major = int(self.compute_capability.split(".")[0])
        # tinygemm int4 needs sm80+; cuBLASLt int8 runs on sm75+.
        return ("bf16", "int8", "int4") if major >= 8 else ("bf16", "int8")


DESKTOP_DDR4 = HostSpec(
    "typical desktop: 8-core CPU, dual-channel DDR4-3200, 64 GB", "8-core desktop CPU (DDR4-3200 x2)", 8,
    64 * GIB, 51.2 * GB,
    "JEDEC JESD79-4 DDR4-3200: 3200 MT/s x 8 B = 25.6 GB/s per channel; 2 channels on desktop platforms",
)
LAPTOP_DDR4 = HostSpec(
    "typical gaming laptop: 8-core mobile CPU, dual-channel DDR4-3200, 32 GB", "8-core mobile CPU (DDR4-3200 x2)",
    8, 32 * GIB, 51.2 * GB, "JEDEC JESD79-4 DDR4-3200: 25.6 GB/s per channel, 2 channels",
)
DESKTOP_DDR5 = HostSpec(
    "typical high-end desktop: 16-core AMD Ryzen 9 7950X, dual-channel DDR5-5200, 128 GB", "AMD Ryzen 9 7950X", 16,
    128 * GIB, 83.2 * GB,
    "AMD Ryzen 9 7950X product page (16 cores, DDR5-5200 x2, https://www.amd.com/en/products/processors/desktops/"
    "ryzen/7000-series/amd-ryzen-9-7950x.html); 5200 MT/s x 8 B = 41.6 GB/s per channel",
)
WORKSTATION = HostSpec(
    "typical workstation: 24-core AMD Threadripper PRO 5965WX, 8-channel DDR4-3200, 256 GB",
    "AMD Ryzen Threadripper PRO 5965WX", 24, 256 * GIB, 204.8 * GB,
    "AMD Threadripper PRO 5965WX product page (24 cores, 8 channels DDR4-3200, https://www.amd.com/en/products/"
    "processors/workstations/ryzen-threadripper.html); 8 x 25.6 GB/s",
)
CLOUD_T4 = HostSpec(
    "AWS g4dn.2xlarge: 8 vCPUs of an Intel Xeon Platinum 8259CL, 32 GiB", "Intel Xeon Platinum 8259CL (8 vCPU)", 8,
    32 * GIB, 140.8 * GB,
    "AWS EC2 G4 instances page (https://aws.amazon.com/ec2/instance-types/g4/): g4dn.2xlarge 8 vCPU, 32 GiB; "
    "Cascade Lake 6 x DDR4-2933 = 140.8 GB/s per socket (Intel ARK), shared with other tenants",
)
CLOUD_L4 = HostSpec(
    "Google Cloud g2-standard-16: 16 vCPUs of an Intel Xeon (Cascade Lake), 64 GB", "Intel Xeon Cascade Lake (16 vCPU)",
    16, 64 * GIB, 140.8 * GB,
    "Google Cloud G2 machine series (https://cloud.google.com/compute/docs/gpus#l4-gpus): g2-standard-16 "
    "16 vCPU, 64 GB; Cascade Lake 6 x DDR4-2933 = 140.8 GB/s per socket",
)
DGX_A100 = HostSpec(
    "one socket of an NVIDIA DGX A100: AMD EPYC 7742 (64 cores), 8 x DDR4-3200, 1 TB", "AMD EPYC 7742", 64,
    1024 * GIB, 204.8 * GB,
    "NVIDIA DGX A100 datasheet (2 x AMD EPYC 7742, 1 TB/2 TB; https://www.nvidia.com/content/dam/en-zz/Solutions/"
    "Data-Center/nvidia-dgx-a100-datasheet.pdf); EPYC 7742: 8 channels DDR4-3200 = 204.8 GB/s per socket",
)
DGX_H100 = HostSpec(
    "one socket of an NVIDIA DGX H100: Intel Xeon Platinum 8480C (56 cores), 8 x DDR5-4800, 1 TB", "Intel Xeon Platinum 8480C",
    56, 1024 * GIB, 307.2 * GB,
    "NVIDIA DGX H100 datasheet (2 x Intel Xeon Platinum 8480C, 112 cores, 2 TB; https://resources.nvidia.com/"
    "en-us-dgx-systems/ai-enterprise-dgx); Sapphire Rapids: 8 channels DDR5-4800 = 307.2 GB/s per socket",
)

GPUS: tuple[GpuSpec, ...] = (
    GpuSpec(
        "rtx-3060", "NVIDIA GeForce RTX 3060", 12 * GIB, 360 * GB, 25.6e12, 102.4e12, "8.6", 3, 16, DESKTOP_DDR4,
        sources={
            "memory": "NVIDIA GeForce RTX 3060 family specifications (12 GB GDDR6, 192-bit; https://www.nvidia.com/"
                      "en-us/geforce/graphics-cards/30-series/rtx-3060-3060ti/)",
            "memory_bandwidth": "15 Gbps x 192 bit / 8 = 360 GB/s (same NVIDIA page)",
            "flops": "NVIDIA Ampere GA102 GPU Architecture whitepaper: GA10x SM = 4 tensor cores, 512 dense FP16 "
                     "FMA/clk with FP16 accumulate and half that with FP32 accumulate on GeForce; 28 SMs x 1.777 GHz "
                     "boost x 512 FLOP/clk = 25.5 TFLOPS (bf16, fp32 accumulate); INT8 = 4x that = 102 TOPS",
            "pcie": "card: PCIe 4.0 x16; Mixtral-offloading (Eliseev & Mazur 2023, Table 2) ran its RTX 3060 on a "
                    "PCIe Gen3 host, which this profile models",
        },
    ),
    GpuSpec(
        "rtx-3080-mobile", "NVIDIA GeForce RTX 3080 Laptop GPU", 16 * GIB, 448 * GB, 42.0e12, 168.1e12, "8.6", 4, 16,
        LAPTOP_DDR4,
        sources={
            "memory": "NVIDIA GeForce RTX 3080 Laptop GPU specifications (16 GB GDDR6, 256-bit; https://www.nvidia.com/"
                      "en-us/geforce/laptops/30-series/)",
            "memory_bandwidth": "14 Gbps x 256 bit / 8 = 448 GB/s",
            "flops": "GA104, 48 SMs, boost up to 1.71 GHz (NVIDIA laptop spec page, TGP-dependent); per-SM rates from "
                     "the Ampere GA102 whitepaper: 48 x 1.71 GHz x 512 = 42.0 TFLOPS bf16/fp32-acc, INT8 4x",
            "pcie": "PCIe 4.0 x16 as in Mixtral-offloading's RTX 3080 Mobile setup (paper Table 2)",
        },
        notes="Laptop clocks depend on the configured TGP; peak numbers use the highest boost clock.",
    ),
    GpuSpec(
        "rtx-4090", "NVIDIA GeForce RTX 4090", 24 * GIB, 1008 * GB, 165.2e12, 660.6e12, "8.9", 4, 16, DESKTOP_DDR5,
        sources={
            "memory": "NVIDIA Ada GPU Architecture whitepaper, Appendix A (24 GB GDDR6X, 384-bit, 21 Gbps, 1008 GB/s)",
            "memory_bandwidth": "NVIDIA Ada GPU Architecture whitepaper, Appendix A: 1008 GB/s",
            "flops": "NVIDIA Ada GPU Architecture whitepaper, Appendix A: peak FP16/BF16 tensor TFLOPS with FP32 "
                     "accumulate 165.2 (dense); peak INT8 tensor TOPS 660.6 (dense)",
            "pcie": "NVIDIA Ada whitepaper: PCIe 4.0 x16",
        },
    ),
    GpuSpec(
        "t4", "Tesla T4", 15 * GIB, 320 * GB, 65e12, 130e12, "7.5", 3, 16, CLOUD_T4,
        sources={
            "memory": "NVIDIA T4 Tensor Core GPU datasheet (16 GB GDDR6, 320 GB/s; https://www.nvidia.com/content/dam/"
                      "en-zz/Solutions/Data-Center/tesla-t4/t4-tensor-core-datasheet-951643.pdf); torch reports "
                      "about 15 GiB usable",
            "memory_bandwidth": "NVIDIA T4 datasheet: 320+ GB/s",
            "flops": "NVIDIA T4 datasheet: mixed-precision FP16/FP32 65 TFLOPS, INT8 130 TOPS. Turing has no bf16: the "
                     "16-bit kernel runs fp16",
            "pcie": "NVIDIA T4 datasheet: PCIe Gen3 x16",
        },
        notes="The 70 W T4 throttles under sustained load; no int4 tinygemm kernel (needs sm80).",
    ),
    GpuSpec(
        "l4", "NVIDIA L4", 22 * GIB, 300 * GB, 121e12, 242.5e12, "8.9", 4, 16, CLOUD_L4,
        sources={
            "memory": "NVIDIA L4 Tensor Core GPU datasheet (24 GB GDDR6, 300 GB/s; https://resources.nvidia.com/"
                      "en-us-data-center-overview/l4-gpu-datasheet); torch reports about 22 GiB usable",
            "memory_bandwidth": "NVIDIA L4 datasheet: 300 GB/s",
            "flops": "NVIDIA L4 datasheet: BF16 tensor 242 TFLOPS and INT8 485 TOPS with sparsity; dense = half",
            "pcie": "NVIDIA L4 datasheet: PCIe Gen4 x16",
        },
    ),
    GpuSpec(
        "a5000", "NVIDIA RTX A5000", 24 * GIB, 768 * GB, 111.1e12, 222.2e12, "8.6", 4, 16, WORKSTATION,
        sources={
            "memory": "NVIDIA RTX A5000 datasheet (24 GB GDDR6 with ECC, 768 GB/s; https://www.nvidia.com/content/dam/"
                      "en-zz/Solutions/gtcs21/rtx-a5000/nvidia-rtx-a5000-datasheet.pdf)",
            "memory_bandwidth": "NVIDIA RTX A5000 datasheet: 768 GB/s",
            "flops": "NVIDIA RTX A5000 datasheet: tensor performance 222.2 TFLOPS with sparsity -> 111.1 dense "
                     "(professional Ampere runs FP32 accumulate at full rate); INT8 = 2x",
            "pcie": "NVIDIA RTX A5000 datasheet: PCI Express Gen 4 x16",
        },
    ),
    GpuSpec(
        "a6000", "NVIDIA RTX A6000", 48 * GIB, 768 * GB, 154.8e12, 309.7e12, "8.6", 4, 16, WORKSTATION,
        sources={
            "memory": "NVIDIA RTX A6000 datasheet (48 GB GDDR6 with ECC, 768 GB/s; https://www.nvidia.com/content/dam/"
                      "en-zz/Solutions/design-visualization/quadro-product-literature/proviz-print-nvidia-rtx-a6000-"
                      "datasheet-us-nvidia-1454980-r9-web.pdf)",
            "memory_bandwidth": "NVIDIA RTX A6000 datasheet: 768 GB/s",
            "flops": "NVIDIA RTX A6000 datasheet: tensor performance 309.7 TFLOPS with sparsity -> 154.8 dense; INT8 2x",
            "pcie": "NVIDIA RTX A6000 datasheet: PCI Express Gen 4 x16",
        },
    ),
    GpuSpec(
        "a100-80gb", "NVIDIA A100-SXM4-80GB", 80 * GIB, 2039 * GB, 312e12, 624e12, "8.0", 4, 16, DGX_A100,
        sources={
            "memory": "NVIDIA A100 Tensor Core GPU datasheet (80 GB HBM2e, SXM 2,039 GB/s; https://www.nvidia.com/content/"
                      "dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf)",
            "memory_bandwidth": "NVIDIA A100 datasheet: 2,039 GB/s (SXM)",
            "flops": "NVIDIA A100 datasheet: BF16 tensor core 312 TFLOPS, INT8 624 TOPS (dense)",
            "pcie": "NVIDIA A100 datasheet: PCIe Gen4 64 GB/s (both directions) = Gen4 x16 to the host",
        },
    ),
    GpuSpec(
        "h100-sxm", "NVIDIA H100 80GB HBM3", 85_520_809_984, 3350 * GB, 989.4e12, 1978.9e12, "9.0", 5, 16, DGX_H100,
        sources={
            "memory": "NVIDIA H100 Tensor Core GPU datasheet (H100 SXM: 80 GB HBM3, 3.35 TB/s; https://resources.nvidia.com/"
                      "en-us-tensor-core/nvidia-tensor-core-gpu-datasheet); 81,559 MiB as nvidia-smi reports it",
            "memory_bandwidth": "NVIDIA H100 datasheet: 3.35 TB/s (SXM)",
            "flops": "NVIDIA H100 datasheet: BF16 tensor core 1,979 TFLOPS and INT8 3,958 TOPS with sparsity; dense = half",
            "pcie": "NVIDIA H100 datasheet: PCIe Gen5 128 GB/s (both directions) = Gen5 x16",
        },
    ),
)


@dataclass(frozen=True)
class Efficiency:
    """Fractions of a peak that real kernels reach, each with where it came from."""

    value: float
    source: str

    def to_dict(self) -> dict[str, object]:
        return {"value": self.value, "source": self.source}


def default_efficiencies() -> dict[str, Efficiency]:
    """Stated assumptions, used where no measured profile supplies the factor."""
    return {
        "gpu_memory": Efficiency(0.80, "assumed: weight-streaming GEMV kernels reach about 80% of DRAM peak "
                                       "(e.g. NVIDIA's nvbandwidth/STREAM-like results on HBM and GDDR6)"),
        "gpu_bf16_tensor": Efficiency(0.65, "assumed: cuBLAS bf16 GEMMs of an expert's shape (K=4096..14336, "
                                            "M<=512) reach about 65% of dense tensor peak"),
        "gpu_int8_tensor": Efficiency(0.45, "assumed: torch._int_mm at M<=512 plus per-token activation "
                                            "quantization reaches about 45% of dense int8 peak"),
        "gpu_int8_memory": Efficiency(0.80, "assumed: same DRAM efficiency as the bf16 kernel"),
        "gpu_int4_compute": Efficiency(0.25, "assumed: tinygemm W4A16 dequantizes in registers and is tuned for "
                                             "small M; about 25% of bf16 tensor peak at large M"),
        "gpu_int4_memory": Efficiency(0.65, "assumed: tinygemm reaches about 65% of DRAM peak at M=1"),
        "pcie_pinned": Efficiency(0.80, "assumed: pinned cudaMemcpyAsync reaches about 80% of the x16 payload rate "
                                        "(TLP headers and DMA overhead)"),
        "pcie_pageable": Efficiency(0.45, "assumed: pageable copies go through the driver's pinned staging buffer "
                                          "and a host memcpy, reaching about 45% of the pinned rate's link peak"),
        "pcie_concurrent": Efficiency(0.85, "assumed: with both directions busy each direction keeps about 85% of "
                                            "its alone rate (full-duplex link, shared host memory and DMA engines)"),
        "host_memory": Efficiency(0.50, "assumed: PyTorch CPU GEMV reaches about 50% of the memory channels' peak"),
        "host_memory_quantized": Efficiency(0.50, "assumed: a quantized CPU GEMV reaches about 50% of the memory "
                                                  "channels' peak"),
        "cpu_quant_per_core_flops": Efficiency(100e9, "assumed: 100 GFLOP/s of dequantize-and-dot per core"),
        "cpu_bf16_per_core_flops": Efficiency(100e9, "assumed: 100 GFLOP/s of bf16 matmul per core (AVX-512 class "
                                                    "core, oneDNN)"),
    }


# Fixed costs that no datasheet gives; stated until a measured GPU profile replaces them.
DEFAULT_LATENCIES = {
    "copy_pinned_s": (10e-6, "assumed: cudaMemcpyAsync launch + DMA setup about 10 us"),
    "copy_pageable_s": (20e-6, "assumed: pageable copy adds staging about 20 us"),
    "expert_s": (20e-6, "assumed: 5 kernels (3 GEMMs, SiLU, multiply) at about 4 us each on the GPU"),
    "expert_int8_s": (40e-6, "assumed: the bf16 kernels plus per-token activation quantization kernels"),
    "non_expert_s": (80e-6, "assumed: about 20 small kernels per layer (norms, rotary, SDPA, router) at 4 us"),
    "head_s": (20e-6, "assumed: norm + lm_head + sampling kernels"),
    "cpu_expert_s": (50e-6, "assumed: host-side dispatch of a CPU expert FFN"),
    "layer_overhead_s": (150e-6, "assumed: Python/HF per-MoE-layer bookkeeping in eager mode"),
    "step_overhead_s": (1e-3, "assumed: sampling and per-step bookkeeping"),
    "runtime_reserve_bytes": (1 * GIB, "assumed: CUDA context (~500 MiB) plus allocator slack"),
}


def efficiencies_from_profiles(measured_gpu: HardwareProfile | None,
                               measured_cpu: HardwareProfile | None) -> tuple[dict[str, Efficiency], dict[str, tuple[float, str]]]:
    """Replace assumed factors by ones measured on real hardware where a profile is given."""
    eff = default_efficiencies()
    lat = dict(DEFAULT_LATENCIES)
    # CPU experts: per-core flop rate of a measured host (the GPU machine's host first: a server CPU)
    for measured in (measured_gpu, measured_cpu):
        m = measured.cpu_expert_models.get("bf16", {}) if measured is not None else {}
        if m:
            threads = min(m)
            eff["cpu_bf16_per_core_flops"] = Efficiency(
                m[threads].model.flops_per_s / threads,
                f"measured: profile {measured.name} ({measured.host.cpu_name}), bf16 expert FFN fitted flop rate "
                f"with {threads} thread(s)")
            break
    # Python/launch overheads: the GPU machine's eager-mode figures apply to GPU profiles
    for measured in (measured_gpu, measured_cpu):
        if measured is not None:
            where = f"measured on {measured.device.name} / {measured.host.cpu_name} (profile {measured.name})"
            lat["layer_overhead_s"] = (measured.layer_overhead_s, where)
            lat["step_overhead_s"] = (measured.step_overhead_s, where)
            break
    if measured_gpu is not None:
        spec = next((g for g in GPUS if g.device_name == measured_gpu.device.name), None)
        if spec is None:
            raise MoesimError(f"measured profile {measured_gpu.name}: device '{measured_gpu.device.name}' "
                              f"has no spec entry to compute efficiencies against")
        src = (f"measured: profile {measured_gpu.name} on {measured_gpu.device.name}; memory: bytes / (time - "
               f"{GPU_KERNEL_LATENCY_S * 1e6:.0f} us) at 1-4 tokens, compute: the highest flops / time, over the "
               f"datasheet peak")
        rates = _effective_expert_rates(measured_gpu)
        if "bf16" in rates:
            mem_rate, flop_rate = rates["bf16"]
            eff["gpu_memory"] = Efficiency(min(mem_rate / spec.memory_bandwidth, 1.0), src)
            eff["gpu_bf16_tensor"] = Efficiency(min(flop_rate / spec.bf16_flops, 1.0), src)
            lat["expert_s"] = (GPU_KERNEL_LATENCY_S, "assumed: kernel gaps; the launch cost measured in eager mode "
                                                     "overlaps GPU work, so it is folded into the effective bandwidth")
        if "int8" in rates:
            mem_rate, flop_rate = rates["int8"]
            lib = measured_gpu.expert_models["int8"].library
            eff["gpu_int8_tensor"] = Efficiency(min(flop_rate / spec.int8_ops, 1.0), f"{src} ({lib})")
            eff["gpu_int8_memory"] = Efficiency(min(mem_rate / spec.memory_bandwidth, 1.0), f"{src} ({lib})")
            lat["expert_int8_s"] = (GPU_KERNEL_LATENCY_S, lat["expert_s"][1])
        if "int4" in rates:
            mem_rate, flop_rate = rates["int4"]
            eff["gpu_int4_compute"] = Efficiency(min(flop_rate / spec.bf16_flops, 1.0), src)
            eff["gpu_int4_memory"] = Efficiency(min(mem_rate / spec.memory_bandwidth, 1.0), src)
        link = PCIE_X16_BYTES_PER_S[spec.pcie_gen] * spec.pcie_lanes / 16
        pinned = measured_gpu.copy_models.get(copy_key("h2d", True, False))
        if pinned:
            eff["pcie_pinned"] = Efficiency(min(pinned.bytes_per_s / link, 1.0), src)
            lat["copy_pinned_s"] = (pinned.latency_s, src)
        pageable = measured_gpu.copy_models.get(copy_key("h2d", False, False))
        if pageable:
            eff["pcie_pageable"] = Efficiency(min(pageable.bytes_per_s / link, 1.0), src)
            lat["copy_pageable_s"] = (pageable.latency_s, src)
        conc = measured_gpu.copy_models.get(copy_key("h2d", True, True))
        if conc and pinned:
            eff["pcie_concurrent"] = Efficiency(min(conc.bytes_per_s / pinned.bytes_per_s, 1.0), src)
        dec = measured_gpu.non_expert_models.get("bf16", {}).get("decode")
        if dec:
            lat["non_expert_s"] = (dec.latency_s, src)
        lat["head_s"] = (measured_gpu.head_model.latency_s, src)
        lat["runtime_reserve_bytes"] = (measured_gpu.runtime_reserve_bytes, src)
    return eff, lat


GPU_KERNEL_LATENCY_S = 10e-6


def _effective_expert_rates(profile: HardwareProfile) -> dict[str, tuple[float, float]]:
    """kernel -> (effective bytes/s at 1-4 tokens, best flops/s) from a measured profile's expert series."""
    from moesim.calib.calibrate import expert_data

    out = {}
    for s in profile.measurements:
        if not s.key.startswith("expert/"):
            continue
        d = expert_data(s, profile.fit_statistic)
        small = d.x["tokens"] <= 4
        mem = float(np.median(d.nbytes[small] / np.maximum(d.times[small] - GPU_KERNEL_LATENCY_S, 1e-9)))
        out[s.key.split("/")[1]] = (mem, float(np.max(d.flops / d.times)))
    return out


_UNBOUNDED = (MeasuredRange("tokens", 1.0, None),)


def _roofline(latency: float, flops: float, nbytes: float, ranges=_UNBOUNDED) -> RooflineModel:
    return RooflineModel(latency_s=latency, flops_per_s=flops, bytes_per_s=nbytes, ranges=ranges,
                         extrapolation="roofline", method="spec-roofline")


def build_spec_profile(gpu: GpuSpec, eff: dict[str, Efficiency], lat: dict[str, tuple[float, str]],
                       measured_from: tuple[str, ...] = ()) -> HardwareProfile:
    e = {k: v.value for k, v in eff.items()}
    mem = gpu.memory_bandwidth * e["gpu_memory"]
    bf16 = gpu.bf16_flops * e["gpu_bf16_tensor"]
    expert = {
        "bf16": ExpertKernelModel("bf16", KERNEL_LIBRARY_CUDA["bf16"], KERNEL_BITS["bf16"],
                                  _roofline(lat["expert_s"][0], bf16, mem)),
        "int8": ExpertKernelModel("int8", KERNEL_LIBRARY_CUDA["int8"], KERNEL_BITS["int8"],
                                  _roofline(lat["expert_int8_s"][0], gpu.int8_ops * e["gpu_int8_tensor"],
                                            gpu.memory_bandwidth * e["gpu_int8_memory"])),
    }
    if "int4" in gpu.kernels:
        expert["int4"] = ExpertKernelModel(
            "int4", KERNEL_LIBRARY_CUDA["int4"], KERNEL_BITS["int4"],
            _roofline(lat["expert_s"][0], gpu.bf16_flops * e["gpu_int4_compute"],
                      gpu.memory_bandwidth * e["gpu_int4_memory"]))
    link = PCIE_X16_BYTES_PER_S[gpu.pcie_gen] * gpu.pcie_lanes / 16
    host_bw = gpu.host.memory_bandwidth * e["host_memory"]
    copies = {}
    for direction in ("h2d", "d2h"):
        for pinned in (True, False):
            rate = link * (e["pcie_pinned"] if pinned else e["pcie_pageable"])
            latency = lat["copy_pinned_s" if pinned else "copy_pageable_s"][0]
            for concurrent in (False, True):
                r = rate * (e["pcie_concurrent"] if concurrent else 1.0)
                copies[copy_key(direction, pinned, concurrent)] = CopyModel(
                    latency, r, 1.0, None, "roofline", "spec-linear")
    cores = gpu.host.cores
    cpu_flops_core = e["cpu_bf16_per_core_flops"]
    # a kernel class that does not scale with threads (calib.hosts.CPU_BF16_AVX2_FLOPS) caps the total
    cpu_flops_cap = e.get("cpu_bf16_total_flops", float("inf"))
    threads = sorted({1, max(1, cores // 2), cores})
    cpu_expert = {"bf16": {
        t: ExpertKernelModel("bf16", KERNEL_LIBRARY_CPU["bf16"], KERNEL_BITS["bf16"],
                             _roofline(lat["cpu_expert_s"][0], min(cpu_flops_core * t, cpu_flops_cap), host_bw))
        for t in threads
    }}
    quant_bw = gpu.host.memory_bandwidth * e["host_memory_quantized"]
    cpu_expert["int4"] = {
        t: ExpertKernelModel("int4", SPEC_CPU_INT4[0], SPEC_CPU_INT4[1],
                             _roofline(lat["cpu_expert_s"][0], e["cpu_quant_per_core_flops"] * t, quant_bw))
        for t in threads
    }
    ctx_ranges = (MeasuredRange("batch", 1.0, None), MeasuredRange("context", 0.0, None))
    non_expert = {"bf16": {
        "prefill": _roofline(lat["non_expert_s"][0], bf16, mem),
        "decode": _roofline(lat["non_expert_s"][0], bf16, mem, ctx_ranges),
    }}
    if "int4" in gpu.kernels:
        # 4-bit attention (HQQ in Mixtral-Offloading, GGUF in llama.cpp): weights streamed at the int4 kernel's
        # memory efficiency; arithmetic at the 16-bit tensor rate (at prefill sizes 4-bit layers dequantize and
        # run the 16-bit GEMM)
        int4_mem = gpu.memory_bandwidth * e["gpu_int4_memory"]
        non_expert["int4"] = {
            "prefill": _roofline(lat["non_expert_s"][0], bf16, int4_mem),
            "decode": _roofline(lat["non_expert_s"][0], bf16, int4_mem, ctx_ranges),
        }
    sources = {
        "device.memory_bytes": gpu.sources["memory"],
        "memory_bandwidth": gpu.sources["memory_bandwidth"],
        "peak_flops": gpu.sources["flops"],
        "pcie": gpu.sources["pcie"] + "; " + PCIE_SOURCE,
        "host": gpu.host.source,
    }
    for key, (value, why) in lat.items():
        sources[f"latency.{key}"] = f"{value:g}: {why}"
    sources["efficiency_profiles"] = ",".join(measured_from)
    return HardwareProfile(
        name=gpu.name,
        derived_from_specs=True,
        device=DeviceInfo(gpu.device_name, "cuda", int(gpu.memory_bytes), {
            "compute_capability": gpu.compute_capability,
            "memory_bandwidth_bytes_per_s": gpu.memory_bandwidth,
            "peak_bf16_flops": gpu.bf16_flops,
            "peak_int8_ops": gpu.int8_ops,
            "pcie_generation": gpu.pcie_gen,
            "pcie_width": gpu.pcie_lanes,
            "pcie_bytes_per_s_per_direction": link,
        }),
        host=HostInfo(gpu.host.cpu_name, cores, int(gpu.host.memory_bytes),
                      {"description": gpu.host.description, "memory_bandwidth_bytes_per_s": gpu.host.memory_bandwidth}),
        runtime_reserve_bytes=int(lat["runtime_reserve_bytes"][0]),
        cpu_threads=cores,
        expert_models=expert,
        cpu_expert_models=cpu_expert,
        copy_models=copies,
        non_expert_models=non_expert,
        head_model=_roofline(lat["head_s"][0], bf16, mem),
        layer_overhead_s=float(lat["layer_overhead_s"][0]),
        step_overhead_s=float(lat["step_overhead_s"][0]),
        software={},
        sources=sources,
        efficiency={k: v.to_dict() for k, v in eff.items()},
        notes=("Derived from public specifications, not measured: peak x efficiency roofline. " + gpu.notes).strip(),
    )


def build_all(measured_gpu: HardwareProfile | None = None,
              measured_cpu: HardwareProfile | None = None) -> list[HardwareProfile]:
    from moesim.calib.hosts import finish_profile, host_and_link_factors, host_of_spec

    eff, lat = efficiencies_from_profiles(measured_gpu, measured_cpu)
    used = tuple(p.name for p in (measured_gpu, measured_cpu) if p is not None)
    out = []
    for g in GPUS:
        # the CPU side from this GPU's typical host (cores, ISA, channels) and the link from its PCIe
        # generation, not from whichever machine was measured (calib/hosts.py)
        cpu = host_of_spec(g)
        gen = min(g.pcie_gen, cpu.pcie_gen)  # a link trains at the older generation of card and host
        e, lt = host_and_link_factors(eff, lat, cpu, gen)
        out.append(finish_profile(build_spec_profile(replace(g, pcie_gen=gen), e, lt, used), cpu, False, gen))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measured", help="measured GPU profile to take efficiency factors from")
    parser.add_argument("--cpu", help="measured CPU profile to take CPU and Python-overhead factors from")
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "profiles"))
    args = parser.parse_args(argv)
    gpu = load_profile(args.measured) if args.measured else None
    cpu = load_profile(args.cpu) if args.cpu else None
    for profile in build_all(gpu, cpu):
        path = profile.save(Path(args.out_dir) / f"{profile.name}.json")
        print(path)


if __name__ == "__main__":  # pragma: no cover
    main()
