"""Fitting and test data: which configurations to simulate, and the simulator runs, cached on disk.

Sampling (per trace x profile group, so every group is covered alike): every preset the same number
of times (stratified over presets), and a Latin hypercube over the other knobs — cache size (log-uniform
over 0..E experts per layer, since small caches are where the choices differ most), expert format,
non-expert format and batch size — so each knob's range is covered evenly without a full grid. The fit
plan and the test plan use different seeds, and a test configuration that happens to equal a fit
configuration is dropped from the test set, so the test set holds only configurations never used in
fitting.

Runs go through the sweep machinery (:func:`moesim.simulator.sweep.run_sweep`: parallel over cores,
resumable journal) into ``$MOESIM_CACHE_DIR/costmodel/runs/<moesim hash>/<trace>-<hash>/<profile>-<hash>/``
so a changed trace, profile or simulator reruns exactly the runs it affects.
Runs use an unlimited GPU memory budget: the timing of a configuration does not depend on the budget
once its cache size is given, and memory is predicted by arithmetic (:mod:`moesim.costmodel.memory`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from moesim.content import file_sha256, simulator_version
from moesim.diskcache import cache_dir
from moesim.simulator.identity import profile_file, trace_sha256
from moesim.costmodel.space import EXPERT_FORMATS, ConfigSet

UNLIMITED_GPU_MEM = 2**40
SAMPLED_BATCHES = (1, 1, 2, 4)  # batch 1 most often: it is the common offloading case
SAMPLED_NON_EXPERT = (None, None, "16", "8", "4")  # the trace's own format most often


# ---- versions --------------------------------------------------------------------------------------
# The training targets' versions are the content identities the sweep store keys its results by: the
# simulator's sources (``moesim_hash``), and a trace's and a profile's file hashes.
moesim_hash = simulator_version
trace_hash = trace_sha256


def profile_hash(spec: str) -> str:
    return file_sha256(profile_file(spec))


def cache_root() -> Path:
    """The cost model's folder in moesim's one on-disk cache (``$MOESIM_CACHE_DIR``, else ~/.cache/moesim)."""
    return cache_dir() / "costmodel"


# ---- sampling --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GroupPlan:
    """Configurations to simulate for one trace on one profile."""

    trace: str
    profile: str
    configs: ConfigSet


def latin_hypercube(n: int, dims: int, rng: np.random.Generator) -> np.ndarray:
    """[n, dims] in [0, 1): each dimension's n strata hit exactly once, in an independent random order."""
    u = (np.arange(n)[:, None] + rng.random((n, dims))) / n
    for d in range(dims):
        u[:, d] = u[rng.permutation(n), d]
    return u


def sample_group(trace: str, profile: str, num_experts: int, presets: Sequence[str], per_preset: int,
                 seed: int) -> GroupPlan:
    key = f"{seed}|{trace}|{profile}".encode()
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
    n = len(presets) * per_preset
    u = latin_hypercube(n, 4, rng)
    cache = np.clip(np.round(np.power(num_experts + 1.0, u[:, 0]) - 1.0), 0, num_experts).astype(int)
    ebits = [EXPERT_FORMATS[int(x * len(EXPERT_FORMATS))] for x in u[:, 1]]
    nbits = [SAMPLED_NON_EXPERT[int(x * len(SAMPLED_NON_EXPERT))] for x in u[:, 2]]
    batch = [SAMPLED_BATCHES[int(x * len(SAMPLED_BATCHES))] for x in u[:, 3]]
    pols = [p for p in presets for _ in range(per_preset)]
    pols = [pols[i] for i in rng.permutation(n)]
    rows = [(pols[i], int(cache[i]), ebits[i], nbits[i], int(batch[i])) for i in range(n)]
    return GroupPlan(trace, profile, ConfigSet.from_rows(rows, policies=tuple(presets)))


def make_plan(traces: Sequence[str], profiles: Sequence[str], presets: Sequence[str], per_preset: int,
              seed: int, exclude: Optional[dict[tuple[str, str], set]] = None) -> list[GroupPlan]:
    from moesim.traces import resolve_trace
    from moesim.tracer import read_trace_meta

    plans = []
    for t in traces:
        E = read_trace_meta(resolve_trace(t)).num_experts
        for p in profiles:
            g = sample_group(t, p, E, presets, per_preset, seed)
            if exclude and (t, p) in exclude:
                drop = exclude[(t, p)]
                keep = [i for i, r in enumerate(g.configs.rows()) if r not in drop]
                g = GroupPlan(t, p, g.configs.take(np.asarray(keep, dtype=int)))
            plans.append(g)
    return plans


# ---- runs ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSet:
    """Simulated configurations of one (trace, profile) group and their result rows (sweep rows)."""

    trace: str
    profile: str
    trace_sha256: str
    profile_sha256: str
    configs: ConfigSet
    rows: list[dict]


def group_dir(trace: str, profile: str) -> Path:
    from moesim.simulator.sweep import trace_label

    return (cache_root() / "runs" / moesim_hash()[:16] / f"{trace_label(trace)}-{trace_hash(trace)[:12]}"
            / f"{Path(profile).stem}-{profile_hash(profile)[:12]}")


def run_group(plan: GroupPlan, jobs: int = 0, progress: bool = False) -> RunSet:
    """Simulate a group's configurations (cached runs are read back, the rest run in parallel)."""
    from moesim.costmodel.space import sweep_point
    from moesim.simulator.sweep import point_keys, run_sweep

    points = [sweep_point(plan.trace, plan.profile, r, UNLIMITED_GPU_MEM) for r in plan.configs.rows()]
    rows = run_sweep(points, group_dir(plan.trace, plan.profile), jobs=jobs, progress=progress)
    by_key = {r["point_key"]: r for r in rows}
    ordered = [by_key[k] for k in point_keys(points)]
    return RunSet(plan.trace, plan.profile, trace_hash(plan.trace), profile_hash(plan.profile), plan.configs,
                  ordered)


def run_plan(plans: Sequence[GroupPlan], jobs: int = 0, progress: bool = False, log=None) -> list[RunSet]:
    out = []
    for i, g in enumerate(plans):
        if log is not None:
            log(f"[{i + 1}/{len(plans)}] {g.trace} on {g.profile}: {len(g.configs)} configurations")
        out.append(run_group(g, jobs=jobs, progress=progress))
    return out


def cached_rows(plan: GroupPlan) -> Optional[RunSet]:
    """The group's runs if every one of them is already cached; None otherwise (nothing is run)."""
    from moesim.costmodel.space import sweep_point
    from moesim.simulator.sweep import point_keys, read_store

    done = read_store(group_dir(plan.trace, plan.profile))
    keys = point_keys([sweep_point(plan.trace, plan.profile, r, UNLIMITED_GPU_MEM) for r in plan.configs.rows()])
    if any(k not in done for k in keys):
        return None
    return RunSet(plan.trace, plan.profile, trace_hash(plan.trace), profile_hash(plan.profile), plan.configs,
                  [done[k] for k in keys])


def finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)
