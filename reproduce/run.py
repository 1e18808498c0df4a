"""Simulate every catalogue point with its preset, knobs and machine, and score the predictions.

A point's prediction comes from one ``simulate`` call per (prompt, output) configuration of the point (the
mean over a grid when the source reports a mean), with a composed profile (:mod:`moesim.calib.hosts`) and
the point's routing (:mod:`moesim.reproduce.routing`). Nothing here is tuned per point: the presets, the
profiles and the routing models are the same for every point, and a point that cannot be simulated keeps
its reason.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from statistics import median
from typing import Callable, Optional

from moesim.errors import MoesimError
from moesim.reproduce.catalogue import Point
from moesim.reproduce.routing import is_synthetic, synthetic_trace

REQUESTS_PER_CONFIG = 2  # batch-1 points replay this many requests (the second sees a warm cache)


@dataclass(frozen=True)
class Outcome:
    point: Point
    predicted: float = math.nan
    reason: str = ""  # why there is no prediction
    profile: str = ""
    synthetic: bool = False
    notes: str = ""

    @property
    def ratio(self) -> float:
        return self.predicted / self.point.value if self.predicted == self.predicted else math.nan

    @property
    def simulated(self) -> bool:
        return not self.reason

    @property
    def factor(self) -> float:
        """How far off, as a factor >= 1 (2.0 = off by 2x either way)."""
        r = self.ratio
        return max(r, 1.0 / r) if r == r and r > 0 else math.inf

    @property
    def abs_error(self) -> float:
        return abs(self.ratio - 1.0)

    @property
    def memory_check(self) -> bool:
        return self.point.metric == "peak_mem_mib" and self.simulated


_PROFILES: dict = {}
_TRACES: dict = {}


def point_profile(p: Point):
    from moesim.calib.hosts import FITTED_CPU_INT4_COMPUTE_RATE, FITTED_CPU_INT4_RATE, compose_profile

    # the fitted host rates are read when the profile is composed: a fit that changes one needs a new profile
    key = (p.gpu, p.host, p.link or None, tuple(sorted(FITTED_CPU_INT4_RATE.items())),
           tuple(sorted(FITTED_CPU_INT4_COMPUTE_RATE.items())))
    if key not in _PROFILES:
        _PROFILES[key] = compose_profile(p.gpu, p.host, p.link or None)
    return _PROFILES[key]


def point_trace(p: Point, prompt: int, output: int, requests: int):
    if is_synthetic(p.routing):
        key = (p.routing, p.model, prompt, output, requests)
        if key not in _TRACES:
            _TRACES[key] = synthetic_trace(p.routing, p.model, [prompt] * requests, [output] * requests)
        return _TRACES[key]
    from moesim.simulator.run import load_trace_cached
    from moesim.traces import resolve_trace

    return load_trace_cached(resolve_trace(p.routing))


def configurations(p: Point) -> list[tuple[int, int, int]]:
    """(prompt, output, requests) of each simulation behind the point's value (their mean is the value)."""
    grid = list(itertools.product(p.prompts, p.outputs))
    requests = max(p.batch, REQUESTS_PER_CONFIG if len(grid) == 1 else 1)
    return [(prompt, output, requests) for prompt, output in grid]


def _config(p: Point, shape):
    from moesim.quant import WeightFormat
    from moesim.simulator.compose import policy_spec
    from moesim.simulator.config import SimConfig
    from moesim.simulator.knobs import apply_knobs

    knobs = dict(p.knobs)
    vram = knobs.pop("gpu_mem_mib", None)
    policy = policy_spec(p.preset, flag="")  # as --policy reads it: a preset may replace parts (lru+prefetch=oracle)
    ef, nf = WeightFormat.parse(p.expert_format), WeightFormat.parse(p.non_expert_format)
    cache_bytes = None
    if vram:
        # the GPU memory the system's own sizing rule saw (e.g. a study that limited it): the cache is what
        # the rule gives for that memory; the run itself fits on the real card
        cache_bytes = max(0, int(policy.memory_fraction * vram * 2**20) - nf.bytes_for(shape.non_expert_params))
    config = SimConfig(policy=policy, batch=p.batch, cache_bytes=cache_bytes, expert_format=ef,
                       non_expert_format=nf)
    return apply_knobs(config, knobs, shape.num_experts, [ef.bytes_for(shape.expert_params)] * shape.num_moe_layers)


def _metric(result, metric: str) -> float:
    return {
        "tpot_s": result.tpot_mean_s, "ttft_s": result.ttft_mean_s, "tokens_per_s": result.tokens_per_s,
        "decode_tokens_per_s": result.decode_tokens_per_s, "peak_mem_mib": result.peak_gpu_mib,
    }[metric]


def predict(p: Point) -> Outcome:
    from moesim.simulator.run import simulate

    if p.unsimulable:
        return Outcome(p, reason=p.unsimulable)
    try:
        profile = point_profile(p)
        values = []
        notes = set()
        for prompt, output, requests in configurations(p):
            trace = point_trace(p, prompt, output, requests)
            config = _config(p, trace.meta.model)
            result = simulate(trace, profile, config, trace_name=p.routing, profile_name=profile.name)
            if not result.feasible:
                return Outcome(p, reason=f"does not fit: {result.reason}", profile=profile.name,
                               synthetic=is_synthetic(p.routing))
            if "(for " in result.expert_kernel:
                notes.add(f"experts timed with {result.expert_kernel}")
            values.append(_metric(result, p.metric))
        return Outcome(p, predicted=sum(values) / len(values), profile=profile.name,
                       synthetic=is_synthetic(p.routing), notes="; ".join(sorted(notes)))
    except MoesimError as exc:
        return Outcome(p, reason=exc.message)


# ---- scores


@dataclass(frozen=True)
class Scores:
    speed_points: int
    median_abs_error: float
    within_30: float
    max_factor: float
    worst: str
    memory_points: int
    memory_median_abs_error: float
    memory_max_abs_error: float
    memory_within_10: float
    ttft_points: int
    ttft_median_abs_error: float
    kendall: dict[str, float]  # every pair of a source's points of one metric
    kendall_systems: dict[str, float]  # pairs of different systems run on the same model and machine


def _system_pairs_tau(group: list[Outcome]) -> float:
    """Kendall's rank agreement (concordant minus discordant pairs, over both; a pair tied on either side is
    left out, which makes it Goodman and Kruskal's gamma, equal to tau where nothing ties) over the pairs of
    points that compare two systems: the same model, GPU and host, and a different system. Pairs of one
    system's own configurations (Fiddler's prompt and output lengths) and pairs across models or machines
    order workloads, not systems."""
    def same_setup(a: Point, b: Point) -> bool:
        return (a.model, a.gpu, a.host) == (b.model, b.gpu, b.host)

    conc = disc = 0
    for i, a in enumerate(group):
        for b in group[i + 1:]:
            if not same_setup(a.point, b.point) or a.point.system == b.point.system:
                continue
            sign = (a.point.value - b.point.value) * (a.predicted - b.predicted)
            conc += sign > 0
            disc += sign < 0
    return (conc - disc) / (conc + disc) if conc + disc else math.nan


def kendall_tau(xs: list[float], ys: list[float]) -> float:
    """Kendall's tau-b of two equal-length lists (nan with fewer than two distinct pairs)."""
    conc = disc = tx = ty = 0
    n = len(xs)
    for i in range(n):
        for j in range(i + 1, n):
            dx = (xs[i] > xs[j]) - (xs[i] < xs[j])
            dy = (ys[i] > ys[j]) - (ys[i] < ys[j])
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tx += 1
            elif dy == 0:
                ty += 1
            elif dx == dy:
                conc += 1
            else:
                disc += 1
    denom = math.sqrt((conc + disc + tx) * (conc + disc + ty))
    return (conc - disc) / denom if denom else math.nan


def score(outcomes: list[Outcome]) -> Scores:
    speed = [o for o in outcomes if o.simulated and o.point.is_speed]
    mem = [o for o in outcomes if o.memory_check and "not a check" not in o.point.unsimulable]
    ttft = [o for o in outcomes if o.simulated and o.point.metric == "ttft_s"]
    errs = [o.abs_error for o in speed]
    worst = max(speed, key=lambda o: o.factor, default=None)
    kendall, kendall_systems = {}, {}
    for source in sorted({o.point.source for o in speed}):
        for metric in sorted({o.point.metric for o in speed if o.point.source == source}):
            group = [o for o in speed if o.point.source == source and o.point.metric == metric]
            if len(group) >= 3:
                kendall[f"{source} {metric}"] = kendall_tau([o.point.value for o in group],
                                                            [o.predicted for o in group])
            systems = _system_pairs_tau(group)
            if systems == systems:
                kendall_systems[f"{source} {metric}"] = systems
    return Scores(
        speed_points=len(speed), median_abs_error=median(errs) if errs else math.nan,
        within_30=sum(e <= 0.30 for e in errs) / len(errs) if errs else math.nan,
        max_factor=max((o.factor for o in speed), default=math.nan), worst=worst.point.id if worst else "",
        memory_points=len(mem), memory_median_abs_error=median(o.abs_error for o in mem) if mem else math.nan,
        memory_max_abs_error=max((o.abs_error for o in mem), default=math.nan),
        memory_within_10=sum(o.abs_error <= 0.10 for o in mem) / len(mem) if mem else math.nan,
        ttft_points=len(ttft), ttft_median_abs_error=median(o.abs_error for o in ttft) if ttft else math.nan,
        kendall=kendall, kendall_systems=kendall_systems,
    )


def fit_and_run(points: list[Point], progress: Optional[Callable[[Outcome], None]] = None):
    """Fit the registered parameters (:mod:`moesim.reproduce.fit`) on the points, simulate every point with
    the fitted values, and score leave-one-source-out and leave-one-model-out: (outcomes, fits, held-out
    median |error| per source and per model, each under the label it is printed with)."""
    from moesim.reproduce import fit

    outcome = fit.memoized(predict)

    def value(p: Point) -> float:
        return outcome(p).predicted

    fits = fit.fit_all(points, value)
    with fit.values({name: r.value for name, r in fits.items()}):
        outcomes = []
        for p in points:
            o = outcome(p)
            outcomes.append(o)
            if progress:
                progress(o)
    held_out = {f"leave-one-source-out median |error|, {k}": v
                for k, v in fit.leave_one_source_out(points, value, fits).items()}
    held_out.update({f"leave-one-model-out median |error|, {k}": v
                     for k, v in fit.leave_one_model_out(points, value, fits).items()})
    return outcomes, fits, held_out


def filtered(points: list[Point], system: Optional[str], source: Optional[str]) -> list[Point]:
    out = points
    if system:
        out = [p for p in out if system.lower() in p.system.lower() or system.lower() == p.preset]
    if source:
        out = [p for p in out if p.source == source]
    if not out:
        raise MoesimError(f"no catalogue point matches --system {system or '-'} --source {source or '-'}")
    return out
