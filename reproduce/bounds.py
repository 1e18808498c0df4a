"""The link floor: the least time a decode step can take when every expert computes on the GPU.

Whatever a system caches, prefetches or overlaps, an expert that a decode step routes and that is not on
the card must cross the host-to-device link during the step, and no cache holds more than the whole card
beside the dense weights (``slots``: no KV cache, activations or runtime reserve). The fewest copies a cache
of ``slots`` experts can make over the decode steps' routing (Belady's MIN, :func:`fewest_copies`, each batch
of requests from its best starting cache, so nothing is owed to the prefill), each at the profile's pinned
copy time, with compute, attention and every runtime cost left out, is a floor under any prediction of the
point's setup; it depends on no policy, preset knob or fitted value.

A published figure faster than its floor needs a link faster than the profile's pinned rate (for a spec
profile, an efficiency measured on another host: ``calib/hosts.py LINK_PINNED``), or a setup other than the
one the catalogue states for it (smaller expert formats, another batch, a metric that means something
else); the margin says how much faster. ``moesim reproduce`` lists such points; they keep their prediction
and ratio, since which setup they did run is not known.

Points whose experts may run on the host (Fiddler, llama.cpp, KTransformers: the preset's placement is not
``gpu``) and points whose metric includes the prefill (``tokens_per_s``) have no floor.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Optional, Sequence

from moesim.reproduce.catalogue import Point

BOUNDED_METRICS = ("tpot_s", "decode_tokens_per_s")


@dataclass(frozen=True)
class LinkFloor:
    copies_per_step: float  # least mean number of experts that cross the link in a decode step
    slots: int  # experts the whole card holds beside the dense weights
    copy_s: float  # one expert's pinned host-to-device copy on the profile

    @property
    def step_s(self) -> float:
        """The least mean time of a decode step."""
        return self.copies_per_step * self.copy_s

    def best(self, metric: str, batch: int) -> float:
        """The best value of ``metric`` the floor allows: the least TPOT, or the most decode tokens per second."""
        if metric == "tpot_s":
            return self.step_s
        if metric == "decode_tokens_per_s":
            return batch / self.step_s if self.step_s > 0 else math.inf
        raise ValueError(f"no link floor for metric '{metric}'")


def fewest_copies(cells: Sequence[Sequence[int]], capacity: int) -> int:
    """The fewest experts any cache of ``capacity`` experts must copy in to serve ``cells`` in order (each cell
    the experts one layer of one step needs at once), starting from whichever ``capacity`` experts suit it best.

    Belady's MIN (evict the expert used farthest ahead; a copied expert may be dropped at once) is optimal for
    the number of copies, and prefetching cannot copy fewer, only earlier. The best start is what MIN keeps
    when it shrinks a cache holding everything to ``capacity``: the experts used soonest."""
    n = len(cells)
    never = n
    # the next cell at which each cell's experts are used again
    nxt: list[list[int]] = [[] for _ in range(n)]
    first: dict[int, int] = {}
    for i in range(n - 1, -1, -1):
        nxt[i] = [first.get(e, never) for e in cells[i]]
        for e in cells[i]:
            first[e] = i
    start = sorted(first.items(), key=lambda kv: (kv[1], kv[0]))[:capacity]
    cache: dict[int, int] = dict(start)  # expert -> the cell that next uses it
    copies = 0
    for i, cell in enumerate(cells):
        copies += sum(1 for e in cell if e not in cache)
        for e, later in zip(cell, nxt[i]):
            cache[e] = later
        if len(cache) > capacity:
            for e, _ in heapq.nlargest(len(cache) - capacity, cache.items(), key=lambda kv: (kv[1], kv[0])):
                del cache[e]
    return copies


def decode_floor(workload, slots: int, copy_s: float) -> LinkFloor:
    """The floor of a compiled workload's decode steps (:func:`moesim.simulator.run.get_workload`), each batch
    of requests starting from its best cache (so the floor owes nothing to the prefill or an earlier batch)."""
    E = workload.num_experts
    copies = steps = 0
    for batch in workload.batches:
        cells = [[layer * E + e for e in work.experts] for step in batch.decode
                 for layer, work in enumerate(step.layers) if work is not None]
        copies += fewest_copies(cells, slots)
        steps += len(batch.decode)
    per_step = copies / steps if steps else 0.0
    return LinkFloor(copies_per_step=per_step, slots=slots, copy_s=copy_s)


def card_slots(memory_bytes: int, expert_bytes: int, non_expert_bytes: int) -> int:
    """Experts the whole card holds beside the dense weights."""
    return max(0, (int(memory_bytes) - int(non_expert_bytes)) // max(int(expert_bytes), 1))


def link_floor(p: Point) -> Optional[float]:
    """The best value of ``p``'s metric the link floor allows (mean over the point's configurations, as its
    prediction is), or None where the point has no floor (see the module docstring)."""
    from moesim.quant import WeightFormat
    from moesim.reproduce.run import configurations, point_profile, point_trace
    from moesim.simulator.compose import policy_spec
    from moesim.simulator.run import get_workload

    if p.unsimulable or p.metric not in BOUNDED_METRICS:
        return None
    policy = policy_spec(p.preset, flag="")
    if policy.placement.policy != "gpu":
        return None
    profile = point_profile(p)
    values = []
    for prompt, output, requests in configurations(p):
        trace = point_trace(p, prompt, output, requests)
        shape = trace.meta.model
        expert_bytes = WeightFormat.parse(p.expert_format).bytes_for(shape.expert_params)
        non_expert_bytes = WeightFormat.parse(p.non_expert_format).bytes_for(shape.non_expert_params)
        slots = card_slots(profile.device.memory_bytes, expert_bytes, non_expert_bytes)
        copy_s = float(profile.copy_time(expert_bytes, "h2d", pinned=True))
        floor = decode_floor(get_workload(trace, p.batch, policy), slots, copy_s)
        values.append(floor.best(p.metric, p.batch))
    return sum(values) / len(values)


def beats_floor(p: Point, best: float) -> bool:
    """Whether the published value is faster than the floor allows."""
    return p.value < best if p.metric == "tpot_s" else p.value > best


def link_floors(outcomes) -> dict[str, float]:
    """Each simulated point's :func:`link_floor`, by point id (points without one are left out)."""
    floors = {}
    for o in outcomes:
        if o.simulated:
            best = link_floor(o.point)
            if best is not None:
                floors[o.point.id] = best
    return floors
