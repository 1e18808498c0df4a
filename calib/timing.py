"""Timing one operation robustly: warm-up, then repeats until a count and a time budget are met.

The machine may be shared (other processes on the same cores), so each point reports the median of
its repeats and the 10th/90th percentiles as its spread; the median is what fits use. On CUDA the
time is taken with CUDA events around the operation on its stream (GPU time, launch queue included
only when the GPU waits for it); on CPU with ``time.perf_counter``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from moesim.calib.profile import MeasuredPoint


@dataclass(frozen=True)
class RepeatPolicy:
    warmup: int = 2
    min_repeats: int = 5
    max_repeats: int = 50
    min_time_s: float = 0.2  # keep repeating until this much time is spent (after min_repeats)
    warmup_s: float = 0.5  # and warm up for at least this long before each grid
    # A point whose warm-up call takes longer than costly_s is warmed up once and timed costly_repeats
    # times: on a CPU that emulates bf16 (AVX2) one 256-token expert call takes seconds, and its spread
    # is small next to the fast points' anyway.
    costly_s: float = math.inf
    costly_repeats: int = 3
    # Stop adding costlier points once one is clearly compute-bound (its time grows with its work): the
    # roofline's compute roof is then fixed, and the costlier points only extend a straight line.
    stop_when_compute_bound: bool = False

    @classmethod
    def quick(cls) -> "RepeatPolicy":
        return cls(warmup=2, min_repeats=5, max_repeats=15, min_time_s=0.05, warmup_s=0.3, costly_s=0.4,
                   costly_repeats=3, stop_when_compute_bound=True)


class Timer:
    def __init__(self, device: torch.device, policy: RepeatPolicy):
        self.device = device
        self.policy = policy

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def samples(self, fn: Callable[[], object], setup: Callable[[], object] | None = None) -> list[float]:
        """Seconds per call of ``fn``; ``setup`` runs untimed before each call."""
        p = self.policy
        for _ in range(p.warmup):
            if setup:
                setup()
            fn()
        self.sync()
        out: list[float] = []
        spent = 0.0
        while len(out) < p.min_repeats or (spent < p.min_time_s and len(out) < p.max_repeats):
            if setup:
                setup()
            dt = self.once(fn)
            out.append(dt)
            spent += dt
        return out

    def point(self, x: dict[str, float], fn: Callable[[], object], setup: Callable[[], object] | None = None) -> MeasuredPoint:
        return summarize(x, self.samples(fn, setup))

    def once(self, fn: Callable[[], object]) -> float:
        """One timed call (GPU time via events on CUDA)."""
        if self.device.type == "cuda":
            self.sync()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def grid(self, xs: list[dict[str, float]], make_call: Callable[[dict[str, float]], Callable[[], object]],
             budget: "Budget", min_points: int = 4,
             work: Callable[[dict[str, float]], float] | None = None) -> list[MeasuredPoint]:
        """Time every grid point, interleaved: each pass times every point once.

        Interleaving spreads a burst of contention from other processes over all points instead of
        spoiling a few. ``xs`` should be ordered by cost; once ``budget`` is spent no further (costlier)
        points are added, but at least ``min_points`` are kept. ``work`` (the point's FLOPs, or anything
        proportional) lets a policy with ``stop_when_compute_bound`` stop growing the grid at the first
        point whose time grows with its work.
        """
        calls, estimates = self._warmed_calls(xs, make_call, budget, min_points, work)
        p = self.policy
        # Warm up by time as well as by count: launch-bound calls (Python driving small kernels) ran up
        # to a third slower in a cold run than after a few seconds of work (CPU clock ramp, caches).
        t0 = time.perf_counter()
        while calls and time.perf_counter() - t0 < p.warmup_s:
            calls[0][1]()
        self.sync()
        costly = [est > p.costly_s for est in estimates]
        need = [p.costly_repeats if c else p.min_repeats for c in costly]
        cap = [p.costly_repeats if c else p.max_repeats for c in costly]
        samples: list[list[float]] = [[] for _ in calls]
        spent = 0.0
        while calls:
            # An untimed call opens each pass: the first timed call after the costliest point of the
            # previous pass ran measurably slower on an H100 (allocator and clock transitions).
            calls[0][1]()
            self.sync()
            for i, (_, fn) in enumerate(calls):
                if len(samples[i]) < cap[i]:
                    dt = self.once(fn)
                    samples[i].append(dt)
                    spent += dt
            if all(len(s) >= c for s, c in zip(samples, cap)):
                break
            if all(len(s) >= n for s, n in zip(samples, need)) and (spent >= p.min_time_s * len(calls)
                                                                     or budget.exhausted):
                break
        return [summarize(x, s) for (x, _), s in zip(calls, samples)]

    def _warmed_calls(self, xs, make_call, budget: "Budget", min_points: int, work):
        """The grid's calls, each warmed up, with the time of its last warm-up call (the cost estimate)."""
        p = self.policy
        calls: list[tuple[dict[str, float], Callable[[], object]]] = []
        estimates: list[float] = []
        compute_bound = False
        for x in xs:
            if len(calls) >= min_points and (compute_bound or (budget.exhausted and not budget.complete)):
                break
            fn = make_call(x)
            estimate = 0.0
            for _ in range(p.warmup):
                estimate = self.once(fn)
                if estimate > p.costly_s:
                    break  # one warm-up of a costly call is enough
            self.sync()
            if p.stop_when_compute_bound and work is not None and calls:
                px, prev = calls[-1][0], estimates[-1]
                growth = work(x) / max(work(px), 1e-30)
                # the time grew nearly as much as the work: this point sits on the compute roof
                compute_bound = growth >= 2 and estimate >= 0.8 * growth * prev
            calls.append((x, fn))
            estimates.append(estimate)
        return calls, estimates


def summarize(x: dict[str, float], samples: list[float]) -> MeasuredPoint:
    a = np.asarray(samples, dtype=np.float64)
    return MeasuredPoint(
        x={k: float(v) for k, v in x.items()},
        median_s=float(np.median(a)),
        p10_s=float(np.percentile(a, 10)),
        p90_s=float(np.percentile(a, 90)),
        repeats=int(a.size),
        min_s=float(a.min()),
    )


class Budget:
    """Wall-clock allowance for one measured series: stop growing the grid once it is spent."""

    def __init__(self, seconds: float, complete: bool = False):
        self.seconds = seconds
        self.complete = complete  # never drop grid points, only cap the repeats
        self.start = time.perf_counter()

    @property
    def spent(self) -> float:
        return time.perf_counter() - self.start

    @property
    def exhausted(self) -> bool:
        return self.spent >= self.seconds
