"""Device, host and software facts recorded in a measured profile (torch, nvidia-ml-py, /proc)."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

import torch

from moesim.errors import MoesimError


def resolve_device(text: str) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N', checked against what this machine has."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise MoesimError(f"--device '{text}': expected 'cpu' or 'cuda:N'") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise MoesimError(
            f"--device '{text}': expected 'cpu' or 'cuda:N' (device type '{device.type}' is not calibrated)")
    if not torch.cuda.is_available():
        raise MoesimError(
            f"--device '{text}': CUDA is not available here (torch {torch.__version__}); use --device cpu")
    index = device.index if device.index is not None else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise MoesimError(f"--device '{text}': this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def host_memory_bytes() -> int:
    from moesim.machine import memory_bytes

    return memory_bytes()


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni", "avx_vnni")
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def load_average() -> float | None:
    """1-minute load average (runnable processes), or None where the OS does not report it."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def process_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def nvml_facts(index: int, nvml=None) -> dict[str, Any]:
    """Facts from nvidia-ml-py; any failure is recorded, never fatal (the module may be absent)."""
    if nvml is None:
        try:
            import pynvml as nvml  # type: ignore[no-redef]
        except Exception as exc:  # not installed, or a broken install
            return {"nvml_error": f"import pynvml failed: {type(exc).__name__}: {exc}"}
    facts: dict[str, Any] = {}
    try:
        nvml.nvmlInit()
    except Exception as exc:
        return {"nvml_error": f"nvmlInit failed: {type(exc).__name__}: {exc}"}
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        queries = {
            "nvml_name": lambda: nvml.nvmlDeviceGetName(handle),
            "driver_version": lambda: nvml.nvmlSystemGetDriverVersion(),
            "memory_total_bytes": lambda: int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
            "sm_clock_max_mhz": lambda: nvml.nvmlDeviceGetMaxClockInfo(handle, nvml.NVML_CLOCK_SM),
            "mem_clock_max_mhz": lambda: nvml.nvmlDeviceGetMaxClockInfo(handle, nvml.NVML_CLOCK_MEM),
            "sm_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM),
            "mem_clock_mhz": lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM),
            "pcie_generation": lambda: nvml.nvmlDeviceGetCurrPcieLinkGeneration(handle),
            "pcie_width": lambda: nvml.nvmlDeviceGetCurrPcieLinkWidth(handle),
            "pcie_generation_max": lambda: nvml.nvmlDeviceGetMaxPcieLinkGeneration(handle),
            "pcie_width_max": lambda: nvml.nvmlDeviceGetMaxPcieLinkWidth(handle),
            "power_limit_w": lambda: nvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000.0,
        }
        errors = {}
        for key, query in queries.items():
            try:
                value = query()
                facts[key] = value.decode() if isinstance(value, bytes) else value
            except Exception as exc:  # a query this device or driver does not support
                errors[key] = f"{type(exc).__name__}: {exc}"
        if errors:
            facts["nvml_query_errors"] = errors
    except Exception as exc:
        facts["nvml_error"] = f"{type(exc).__name__}: {exc}"
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass
    return facts


def device_facts(device: torch.device, nvml=None) -> tuple[str, int, dict[str, Any]]:
    """(name, memory bytes, facts) of ``device``."""
    if device.type == "cpu":
        return f"cpu: {cpu_name()}", host_memory_bytes(), {
            "cores": cpu_cores(), "flags": cpu_flags(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    props = torch.cuda.get_device_properties(device)
    facts: dict[str, Any] = {
        "compute_capability": f"{props.major}.{props.minor}",
        "multi_processor_count": props.multi_processor_count,
        "l2_cache_bytes": int(getattr(props, "L2_cache_size", 0)),
    }
    facts.update(nvml_facts(device.index or 0, nvml))
    return props.name, int(props.total_memory), facts


def software_versions() -> dict[str, Any]:
    import numpy
    import scipy

    out: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "torch_num_threads": torch.get_num_threads(),
    }
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except Exception:
        out["transformers"] = None
    from moesim import __version__

    out["moesim"] = __version__
    return out
