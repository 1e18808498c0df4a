"""The measurements behind a profile: each function times one family of operations over a grid and
returns a :class:`MeasuredSeries` (raw medians and spreads; fitting happens in :mod:`moesim.calib.fit`).
"""

from __future__ import annotations

import copy
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from moesim.calib.kernels import ExpertFFN, KernelInfo
from moesim.calib.layers import AttentionLayer, build_tiny_model, decode_call, prefill_call
from moesim.calib.profile import MeasuredSeries
from moesim.calib.timing import Budget, Timer, summarize
from moesim.calib.workload import prefill_work
from moesim.modelspec import ModelShape


@dataclass(frozen=True)
class Grids:
    """What to measure; :func:`grids_for` picks the full or the quick set."""

    expert_tokens: tuple[int, ...]
    cpu_expert_tokens: tuple[int, ...]
    cpu_threads: tuple[int, ...]
    copy_bytes: tuple[int, ...]
    decode: tuple[tuple[int, int], ...]  # (batch, context)
    prefill_tokens: tuple[int, ...]
    head_tokens: tuple[int, ...]
    budget_expert_s: float
    budget_cpu_expert_s: float
    budget_copy_s: float
    budget_non_expert_s: float
    budget_head_s: float
    complete: bool = False  # measure every grid point whatever the budgets (quick grids are small)


def _threads_grid(cores: int, quick: bool) -> tuple[int, ...]:
    if cores <= 2 or quick:
        return tuple(sorted({1, cores})) if not quick else (cores,)
    return tuple(sorted({1, cores // 2, cores}))


def grids_for(device: torch.device, quick: bool, cores: int) -> Grids:
    kib, mib = 2**10, 2**20
    if device.type == "cuda":
        if quick:
            return Grids(
                expert_tokens=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
                cpu_expert_tokens=(1, 2, 4, 8, 16),
                cpu_threads=_threads_grid(cores, True),
                copy_bytes=tuple(4**i * 16 * kib for i in range(0, 8)),  # 16 KiB .. 256 MiB
                decode=tuple((b, c) for b in (1, 8, 32) for c in (128, 1024, 4096)),
                prefill_tokens=(16, 64, 256, 1024, 2048),
                head_tokens=(1, 8, 64, 512),
                budget_expert_s=4, budget_cpu_expert_s=8, budget_copy_s=6, budget_non_expert_s=6, budget_head_s=2,
            )
        return Grids(
            expert_tokens=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048, 4096),
            cpu_expert_tokens=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
            cpu_threads=_threads_grid(cores, False),
            copy_bytes=tuple(2**i * 4 * kib for i in range(0, 18)),  # 4 KiB .. 512 MiB
            decode=tuple((b, c) for b in (1, 2, 4, 8, 16, 32, 64) for c in (16, 256, 1024, 2048, 4096, 8192)),
            prefill_tokens=(8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
            head_tokens=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            budget_expert_s=25, budget_cpu_expert_s=18, budget_copy_s=30, budget_non_expert_s=40, budget_head_s=10,
        )
    if quick:
        # Sparse but spanning the full grid's range (memory-bound 1 token to compute-bound 256), so the
        # fit sees both roofs. The quick repeat policy stops a series at its first clearly compute-bound
        # point, and the budgets stop adding points on a host so slow that even that takes long (a CPU
        # that emulates bf16 with AVX2 spends seconds on one 256-token expert call).
        return Grids(
            expert_tokens=(1, 2, 4, 16, 64, 256),
            cpu_expert_tokens=(1, 2, 4, 16, 64, 256),
            cpu_threads=_threads_grid(cores, True),
            copy_bytes=(64 * kib, 256 * kib, mib, 4 * mib, 16 * mib, 64 * mib),  # the full grid's lower end
            decode=((1, 128), (1, 2048), (4, 512), (8, 2048), (16, 256)),
            prefill_tokens=(16, 32, 64, 128, 256, 512),
            head_tokens=(1, 4, 16, 64, 256),
            budget_expert_s=8, budget_cpu_expert_s=8, budget_copy_s=3, budget_non_expert_s=14, budget_head_s=6,
        )
    return Grids(
        expert_tokens=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512),
        cpu_expert_tokens=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512),
        cpu_threads=_threads_grid(cores, False),
        copy_bytes=tuple(2**i * 64 * kib for i in range(0, 13)),  # 64 KiB .. 256 MiB
        decode=tuple((b, c) for b in (1, 2, 4, 8, 16) for c in (16, 256, 1024, 2048, 4096)),
        prefill_tokens=(8, 16, 32, 64, 128, 256, 512, 1024),
        head_tokens=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        budget_expert_s=40, budget_cpu_expert_s=30, budget_copy_s=30, budget_non_expert_s=50, budget_head_s=15,
    )


def last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 * 2**20))
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            path = os.path.join(base, entry, "size")
            if os.path.exists(path):
                text = open(path).read().strip()
                mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
                best = max(best, int(text.rstrip("KMG")) * mult)
    except OSError:
        pass
    return best or 32 * 2**20


def expert_series(key: str, shape: ModelShape, info: KernelInfo, device: torch.device, act_dtype: torch.dtype,
                  tokens: tuple[int, ...], timer: Timer, budget: Budget, threads: int | None) -> MeasuredSeries:
    """One expert FFN at the model's shape versus tokens routed to it.

    Several experts with distinct weights are cycled when one would fit in the last-level cache, so
    every call streams its weights from memory as a real MoE layer's consecutive experts do.
    """
    h, inter = shape.hidden_size, shape.expert_intermediate_size
    weight_bytes = shape.expert_params * info.weight_bits_per_param / 8
    copies = max(1, min(8, math.ceil(2 * last_level_cache_bytes(device) / max(weight_bytes, 1))))
    experts = [ExpertFFN(h, inter, info.kernel, device, act_dtype, seed=i, int8_mode=info.int8_mode)
               for i in range(copies)]
    counter = [0]
    gen = torch.Generator(device="cpu").manual_seed(7)

    def make(x):
        inp = torch.randn(int(x["tokens"]), h, generator=gen).to(device, act_dtype)

        def run():
            counter[0] = (counter[0] + 1) % copies
            return experts[counter[0]](inp)

        return run

    points = timer.grid([{"tokens": t} for t in tokens], make, budget, work=lambda x: x["tokens"])
    experts.clear()  # free the weights before the next series allocates its own
    return MeasuredSeries(
        key=key,
        description=f"one routed expert FFN (fused gate+up, SiLU product, down), {info.kernel}, versus tokens",
        shape=shape.to_dict(),
        params={"kernel": info.kernel, "library": info.library, "int8_mode": info.int8_mode,
                "weight_bits_per_param": info.weight_bits_per_param, "threads": threads, "device": str(device),
                "activation_dtype": str(act_dtype).replace("torch.", ""), "weight_copies_cycled": copies},
        points=tuple(points),
    )


def fastest_kernel(shape: ModelShape, infos: list[KernelInfo], device: torch.device, act_dtype: torch.dtype,
                   timer: Timer) -> tuple[KernelInfo, dict[str, float]]:
    """Of several implementations of one format, the fastest at 1 and 64 tokens (summed), with the times."""
    if len(infos) == 1:
        return infos[0], {}
    h, inter = shape.hidden_size, shape.expert_intermediate_size
    times = {}
    for info in infos:
        ffn = ExpertFFN(h, inter, info.kernel, device, act_dtype, int8_mode=info.int8_mode)
        total = 0.0
        for tokens in (1, 64):
            x = torch.randn(tokens, h).to(device, act_dtype)
            total += timer.point({}, lambda: ffn(x)).median_s
        times[info.library] = total
    best = min(infos, key=lambda i: times[i.library])
    return best, times


FLOOR_HIDDEN, FLOOR_INTERMEDIATE = 256, 512


def floor_series(key: str, info: KernelInfo, device: torch.device, act_dtype: torch.dtype, timer: Timer,
                 threads: int | None) -> MeasuredSeries:
    """The same kernel on a tiny expert: its time is the launch cost, the floor of every expert call."""
    ffn = ExpertFFN(FLOOR_HIDDEN, FLOOR_INTERMEDIATE, info.kernel, device, act_dtype, seed=99, int8_mode=info.int8_mode)
    gen = torch.Generator(device="cpu").manual_seed(8)

    def make(x):
        inp = torch.randn(int(x["tokens"]), FLOOR_HIDDEN, generator=gen).to(device, act_dtype)
        return lambda: ffn(inp)

    points = timer.grid([{"tokens": 1.0}, {"tokens": 4.0}], make, Budget(0.0), min_points=2)
    return MeasuredSeries(
        key=f"floor/{key}", description=f"launch floor: the {info.kernel} expert kernel on a tiny "
                                        f"{FLOOR_HIDDEN}x{FLOOR_INTERMEDIATE} expert",
        shape=None, params={"kernel": info.kernel, "library": info.library, "hidden": FLOOR_HIDDEN,
                            "intermediate": FLOOR_INTERMEDIATE, "threads": threads, "device": str(device)},
        points=tuple(points),
    )


# ------------------------------------------------------------------------------------------ copies


class CopyBench:
    """Copies between the host and the device (on CPU: two separate memory regions).

    CUDA: ``Tensor.copy_`` between a pinned or pageable host buffer and device memory on a dedicated
    stream, timed with CUDA events around it (a pageable copy returns only when done, so its events
    bracket the driver's staging too). CPU: "pinned" is one memcpy between two pre-faulted buffers; "pageable" copies
    through a 4 MiB bounce buffer in chunks, the path a CUDA driver takes for pageable memory.
    Concurrent copies on CUDA run the two directions from two threads released together, each timed
    on its own; on CPU the timed direction runs against a partner thread that copies the other way
    for as long as the timed copies last (:class:`_Partner`).
    """

    STAGING = 4 * 2**20

    def __init__(self, device: torch.device, max_bytes: int):
        self.device = device
        cuda = device.type == "cuda"
        if not cuda:
            # Each CPU copy reads and writes memory not touched since the last lap over buffers of several
            # times the last-level cache: an engine copies a different expert each time, never a cached one.
            max_bytes = max(max_bytes, 4 * last_level_cache_bytes(device))
        self.max_bytes = max_bytes
        self.offsets = {"h2d": 0, "d2h": 0}
        self.host = {
            True: torch.empty(max_bytes, dtype=torch.uint8, pin_memory=cuda).fill_(1),
            False: torch.empty(max_bytes, dtype=torch.uint8).fill_(2),
        }
        self.host_out = {
            True: torch.empty(max_bytes, dtype=torch.uint8, pin_memory=cuda).fill_(3),
            False: torch.empty(max_bytes, dtype=torch.uint8).fill_(4),
        }
        self.dev_in = torch.empty(max_bytes, dtype=torch.uint8, device=device).fill_(5)
        self.dev_out = torch.empty(max_bytes, dtype=torch.uint8, device=device).fill_(6)
        self.staging = torch.empty(self.STAGING, dtype=torch.uint8).fill_(7) if not cuda else None
        self.streams = {d: torch.cuda.Stream(device) for d in ("h2d", "d2h")} if cuda else {}

    def _copy(self, direction: str, pinned: bool, n: int) -> float:
        """One copy of ``n`` bytes; returns its time (CUDA events on its stream; wall clock on CPU)."""
        off = 0
        if self.device.type == "cpu":
            off = self.offsets[direction]
            if off + n > self.max_bytes:
                off = 0
            self.offsets[direction] = off + -(-n // 4096) * 4096
        if direction == "h2d":
            src, dst = self.host[pinned][off:off + n], self.dev_in[off:off + n]
        else:
            src, dst = self.dev_out[off:off + n], self.host_out[pinned][off:off + n]
        if self.device.type == "cuda":
            stream = self.streams[direction]
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(stream):
                start.record(stream)
                dst.copy_(src, non_blocking=pinned)
                end.record(stream)
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        if pinned:
            dst.copy_(src)
        else:
            for off in range(0, n, self.STAGING):
                m = min(self.STAGING, n - off)
                self.staging[:m].copy_(src[off:off + m])
                dst[off:off + m].copy_(self.staging[:m])
        return time.perf_counter() - t0

    def time_alone(self, direction: str, pinned: bool, n: int) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self._copy(direction, pinned, n)

    def time_concurrent(self, pinned: bool, n: int) -> tuple[float, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        barrier = threading.Barrier(2)
        out: dict[str, float] = {}

        def work(direction: str):
            barrier.wait()
            out[direction] = self._copy(direction, pinned, n)

        threads = [threading.Thread(target=work, args=(d,)) for d in ("h2d", "d2h")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out["h2d"], out["d2h"]


class _Partner:
    """A thread that calls ``fn`` until stopped (entered once it has finished one call): the load that a
    timed copy or FFN runs against.

    Timing one copy against a partner started at the same instant (a barrier) overlaps them only in
    part when thread wake-up jitter is comparable to the copy (always, for small copies on a CPU); a
    partner already running when the timed calls start, and still running when they end, measures
    what the simulator asks for: a copy's time while the other direction (or compute) is busy.
    """

    def __init__(self, fn: Callable[[], object]):
        self.fn = fn
        self.stop = threading.Event()
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.fn()
            self.started.set()

    def __enter__(self) -> "_Partner":
        self.thread.start()
        self.started.wait()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def cpu_copy_point(bench: CopyBench, pinned: bool, n: int, policy) -> dict[str, list[float]]:
    """CPU, one copy size: per direction a warm-up copy then a block of timed copies, alone and against a
    running partner. Returns the samples by series key (one size is one unit of a resumable calibration)."""
    per_block = max(policy.min_repeats, min(policy.max_repeats, 11))
    tag = "pinned" if pinned else "pageable"
    samples: dict[str, list[float]] = {}
    for direction in ("h2d", "d2h"):
        bench.time_alone(direction, pinned, n)
        samples[f"copy/{direction}/{tag}/alone"] = [bench.time_alone(direction, pinned, n) for _ in range(per_block)]
        other = "d2h" if direction == "h2d" else "h2d"
        with _Partner(lambda: bench._copy(other, pinned, n)):
            bench.time_alone(direction, pinned, n)
            # twice the samples: sharing the memory bus (and the GIL between copies) spreads them more
            samples[f"copy/{direction}/{tag}/concurrent"] = [
                bench.time_alone(direction, pinned, n) for _ in range(2 * per_block)]
    return samples


def cuda_copy_samples(bench: CopyBench, sizes: tuple[int, ...], policy, budget: Budget) -> dict[str, dict[int, list[float]]]:
    """CUDA: every size warmed up, then passes over all sizes (alone per direction, and both directions
    together) until the repeat policy and the budget are met."""
    samples: dict[str, dict[int, list[float]]] = {}
    for pinned in (True, False):
        tag = "pinned" if pinned else "pageable"
        for n in sizes:
            for _ in range(policy.warmup):
                bench.time_alone("h2d", pinned, n)
                bench.time_alone("d2h", pinned, n)
                bench.time_concurrent(pinned, n)
        reps = 0
        spent0 = budget.spent
        while True:
            for n in sizes:
                for direction in ("h2d", "d2h"):
                    samples.setdefault(f"copy/{direction}/{tag}/alone", {}).setdefault(n, []).append(
                        bench.time_alone(direction, pinned, n))
                a, b = bench.time_concurrent(pinned, n)
                samples.setdefault(f"copy/h2d/{tag}/concurrent", {}).setdefault(n, []).append(a)
                samples.setdefault(f"copy/d2h/{tag}/concurrent", {}).setdefault(n, []).append(b)
            reps += 1
            spent = budget.spent - spent0
            if reps >= policy.max_repeats or (reps >= policy.min_repeats
                                              and (spent >= budget.seconds / 2 or budget.exhausted)):
                break
    return samples


def copy_series_from_samples(device: torch.device, samples: dict[str, dict[int, list[float]]],
                             threads: int) -> list[MeasuredSeries]:
    """One series per (direction, pinned or pageable, alone or concurrent), points in byte order."""
    out = []
    kind = "memcpy between two host memory regions" if device.type == "cpu" else "host <-> CUDA device"
    for key, per_size in samples.items():
        _, direction, tag, mode = key.split("/")
        out.append(MeasuredSeries(
            key=key, description=f"{direction} copy ({kind}), {tag}, {mode}, versus bytes", shape=None,
            params={"device": str(device), "direction": direction, "pinned": tag == "pinned",
                    "concurrent": mode == "concurrent", "threads": threads},
            points=tuple(summarize({"bytes": float(n)}, s) for n, s in sorted(per_size.items())),
        ))
    return out


def copy_series(device: torch.device, sizes: tuple[int, ...], timer: Timer, budget: Budget) -> list[MeasuredSeries]:
    """Every copy series in one go (a resumable calibration measures the CPU sizes one by one instead)."""
    bench = CopyBench(device, max(sizes))
    samples: dict[str, dict[int, list[float]]] = {}
    if device.type == "cpu":
        for pinned in (True, False):
            for n in sizes:
                for key, s in cpu_copy_point(bench, pinned, n, timer.policy).items():
                    samples.setdefault(key, {})[n] = s
    else:
        samples = cuda_copy_samples(bench, sizes, timer.policy, budget)
    return copy_series_from_samples(device, samples, torch.get_num_threads())


INTERFERENCE_REPEATS = 9


def interference_series(shape: ModelShape, info: KernelInfo, device: torch.device, act_dtype: torch.dtype,
                        threads: int) -> list[MeasuredSeries]:
    """CPU as the device: a decode expert FFN (1 token) with and without a host->device copy of one expert
    running in another thread, and that copy with and without the FFN running.

    On a GPU the copy engines and the SMs are separate hardware; on a CPU standing in for the device the
    "copy engine" is a thread sharing the memory bus, and the cores, with the compute: in the first
    CPU validation run the engine's FFNs ran 20-35% slower and its copies twice as slow while the other
    was busy. Each timed
    call overlaps a partner that runs for the whole block (see :class:`_Partner`).
    """
    h, inter = shape.hidden_size, shape.expert_intermediate_size
    nbytes = int(shape.expert_params * info.weight_bits_per_param / 8)
    ffn = ExpertFFN(h, inter, info.kernel, device, act_dtype, seed=11, int8_mode=info.int8_mode)
    x = torch.randn(1, h, generator=torch.Generator().manual_seed(3)).to(device, act_dtype)
    bench = CopyBench(device, nbytes)

    def ffn_time() -> float:
        t0 = time.perf_counter()
        ffn(x)
        return time.perf_counter() - t0

    def block(fn) -> list[float]:
        fn()
        return [fn() for _ in range(INTERFERENCE_REPEATS)]

    copy = lambda: bench.time_alone("h2d", True, nbytes)  # noqa: E731
    compute = {0.0: block(ffn_time)}
    with _Partner(lambda: bench._copy("h2d", True, nbytes)):
        compute[1.0] = block(ffn_time)
    copies = {0.0: block(copy)}
    with _Partner(lambda: ffn(x)):
        copies[1.0] = block(copy)
    common = {"kernel": info.kernel, "threads": threads, "copy_bytes": nbytes, "device": str(device)}
    return [
        MeasuredSeries(key="interference/compute", shape=shape.to_dict(), params=common,
                       description="1-token expert FFN alone (partner 0) and while a host->device copy of one "
                                   "expert runs in another thread (partner 1)",
                       points=tuple(summarize({"partner": k}, v) for k, v in compute.items())),
        MeasuredSeries(key="interference/copy", shape=shape.to_dict(), params=common,
                       description="host->device copy of one expert alone (partner 0) and while 1-token expert "
                                   "FFNs run in another thread (partner 1)",
                       points=tuple(summarize({"partner": k}, v) for k, v in copies.items())),
    ]


# ------------------------------------------------------------------------------------------ non-expert


def decode_series(al: AttentionLayer, shape: ModelShape, grid: tuple[tuple[int, int], ...], timer: Timer,
                  budget: Budget) -> MeasuredSeries:
    xs = sorted(({"batch": float(b), "context": float(c)} for b, c in grid),
                key=lambda x: x["batch"] * (x["context"] + 512))
    points = timer.grid(xs, lambda x: decode_call(al, int(x["batch"]), int(x["context"])), budget)
    return MeasuredSeries(
        key="non_expert/bf16/decode",
        description="one decoder layer without its routed experts (norms, attention with KV cache, router), "
                    "one new token for each of `batch` sequences at KV length `context`",
        shape=shape.to_dict(),
        params={"layer_idx": al.layer_idx, "dtype": str(al.dtype).replace("torch.", ""), "attention": "sdpa",
                "threads": torch.get_num_threads()},
        points=tuple(points),
    )


def prefill_series(al: AttentionLayer, shape: ModelShape, tokens: tuple[int, ...], timer: Timer,
                   budget: Budget) -> MeasuredSeries:
    points = timer.grid([{"tokens": float(t)} for t in tokens], lambda x: prefill_call(al, int(x["tokens"])), budget,
                        work=lambda x: float(prefill_work(shape, x["tokens"]).flops))
    return MeasuredSeries(
        key="non_expert/bf16/prefill",
        description="one decoder layer without its routed experts over a prompt of `tokens` tokens (causal)",
        shape=shape.to_dict(),
        params={"layer_idx": al.layer_idx, "dtype": str(al.dtype).replace("torch.", ""), "attention": "sdpa",
                "threads": torch.get_num_threads()},
        points=tuple(points),
    )


class DeviceClock:
    """The GPU's own time for work whose host side is slower than its kernels.

    A decoder layer at decode is launch-bound: timed with a synchronisation around each call (as
    :class:`Timer` does) it takes the host's launch time, and its kernels finish long before that. In a
    real decode loop the host launches the next layer while the GPU still works on the previous one's
    copies and experts, so the two parts overlap. The kernels' own time is read from the CUDA profiler
    (CUPTI through ``torch.profiler``): the sum of the durations of the kernels and device copies one
    call launches, which is how long the call keeps a GPU busy when its launches are hidden. (Holding the
    GPU with a sleep kernel while the host issues the call does not work for a Hugging Face decoder layer:
    it synchronises inside a call, found on an H100 with transformers 5.17.)"""

    def __init__(self, device: torch.device):
        self.device = device

    def once(self, fn: Callable[[], object], calls: int = 5) -> float | None:
        """Seconds of GPU kernels per call of ``fn`` (mean of ``calls``), or None if the profiler saw none."""
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize(self.device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize(self.device)
        total_us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
        return total_us / calls / 1e6 if total_us > 0 else None


def device_time_series(wall: MeasuredSeries, make_call: Callable[[dict[str, float]], Callable[[], object]],
                       clock: DeviceClock, repeats: int = 5) -> MeasuredSeries | None:
    """The kernel time of each point of ``wall`` (a series timed host to host), its key prefixed
    ``non_expert_device/``; None when the profiler timed fewer than 4 points."""
    points = []
    for p in wall.points:
        fn = make_call(p.x)
        fn()
        fn()
        samples = []
        for _ in range(repeats):
            t = clock.once(fn)
            if t is None:
                break
            samples.append(t)
        if len(samples) == repeats:
            points.append(summarize(p.x, samples))
    if len(points) < 4:
        return None
    return MeasuredSeries(
        key=wall.key.replace("non_expert/", "non_expert_device/", 1),
        description="the GPU's kernel time of " + wall.description + " (the durations of the kernels one call "
                    "launches, summed: the host's launch time hidden)",
        shape=wall.shape, params=dict(wall.params) | {"timed": "kernel durations (torch.profiler, CUDA activity)"},
        points=tuple(points),
    )


def decode_device_series(al: AttentionLayer, wall: MeasuredSeries, clock: DeviceClock) -> MeasuredSeries | None:
    return device_time_series(wall, lambda x: decode_call(al, int(x["batch"]), int(x["context"])), clock)


def prefill_device_series(al: AttentionLayer, wall: MeasuredSeries, clock: DeviceClock) -> MeasuredSeries | None:
    return device_time_series(wall, lambda x: prefill_call(al, int(x["tokens"])), clock)


class _RMSNorm(torch.nn.Module):
    def __init__(self, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def head_series(shape: ModelShape, device: torch.device, dtype: torch.dtype, tokens: tuple[int, ...], timer: Timer,
                budget: Budget) -> MeasuredSeries:
    """Final RMSNorm, lm_head and greedy argmax over ``tokens`` rows at the model's vocabulary size."""
    g = torch.Generator(device="cpu").manual_seed(11)
    lm_head = (torch.randn(shape.vocab_size, shape.hidden_size, generator=g) * shape.hidden_size ** -0.5)
    lm_head = lm_head.to(device, dtype)
    norm = _RMSNorm(shape.hidden_size).to(device, dtype)

    def make(x):
        hidden = torch.randn(int(x["tokens"]), shape.hidden_size, generator=g).to(device, dtype)

        def run():
            with torch.no_grad():
                return F.linear(norm(hidden), lm_head).argmax(dim=-1)

        return run

    points = timer.grid([{"tokens": float(t)} for t in tokens], make, budget, work=lambda x: x["tokens"])
    return MeasuredSeries(
        key="head", description="final norm + lm_head + argmax versus rows", shape=shape.to_dict(),
        params={"dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads()}, points=tuple(points),
    )


# ------------------------------------------------------------------------------------------ overheads


@dataclass(frozen=True)
class Overheads:
    layer_s: float
    step_s: float
    series: tuple[MeasuredSeries, ...]
    note: str


def overhead_series(tiny_cfg, device: torch.device, dtype: torch.dtype, timer: Timer,
                    statistic: str = "median") -> Overheads:
    """Fixed Python/launch costs, measured on the model's architecture shrunk to tiny widths.

    * ``step``: whole tiny models with few and with more decoder layers each run one-token forward
      steps plus greedy argmax; the step time is a straight line in the number of layers, and its
      intercept (minus a tiny norm + lm_head call, which the head model's latency covers) is the
      per-step cost: embedding, cache and mask set-up, model-level bookkeeping.
    * ``layer``: the slope (one decoder layer inside the model) minus the same layer with its routed
      experts removed (the non-expert model's latency covers that part) minus top_k tiny expert FFNs
      (the expert model's latency covers those): what is left is the MoE block's routing bookkeeping.
    Both are clamped at zero (on a GPU the launch costs of a tiny layer can already exceed what the
    separate models' latencies leave).
    """
    from moesim.calib.layers import NoExperts, _decoder_layers, _rotary, decoder_step, tiny_config
    from moesim.modelspec import find_moe_layers

    text = getattr(tiny_cfg, "text_config", None) or tiny_cfg
    total_layers = int(text.num_hidden_layers)
    probe = build_tiny_model(tiny_cfg, torch.device("meta"), dtype)
    first_moe = find_moe_layers(probe)[0][0]
    del probe
    few = first_moe + 1
    more = min(total_layers, few + 6)
    models = {n: build_tiny_model(tiny_config(tiny_cfg, n), device, dtype) for n in sorted({few, more})}
    model = models[few]
    hidden_size = int(text.hidden_size)
    layers = _decoder_layers(model)
    idx, block = find_moe_layers(model)[0]
    layer = layers[idx]
    top_k = int(getattr(block, "top_k", None) or getattr(text, "num_experts_per_tok", 2))
    hidden = torch.randn(1, 1, hidden_size).to(device, dtype)
    positions = torch.tensor([[16]], device=device)
    rot = _rotary(model)
    pe = rot(hidden, positions) if rot is not None else None
    bare = copy.copy(layer)  # the same modules, but a MoE block whose experts do nothing
    bare_block = copy.copy(block)
    bare_block.experts = NoExperts()
    for name, child in layer.named_children():
        if child is block:
            setattr(bare, name, bare_block)

    def layer_call(mod):
        return decoder_step(mod, hidden, pe, positions, idx, 16)

    inter = int(getattr(text, "moe_intermediate_size", None) or getattr(text, "intermediate_size", 64))
    ffn = ExpertFFN(hidden_size, inter, "bf16", device, dtype)
    x1 = torch.randn(1, hidden_size).to(device, dtype)
    ids = torch.tensor([[5]], device=device)

    def step_call(m):
        def run():
            with torch.no_grad():
                return m(input_ids=ids, use_cache=True).logits[:, -1].argmax(-1)
        return run

    head_w = torch.randn(int(text.vocab_size), hidden_size).to(device, dtype)
    norm = _RMSNorm(hidden_size).to(device, dtype)

    def run_head():
        with torch.no_grad():
            return F.linear(norm(x1), head_w).argmax(-1)

    calls = {0.0: layer_call(layer), 1.0: layer_call(bare), 2.0: lambda: ffn(x1), 3.0: run_head}
    for n, m in models.items():
        calls[100.0 + n] = step_call(m)
    # tiny shapes warm up slowly (oneDNN/cuBLAS pick kernels per shape): extra warm-up calls
    for fn in calls.values():
        for _ in range(3):
            fn()
    pts = timer.grid([{"what": k} for k in calls], lambda x: calls[x["what"]], Budget(0.0), min_points=len(calls))
    by = {p.x["what"]: p for p in pts}
    v = lambda key: by[key].value(statistic)
    if more > few:
        per_layer = (v(100.0 + more) - v(100.0 + few)) / (more - few)
    else:
        per_layer = v(0.0)
    intercept = v(100.0 + few) - few * per_layer
    layer_s = max(0.0, per_layer - v(1.0) - top_k * v(2.0))
    step_s = max(0.0, intercept - v(3.0))
    series = MeasuredSeries(
        key="overhead",
        description="tiny-width model of the same architecture: x.what 0 = MoE decoder layer alone, 1 = the layer "
                    "without routed experts, 2 = one expert FFN, 3 = norm + lm_head + argmax, 100+L = whole-model "
                    "one-token step with L decoder layers + argmax",
        shape=None,
        params={"layers_timed": sorted(models), "top_k": top_k, "hidden_size": hidden_size,
                "threads": torch.get_num_threads(), "statistic": statistic},
        points=tuple(pts),
    )
    note = (f"{statistic} times on a tiny-width {text.model_type}: step = {few} layers {v(100.0 + few) * 1e6:.0f} us, "
            f"{more} layers {v(100.0 + more) * 1e6:.0f} us -> {per_layer * 1e6:.0f} us per layer, intercept "
            f"{intercept * 1e6:.0f} us - head {v(3.0) * 1e6:.0f} us = step overhead; layer overhead = per layer - "
            f"layer without experts {v(1.0) * 1e6:.0f} us - {top_k} x expert FFN {v(2.0) * 1e6:.0f} us")
    return Overheads(layer_s, step_s, (series,), note)
