"""Device memory the engine really used, measured the ways a user would.

CUDA: PyTorch's caching allocator (peak allocated and reserved since the run started, plus the memory
the CUDA context and libraries hold, measured as calibration measures a profile's runtime reserve: the
device's used memory minus what the allocator reserved) and nvidia-ml-py (the process's used memory
after the run, which includes the context and the allocator's whole pool).

CPU (the host playing the device): there is no allocator to ask, so the device-side tensors are counted:
the model's non-expert parameters, the expert buffers and the largest KV cache of the run. Activations
and the runtime itself are not separable from the host's own use and are left out on both sides.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass(frozen=True)
class MemoryMeasurement:
    device_kind: str
    peak_allocated_bytes: int = 0  # CUDA: torch.cuda.max_memory_allocated over the run
    peak_reserved_bytes: int = 0  # CUDA: torch.cuda.max_memory_reserved over the run
    runtime_bytes: int = 0  # CUDA: used by the context and libraries (device used - allocator reserved)
    nvml_process_bytes: Optional[int] = None  # CUDA: this process's used memory per nvidia-ml-py
    nvml_error: str = ""
    device_tensor_bytes: int = 0  # CPU: non-expert parameters + expert buffers + largest KV cache
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def allocator_total_bytes(self) -> int:
        """Peak tensors plus the runtime: what the simulator's peak (with its reserve) predicts."""
        return self.peak_allocated_bytes + self.runtime_bytes


def start_measurement(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def kv_cache_bytes(cache: Any) -> int:
    """Bytes of a transformers cache's keys and values (0 for an unknown layout)."""
    if cache is None:
        return 0
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total
    for name in ("key_cache", "value_cache"):
        for t in getattr(cache, name, []) or []:
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _nvml_process_bytes(index: int) -> tuple[Optional[int], str]:
    try:
        import pynvml
    except Exception as exc:
        return None, f"import pynvml failed: {type(exc).__name__}"
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        return None, f"nvmlInit failed: {type(exc).__name__}: {exc}"
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        pid = os.getpid()
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == pid and proc.usedGpuMemory is not None:
                return int(proc.usedGpuMemory), ""
        # in a container the pid may not be visible to the driver: fall back to the device's used memory
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used), "process not listed by NVML; device-wide used memory"
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def finish_measurement(device: torch.device, parts: dict[str, int]) -> MemoryMeasurement:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        free, total = torch.cuda.mem_get_info(device)
        reserved = torch.cuda.memory_reserved(device)
        nvml, err = _nvml_process_bytes(device.index or 0)
        return MemoryMeasurement(
            device_kind="cuda", peak_allocated_bytes=int(torch.cuda.max_memory_allocated(device)),
            peak_reserved_bytes=int(torch.cuda.max_memory_reserved(device)),
            runtime_bytes=int(max(0, total - free - reserved)), nvml_process_bytes=nvml, nvml_error=err,
            parts=dict(parts),
        )
    return MemoryMeasurement(device_kind="cpu", device_tensor_bytes=int(sum(parts.values())), parts=dict(parts))
