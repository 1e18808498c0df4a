"""The systems' own configuration knobs, translated into a simulation's sizes.

A published measurement names a setting in its system's terms: Mixtral-Offloading's ``offload_per_layer``
(experts per layer kept on the host), MoE-Infinity's ``device_memory_ratio`` (a fraction of GPU memory
whose pool, minus the dense weights, is the expert cache), Fiddler's fraction of VRAM (0.95 in its code).
``--knob NAME=VALUE`` states one of them; each knob belongs to the presets whose system has it, and a knob
given to another preset is an error, as is a knob together with an explicit cache size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Sequence

from moesim.errors import MoesimError
from moesim.simulator.config import SimConfig


@dataclass(frozen=True)
class Knob:
    name: str
    presets: tuple[str, ...]
    meaning: str
    source: str


KNOBS: dict[str, Knob] = {k.name: k for k in (
    Knob("offload_per_layer", ("mixtral-offloading", "mixtral-offloading-paper"),
         "experts per layer kept on the host: the GPU holds num_experts - N per layer",
         "dvmazur/mixtral-offloading ce54518 notebooks/demo.ipynb: main_size = 32 x (8 - offload_per_layer)"),
    Knob("device_memory_ratio", ("moe-infinity", "moe-infinity-2024"),
         "the device pool is RATIO x GPU memory; the expert cache is the pool minus the dense weights",
         "EfficientMoE/MoE-Infinity d617801 DeviceMemoryPool::SetMemoryRatio, GetSparseCacheLimit"),
    Knob("gpu_memory_fraction", ("fiddler",),
         "experts on the GPU = (FRACTION x VRAM - dense weights) / expert bytes, by profiled popularity",
         "efeslab/fiddler 227715b src/fiddler/mixtral.py calc_n_expert_on_gpu (0.95)"),
    Knob("n_cpu_moe", ("llama-cpp", "ktransformers"),
         "the routed experts of the first N MoE layers stay on the CPU; the other layers' experts on the GPU",
         "ggml-org/llama.cpp PR #15077: --n-cpu-moe N (--cpu-moe: all layers), common/arg.cpp; KTransformers: "
         "the optimize rules that map layers' experts to KExpertsCPU (its DeepSeek-V3 rules: every layer)"),
)}


def parse_knobs(texts: Iterable[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for text in texts:
        name, sep, value = str(text).partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in KNOBS:
            raise MoesimError(f"--knob '{text}': expected NAME=VALUE with NAME one of {', '.join(KNOBS)}")
        try:
            out[name] = float(value)
        except ValueError:
            raise MoesimError(f"--knob '{text}': the value is not a number") from None
    return out


def apply_knobs(config: SimConfig, knobs: dict[str, float], num_experts: int,
                layer_expert_bytes: Sequence[int] = ()) -> SimConfig:
    """``config`` with the knobs turned into its cache size or its policy's memory fraction.
    ``layer_expert_bytes``: one expert's bytes in each MoE layer, in the run's expert format (``n_cpu_moe``
    sizes the GPU's whole layers with them)."""
    policy = config.policy
    for name, value in knobs.items():
        knob = KNOBS[name]
        if policy.name not in knob.presets:
            raise MoesimError(f"--knob {name}: a knob of {', '.join(knob.presets)}, not of preset '{policy.name}'")
        if config.cache_experts is not None or config.cache_bytes is not None:
            raise MoesimError(f"--knob {name} and an explicit cache size both given: expected one")
        if name == "offload_per_layer":
            n = int(value)
            if n != value or not 0 <= n <= num_experts:
                raise MoesimError(f"--knob offload_per_layer={value:g}: expected an integer 0..{num_experts}")
            config = replace(config, cache_experts=num_experts - n)
        elif name == "n_cpu_moe":
            n = int(value)
            if n != value or n < 0:
                raise MoesimError(f"--knob n_cpu_moe={value:g}: expected a whole number of layers, 0 or more")
            if not layer_expert_bytes:
                raise MoesimError("--knob n_cpu_moe: the model's per-layer expert sizes are not known here")
            # the last L - N layers on the GPU; llama.cpp takes an N past the layer count as every layer
            config = replace(config, cache_bytes=num_experts * sum(int(b) for b in list(layer_expert_bytes)[n:]))
        else:
            if not 0.0 < value <= 1.0:
                raise MoesimError(f"--knob {name}={value:g}: expected a fraction 0 < value <= 1")
            config = replace(config, policy=policy.with_parts(memory_fraction=value, memory_rule="pool"))
            policy = config.policy
    return config
