"""Time one Mixtral-8x7B expert (the HF module's three linears and SiLU) on this CPU with the installed PyTorch.

The CPU-expert systems pin old PyTorch releases (Fiddler: torch 2.1.2), whose bf16 matmul on an x86 CPU
without AVX-512 has no GEMV kernel. ``calib/hosts.py`` models that kernel class as a rate that neither
more threads nor more memory channels change and that grows linearly with the tokens
(``CPU_BF16_AVX2_FLOPS``). Run this script under such a release on such a CPU to check the three
claims: it prints, per dtype, token count and thread count, the process CPU time (load-independent for a
serial kernel), the calling thread's share of it (1.0 = nothing ran on other threads), the wall time and
the flop rate of the CPU time.

    python -m venv /tmp/t21 && /tmp/t21/bin/pip install torch==2.1.2 "numpy<2"
    /tmp/t21/bin/python benchmarks/cpu_expert_kernel.py [--tokens 1,4] [--threads 1,2] [--dtypes bf16,fp32]

It needs about 0.7 GB of memory for the fp32 weights.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

HIDDEN, FFN = 4096, 14336  # Mixtral-8x7B
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def time_expert(dtype: torch.dtype, tokens: int, threads: int, repeats: int) -> tuple[float, float, float]:
    """Best (process CPU, calling-thread CPU, wall) seconds of one expert call over ``repeats``."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    w1, w3 = (torch.randn(FFN, HIDDEN, generator=gen).to(dtype) for _ in range(2))
    w2 = torch.randn(HIDDEN, FFN, generator=gen).to(dtype)
    x = torch.randn(tokens, HIDDEN, generator=gen).to(dtype)

    def expert():
        return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)

    expert()  # first call: allocation and kernel selection
    best = (float("inf"),) * 3
    for _ in range(repeats):
        p, t, w = time.process_time(), time.thread_time(), time.perf_counter()
        expert()
        best = min(best, (time.process_time() - p, time.thread_time() - t, time.perf_counter() - w))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,4", help="token counts (comma-separated)")
    parser.add_argument("--threads", default="1,2", help="torch.set_num_threads values (comma-separated)")
    parser.add_argument("--dtypes", default="bf16,fp32", help=f"any of {','.join(DTYPES)}")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{platform.processor() or platform.machine()}")
    flops_per_token = 2 * 3 * HIDDEN * FFN
    print("dtype  tokens  threads  process CPU ms  own-thread share  wall ms  GFLOP/s (CPU time)")
    for name in args.dtypes.split(","):
        for tokens in _ints(args.tokens):
            for threads in _ints(args.threads):
                cpu, own, wall = time_expert(DTYPES[name], tokens, threads, args.repeats)
                print(f"{name:5s}  {tokens:6d}  {threads:7d}  {cpu * 1e3:14.1f}  {own / cpu:16.2f}  "
                      f"{wall * 1e3:7.1f}  {flops_per_token * tokens / cpu / 1e9:8.2f}", flush=True)


if __name__ == "__main__":
    main()
