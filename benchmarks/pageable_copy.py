"""Pageable host-to-device copies on this machine: the host's staging copy and the DMA, in series or overlapped?

Fiddler's ``load_state_dict`` and accelerate's ``.to(device)`` copy experts from ordinary (pageable) host memory.
CUDA cannot DMA from pageable memory: the driver first copies the bytes into its own page-locked staging
buffers with the CPU, then DMAs them. This script measures, for tensors of several sizes (a Mixtral expert
is 352 MB in bf16, each of its three matrices 117 MB):

- pinned H2D and D2H: ``copy_(non_blocking=True)`` from or to page-locked memory, then a synchronize;
- pageable H2D and D2H: ``copy_()`` from or to ordinary memory (synchronous, as PyTorch does it);
- the host's own copy rate, one thread (``ctypes.memmove`` of the same bytes into page-locked memory, what the
  driver's staging does), and pageable to pageable;

and prints the pageable rate next to two models built from the other two: **serial** (stage, then DMA:
1 / (1/pinned + 1/memcpy)) and **overlapped** (staging pipelined with the DMA: min(pinned, memcpy)).

    python benchmarks/pageable_copy.py [--device cuda] [--repeats 7]

Needs a CUDA device; prints the machine (GPU, CPU model, PCIe link) first. Medians over --repeats after a warm-up.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import time

SIZES_MB = (8, 64, 117, 352)


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                "unknown")


def _link(index: int) -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        return (f"PCIe gen {pynvml.nvmlDeviceGetCurrPcieLinkGeneration(h)} "
                f"x{pynvml.nvmlDeviceGetCurrPcieLinkWidth(h)}")
    except Exception as exc:  # a report line, not a failure
        return f"unknown ({type(exc).__name__})"


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch page faults, the driver's staging buffers
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("pageable_copy: no CUDA device", file=sys.stderr)
        return 2
    dev = torch.device(args.device)
    torch.set_num_threads(1)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    print(f"GPU {torch.cuda.get_device_name(dev)}, {_link(index)}; CPU {_cpu_model()}; torch {torch.__version__}")
    print(f"{'MB':>5} {'pinned H2D':>11} {'pageable H2D':>13} {'memcpy 1 thr':>13} {'serial model':>13} "
          f"{'overlap model':>14} {'pinned D2H':>11} {'pageable D2H':>13} {'memcpy pageable':>16}   (GB/s)")
    for mb in SIZES_MB:
        n = mb * 1_000_000 // 2
        nbytes = n * 2
        pageable = torch.empty(n, dtype=torch.bfloat16).normal_()
        pageable_out = torch.empty_like(pageable).zero_()
        pinned = torch.empty(n, dtype=torch.bfloat16, pin_memory=True).zero_()
        pinned.copy_(pageable)
        gpu = torch.empty(n, dtype=torch.bfloat16, device=dev)

        def copy(dst, src, non_blocking):
            def run():
                dst.copy_(src, non_blocking=non_blocking)
                torch.cuda.synchronize(dev)
            return run

        def memcpy_to_pinned():
            ctypes.memmove(pinned.data_ptr(), pageable.data_ptr(), nbytes)

        def memcpy_to_pageable():
            ctypes.memmove(pageable_out.data_ptr(), pageable.data_ptr(), nbytes)

        rate = {name: nbytes / _median_s(fn, args.repeats) / 1e9 for name, fn in (
            ("h2d_pinned", copy(gpu, pinned, True)), ("h2d_pageable", copy(gpu, pageable, False)),
            ("memcpy", memcpy_to_pinned), ("d2h_pinned", copy(pinned, gpu, True)),
            ("d2h_pageable", copy(pageable_out, gpu, False)), ("memcpy_pageable", memcpy_to_pageable))}
        serial = 1 / (1 / rate["h2d_pinned"] + 1 / rate["memcpy"])
        overlap = min(rate["h2d_pinned"], rate["memcpy"])
        print(f"{mb:>5} {rate['h2d_pinned']:>11.2f} {rate['h2d_pageable']:>13.2f} {rate['memcpy']:>13.2f} "
              f"{serial:>13.2f} {overlap:>14.2f} {rate['d2h_pinned']:>11.2f} {rate['d2h_pageable']:>13.2f} "
              f"{rate['memcpy_pageable']:>16.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
