"""``moesim sweep --screen``: skip the grid's configurations the cost model predicts are dominated.

A configuration is *predicted dominated* when another configuration of the same grid — same trace,
profile, expert format, non-expert format and batch size, so the same quality and the same workload —
is predicted to need no more peak GPU memory (exact arithmetic) and to be faster in TPOT by more than
``margin`` (default 5%, several times the cost model's held-out error, so a skip is a safe bet).
Oracle presets (Belady) are bounds, not choices: they never dominate anything and are never skipped.
Points sized by ``--gpu-mem`` instead of a cache size, and points the model cannot predict (a kernel the
profile lacks), are always kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from moesim.costmodel.space import ConfigSet

DEFAULT_MARGIN = 0.05


@dataclass(frozen=True)
class ScreenResult:
    kept: list  # SweepPoints to simulate, in grid order
    skipped: list  # SweepPoints predicted dominated
    unscreened: int  # points kept because they could not be predicted
    margin: float

    def summary(self) -> str:
        total = len(self.kept) + len(self.skipped)
        extra = f"; {self.unscreened} could not be screened and run anyway" if self.unscreened else ""
        return (f"screen: the cost model predicts {len(self.skipped)} of {total} configurations are dominated "
                f"(another one of the same trace, profile, formats and batch is >{100 * self.margin:.0f}% faster "
                f"in TPOT with no more GPU memory); skipping them, running {len(self.kept)}{extra}")


def dominated_mask(tpot: np.ndarray, memory: np.ndarray, can_dominate: np.ndarray, margin: float) -> np.ndarray:
    """For one comparable group: True where some ``can_dominate`` row needs no more memory and is faster
    than this row's TPOT / (1 + margin)."""
    n = len(tpot)
    out = np.zeros(n, dtype=bool)
    ok = np.isfinite(tpot) & np.isfinite(memory)
    cand = np.flatnonzero(ok & can_dominate)
    if cand.size == 0:
        return out
    order = cand[np.argsort(memory[cand], kind="stable")]
    mem_sorted = memory[order]
    best = np.minimum.accumulate(tpot[order])
    idx = np.flatnonzero(ok)
    pos = np.searchsorted(mem_sorted, memory[idx], side="right") - 1
    has = pos >= 0
    out[idx[has]] = best[pos[has]] * (1.0 + margin) < tpot[idx[has]]
    return out


def screen_configs(configs: ConfigSet, tpot: np.ndarray, memory: np.ndarray, valid: np.ndarray,
                   margin: float = DEFAULT_MARGIN) -> np.ndarray:
    """Dominated mask over one (trace, profile)'s configurations (see the module docstring)."""
    from moesim.simulator.compose import policy_spec, reads_the_future

    oracle = np.asarray([reads_the_future(policy_spec(p)) for p in configs.policies], dtype=bool)[configs.policy]
    group = ((configs.expert_format.astype(np.int64) * len(configs.non_expert_formats) + configs.non_expert_format)
             * 4096 + configs.batch)
    out = np.zeros(len(configs), dtype=bool)
    for g in np.unique(group):
        idx = np.flatnonzero(group == g)
        t = np.where(valid[idx], tpot[idx], np.nan)
        dom = dominated_mask(t, memory[idx].astype(np.float64), ~oracle[idx], margin)
        out[idx] = dom & ~oracle[idx] & valid[idx]
    return out


def screen_points(points: Sequence, margin: float = DEFAULT_MARGIN, model_path: Optional[str] = None) -> ScreenResult:
    """Which of a sweep's points (:class:`moesim.simulator.sweep.SweepPoint`) to skip."""
    from moesim.costmodel.context import TraceProfileContext
    from moesim.costmodel.model import CostModel

    model = CostModel.load(model_path)
    skip = np.zeros(len(points), dtype=bool)
    unscreened = 0
    groups: dict[tuple[str, str, Optional[int]], list[int]] = {}
    for i, p in enumerate(points):
        if p.cache_experts is None:
            unscreened += 1
            continue
        groups.setdefault((p.trace, p.profile, p.gpu_mem_bytes), []).append(i)
    for (trace, profile, gpu_mem), idx in groups.items():
        ctx = TraceProfileContext(trace, profile)
        rows = [(points[i].policy, min(int(points[i].cache_experts), ctx.E), points[i].expert_bits,
                 points[i].non_expert_bits, points[i].batch) for i in idx]
        configs = ConfigSet.from_rows(rows)
        pred = model.predict(ctx, configs)
        unscreened += int((~pred.valid).sum())
        budget = gpu_mem if gpu_mem is not None else int(ctx.profile.device.memory_bytes)
        # a point that does not fit is reported as such at no cost: it is neither screened nor a dominator
        fits = pred.peak_gpu_bytes <= budget
        dom = screen_configs(configs, pred.tpot_s, pred.peak_gpu_bytes, pred.valid & fits, margin)
        skip[np.asarray(idx)] = dom
    kept = [p for p, s in zip(points, skip) if not s]
    skipped = [p for p, s in zip(points, skip) if s]
    return ScreenResult(kept, skipped, unscreened, margin)
