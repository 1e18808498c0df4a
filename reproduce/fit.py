"""The one registry of parameters fitted to published measurements, their fit, and leave-one-source-out.

A fitted parameter is the unit cost of a mechanism moesim models as what it is (a per-call overhead, a link
efficiency, a CPU rate, ...) where no source gives that cost. Everything else comes from specifications and
cited measurements; nothing is set per catalogue point.

API (for every area that needs a fitted parameter):

- Declare it once in :data:`REGISTRY` with :func:`register` as a :class:`FittedParameter`: its ``name``,
  ``meaning`` (what mechanism it is the unit cost of), ``unit``, ``used_in`` (the profile or preset field that
  reads it, file and name), ``points`` (the catalogue ids it is fitted to), ``bounds`` (the search interval,
  in ``unit``), ``neutral`` (the value that switches the mechanism off: used when leave-one-source-out holds
  out every point the parameter has), ``read``/``write`` (get and set the value where the simulator reads
  it; ``write`` is only ever called inside :func:`values`, which restores the committed value afterwards) and
  ``cell`` (that place: an entry of a :class:`moesim.fitted.FittedTable`, which notes who reads it, so
  :func:`memoized` simulates a point again only when a value its simulation read has changed).
- The value the simulator uses outside ``moesim reproduce`` is the one committed in the code (``read()``);
  ``moesim reproduce`` refits every parameter, uses the fitted values for its table, and says so when a
  committed value differs from its fit by more than :data:`STALE_RELATIVE` (then update the committed value).
  A run filtered to none of a parameter's points keeps its committed value.
- :func:`fit_all` fits each parameter in registry order on its own points, minimising the sum of squared log
  ratios (predicted / published) with the parameters registered before it held at their fitted values: a scan
  of the bounds, then bounded Brent between the best scanned value's neighbours (:func:`fit_one`);
  deterministic, no random start. :func:`leave_one_source_out` refits every parameter without
  one source's points and predicts that source's speed points; with no parameter touching a source, its
  held-out error is its plain error.

Both take ``predict(point) -> predicted value or nan``, so the procedure is testable without the simulator.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from statistics import median
from typing import Callable, Iterator, Mapping, Sequence

from moesim.errors import MoesimError

STALE_RELATIVE = 0.01  # a committed value further than this from its fit is reported as stale
XATOL_RELATIVE = 1e-3  # the fit's tolerance, relative to the width of the bounds
GRID = 13  # values scanned across the bounds before the refinement


@dataclass(frozen=True)
class FittedParameter:
    name: str
    meaning: str
    unit: str
    used_in: str
    points: tuple[str, ...]
    bounds: tuple[float, float]
    neutral: float
    read: Callable[[], float]
    write: Callable[[float], None]
    # (table name, key) of the moesim.fitted.FittedTable entry the simulator reads it from; None: not known, so
    # every prediction is taken to depend on it (memoized)
    cell: tuple[str, str] | None = None

    def __post_init__(self):
        lo, hi = self.bounds
        if not lo < hi:
            raise MoesimError(f"fitted parameter '{self.name}': bounds {self.bounds} are not an interval")
        if not self.points:
            raise MoesimError(f"fitted parameter '{self.name}': no catalogue points to fit it to")


@dataclass(frozen=True)
class FitResult:
    name: str
    value: float
    committed: float
    points: tuple[str, ...]  # the points it was fitted on (those present and simulable)
    rms_log_error: float

    @property
    def stale(self) -> bool:
        scale = max(abs(self.value), abs(self.committed), 1e-30)
        return abs(self.value - self.committed) / scale > STALE_RELATIVE


REGISTRY: dict[str, FittedParameter] = {}


def register(param: FittedParameter) -> FittedParameter:
    if param.name in REGISTRY:
        raise MoesimError(f"fitted parameter '{param.name}' is registered twice")
    REGISTRY[param.name] = param
    return param


@contextmanager
def values(assignment: Mapping[str, float], registry: Mapping[str, FittedParameter] | None = None) -> Iterator[None]:
    """Set the named parameters where the simulator reads them, and restore the committed values after."""
    registry = REGISTRY if registry is None else registry
    saved = {name: registry[name].read() for name in assignment}
    try:
        for name, value in assignment.items():
            registry[name].write(value)
        yield
    finally:
        for name, value in saved.items():
            registry[name].write(value)


def _loss(param: FittedParameter, value: float, points: Sequence, fixed: Mapping[str, float],
          predict: Callable, registry) -> float:
    with values({**fixed, param.name: value}, registry):
        total = 0.0
        for p in points:
            predicted = predict(p)
            if not (predicted == predicted and predicted > 0):
                return math.inf  # a value that makes a point infeasible is not a fit
            total += math.log(predicted / p.value) ** 2
    return total


def fit_one(param: FittedParameter, points: Sequence, fixed: Mapping[str, float], predict: Callable,
            registry=None) -> tuple[float, float]:
    """(value, rms log error) of ``param`` fitted on ``points`` with the ``fixed`` parameters set: a scan of
    :data:`GRID` evenly spaced values brackets the minimum (a value at which some point does not fit scores
    infinity, so the scan keeps away from it), then bounded Brent refines it between the scan's neighbours."""
    from scipy.optimize import minimize_scalar

    registry = REGISTRY if registry is None else registry
    if not points:
        return param.neutral, math.nan
    lo, hi = param.bounds
    grid = [lo + (hi - lo) * i / (GRID - 1) for i in range(GRID)]
    scan = [(_loss(param, v, points, fixed, predict, registry), v) for v in grid]
    best_loss, best = min(scan)
    if not math.isfinite(best_loss):
        raise MoesimError(f"fitted parameter '{param.name}': no value in {param.bounds} lets every point of "
                          f"{', '.join(p.id for p in points)} be simulated")
    i = grid.index(best)
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, GRID - 1)]
    res = minimize_scalar(lambda v: _loss(param, float(v), points, fixed, predict, registry), bounds=(a, b),
                          method="bounded", options={"xatol": XATOL_RELATIVE * (hi - lo)})
    if float(res.fun) < best_loss:
        best, best_loss = float(res.x), float(res.fun)
    return best, math.sqrt(best_loss / len(points))


def fit_all(points: Sequence, predict: Callable, registry: Mapping[str, FittedParameter] | None = None,
            exclude: Callable[[object], bool] | None = None) -> dict[str, FitResult]:
    """Fit every registered parameter on its points among ``points`` (without those ``exclude`` picks)."""
    registry = REGISTRY if registry is None else registry
    by_id = {p.id: p for p in points}
    fitted: dict[str, FitResult] = {}
    for name, param in registry.items():
        present = [by_id[i] for i in param.points if i in by_id and not by_id[i].unsimulable]
        own = [p for p in present if exclude is None or not exclude(p)]
        fixed = {n: r.value for n, r in fitted.items()}
        if not present:  # a run filtered to other points: nothing to refit it on, it keeps its committed value
            fitted[name] = FitResult(name, param.read(), param.read(), (), math.nan)
            continue
        value, rms = fit_one(param, own, fixed, predict, registry)
        fitted[name] = FitResult(name, value, param.read(), tuple(p.id for p in own), rms)
    return fitted


# the key of the median over all groups' points together, each predicted by the fit without its own group
POOLED = "all points, each held out with its group"


def leave_one_source_out(points: Sequence, predict: Callable, full: Mapping[str, FitResult] | None = None,
                         registry: Mapping[str, FittedParameter] | None = None) -> dict[str, float]:
    """Median |predicted / published - 1| of each source's simulable speed points, every parameter refitted
    without that source's points (a parameter left with no points takes its neutral value). ``full`` is the
    fit on every point (:func:`fit_all`), used as is for a source no parameter is fitted to."""
    return leave_one_group_out(points, predict, lambda p: p.source, full, registry)


def leave_one_model_out(points: Sequence, predict: Callable, full: Mapping[str, FitResult] | None = None,
                        registry: Mapping[str, FittedParameter] | None = None) -> dict[str, float]:
    """As :func:`leave_one_source_out`, holding out one model's points at a time: two sources may publish the
    same run of a model (MoE-Infinity's README and paper give DeepSeek-V2-Lite the same 155 ms), which holding
    out a source does not hide from the fit."""
    return leave_one_group_out(points, predict, lambda p: p.model, full, registry)


def leave_one_group_out(points: Sequence, predict: Callable, group: Callable[[object], str],
                        full: Mapping[str, FitResult] | None = None,
                        registry: Mapping[str, FittedParameter] | None = None) -> dict[str, float]:
    """Median |predicted / published - 1| of each group's simulable speed points (``group(point)`` names it),
    every parameter refitted without that group's points; a group no parameter is fitted to keeps ``full``.
    Under :data:`POOLED`, the median over every group's points together, each predicted without its group."""
    registry = REGISTRY if registry is None else registry
    full = fit_all(points, predict, registry=registry) if full is None else full
    fitted_ids = {i for param in registry.values() for i in param.points}
    out, pooled = {}, []
    for name in sorted({group(p) for p in points}):
        held = [p for p in points if group(p) == name and p.is_speed and not p.unsimulable]
        if not held:
            continue
        touched = any(p.id in fitted_ids for p in points if group(p) == name)
        fitted = (fit_all(points, predict, registry=registry, exclude=lambda p: group(p) == name)
                  if touched else full)
        with values({n: r.value for n, r in fitted.items()}, registry):
            errs = [abs(v / p.value - 1.0) for p in held for v in [predict(p)] if v == v]
        if errs:
            out[name] = median(errs)
            pooled += errs
    if pooled:
        out[POOLED] = median(pooled)
    return out


def memoized(predict: Callable, registry: Mapping[str, FittedParameter] | None = None) -> Callable:
    """``predict`` remembered per (point, current values of the registered parameters its prediction read): a
    fit evaluates the same points many times, leave-one-source-out repeats the fit once per source, and a
    point that never reads a parameter (a KTransformers point, accelerate's hook cost) is not simulated again
    when only that parameter changes. What a prediction read is noted by moesim.fitted.reads, exactly; a
    parameter without a ``cell`` counts as read by every prediction."""
    from moesim.fitted import reads

    registry = REGISTRY if registry is None else registry
    # point id -> names of the parameters a prediction of it read -> their values -> the prediction
    memo: dict[str, dict[tuple[str, ...], dict[tuple[float, ...], object]]] = {}

    def current(names: tuple[str, ...]) -> tuple[float, ...]:
        return tuple(registry[name].read() for name in names)

    def cached(p):
        known = memo.setdefault(p.id, {})
        for names, by_values in known.items():
            key = current(names)
            if key in by_values:
                return by_values[key]
        with reads() as read:
            out = predict(p)
        names = tuple(name for name, param in registry.items() if param.cell is None or param.cell in read)
        known.setdefault(names, {})[current(names)] = out
        return out

    return cached


# ---- the registry: one entry per fitted unit cost


def _entry(table: Callable[[], dict], name: str, key: str) -> dict:
    """``read``, ``write`` and ``cell`` (FittedParameter's fields) of entry ``key`` of the FittedTable ``name``
    where the simulator reads a fitted value (``table()``, looked up when called, so the defining module is
    imported only then)."""
    def read() -> float:
        return table()[key]

    def write(value: float) -> None:
        table()[key] = float(value)

    return {"read": read, "write": write, "cell": (name, key)}


def _unit_cost(key: str) -> dict:
    def table() -> dict:
        from moesim.simulator import runtime

        return runtime.FITTED_UNIT_COSTS

    return _entry(table, "FITTED_UNIT_COSTS", key)


def _host_rate(table_name: str, key: str) -> dict:
    def table() -> dict:
        from moesim.calib import hosts

        return getattr(hosts, table_name)

    return _entry(table, table_name, key)


register(FittedParameter(
    name="accelerate.weight_overhead_s",
    meaning="accelerate's fixed cost per offloaded expert weight matrix per forward, beyond its copy: the "
            "AlignDevicesHook's set_module_tensor_to_device loads it and post_forward moves it back to 'meta', "
            "each ending in torch.cuda.empty_cache() (unconditional in accelerate v0.21-v0.27, still on the move "
            "to 'meta' until PR #3796 of 2025-10; component-costs 4.6, 4.7, which give no unit cost); a "
            "DeepSeek-V2-Lite layer has 192 expert matrices where Mixtral's has 24. Measured on one H100 host "
            "(Xeon, PCIe 5; benchmarks/accelerate_hook_cost.py, validation/accelerate-hook-cost-h100.txt: a hooked "
            "expert forward against its three pageable copies, paired rounds): 0.11 ms per 2 MB matrix and 0.23 ms "
            "per 117 MB one with accelerate 0.26.1, 0.15 and 0.17 ms with 1.15.0, a fifth to a quarter of the fitted "
            "value: on that host the hook and its allocations cost far less than the published runs paid per matrix "
            "beyond moesim's pageable-copy model, whose hosts (not stated) may allocate and stage more slowly",
    unit="s",
    used_in="simulator/runtime.py FITTED_UNIT_COSTS['accelerate.weight_overhead_s'] (the accelerate runtime's "
            "weight_overhead_s, charged per matrix by simulator/run.py accelerate_layer_copy_s)",
    points=("study-baseline-tpot", "mir-mixtral-acc", "mir-dsl-acc"),
    bounds=(0.0, 0.005),
    neutral=0.0,
    **_unit_cost("accelerate.weight_overhead_s"),
))


register(FittedParameter(
    name="moe-infinity.expert_overhead_s",
    meaning="MoE-Infinity's cost per GPU expert call beyond the launches and the two stream synchronisations "
            "counted in simulator/runtime.py: the released dispatcher hands each expert from the Python layer "
            "(dispatch_local) to the fetch thread, then to one of the exec threads, and its output to a std::async "
            "thread (component-costs 4.10), each hand-off a thread wake-up, whose unit cost no source gives; "
            "DeepSeek-V2-Lite runs 156 routed experts per token where Mixtral runs 64. In effect it is fitted to "
            "one measurement: the Mixtral points alone fit 0 (their log errors balance at 0), and the two "
            "DeepSeek-V2-Lite points (README and paper v3) publish the same 155 ms, from 0.53 to 0.99 with it; "
            "0.4 ms is several times a thread wake-up's usual tens of microseconds, so it may hold other "
            "per-expert costs of that run",
    unit="s",
    used_in="simulator/runtime.py FITTED_UNIT_COSTS['moe-infinity.expert_overhead_s'] (RuntimeCosts.expert_fitted_s)",
    points=("mir-mixtral-mi", "mir-dsl-mi", "mip-mixtral-mi", "mip-dsl-mi", "study-mi95-tpot", "study-mi75-tpot",
            "study-mi50-tpot", "study-mi25-tpot", "mir24-mixtral-mi", "mir24-mixtral-mi-b32"),
    bounds=(0.0, 0.003),
    neutral=0.0,
    **_unit_cost("moe-infinity.expert_overhead_s"),
))


register(FittedParameter(
    name="server.cpu_int4_rate",
    meaning="the fraction of the CPU int4 class's stated streaming rate (0.85 of a socket's channel peak, from "
            "llama.cpp on a desktop's two channels) that ggml-family int4 kernels reach on a server socket: "
            "KTransformers V0.2 ran llamafile's Q4_K kernels on a Xeon Gold 6454S socket (32 cores, 8 x DDR5-4800), "
            "llama.cpp its own. No source gives that rate; the socket itself streams 220 GB/s (0.72 of its peak, "
            "measured on a Xeon Platinum 8452Y with the same memory; KTransformers SOSP'25, component-costs 2.7), so "
            "a kernel bound by memory alone would reach about 0.84 of the class. Fitted on one-socket decode rates "
            "only (a two-socket run also depends on ktransformers.numa_split_gain, fitted after it), of two sources: "
            "KTransformers' tutorial (its one-socket run) and three users' reports of KTransformers on other "
            "server sockets (a Xeon Platinum 8352Y, an EPYC 7C13 read as one node of 4 populated channels, an EPYC "
            "9654; rows 147-149, confidence U: vague figures, memory mostly not stated), so leave-one-source-out "
            "predicts each source with the rate the other gives. llama.cpp's decode on the tutorial's host "
            "(kt-llamacpp) is predicted with it",
    unit="fraction",
    used_in="calib/hosts.py FITTED_CPU_INT4_RATE['server'] (host_and_link_factors: host_memory_quantized of every "
            "host with socket_class='server': the Xeon Scalable and EPYC hosts and the server hosts the spec GPUs "
            "assume, TYPICAL_HOST_SERVER)",
    points=("kt-v02-1s", "ktu-8352y", "ktu-7c13", "ktu-9654"),
    bounds=(0.1, 1.0),
    neutral=1.0,
    **_host_rate("FITTED_CPU_INT4_RATE", "server"),
))


register(FittedParameter(
    name="ktransformers.numa_split_gain",
    meaning="what the second socket adds to one socket's rate when KTransformers splits each host expert over "
            "the two sockets of its NUMA build, each computing half of the rows from its own node's copy: 1 would "
            "double the rate; the published runs on the tutorial's dual Xeon Gold 6454S gain 1.40x in decode (12.21 "
            "against 8.73 tok/s) and 1.53x in prefill, where an ideal split gives moesim 1.67x and 1.85x (the expert "
            "dispatch and the GPU's share do not split). No source gives the loss: the sockets meet at every "
            "expert (both halves must finish, and the results are combined on one node), and memory traffic that "
            "crosses the sockets' link is slower than a node's own. Fitted on the tutorial's two-socket decode "
            "rates, with the one-socket streaming rate fitted before it; the ktransformers-issues reports have no "
            "two-socket NUMA run, so leave-one-source-out holds it out with the tutorial (an ideal split)",
    unit="fraction",
    used_in="simulator/runtime.py FITTED_UNIT_COSTS['ktransformers.numa_split_gain'] (RuntimeCosts.numa_split_gain, "
            "apply_runtime: a split host expert takes one socket's time over 1 + gain x (sockets - 1))",
    points=("kt-v02-2s", "kt-v02-2s-6e", "kt-v021-1k"),
    bounds=(0.0, 1.0),
    neutral=1.0,
    **_unit_cost("ktransformers.numa_split_gain"),
))


register(FittedParameter(
    name="server.cpu_int4_compute_rate",
    meaning="the fraction of the CPU int4 class's stated computing rate (the instruction set's int8 lanes x 2 flop "
            "x 2 GHz per core) that ggml-family int4 kernels reach on a server socket, where a host expert has "
            "enough tokens to be bound by it: a prefill step (a decode token's expert streams its weights long "
            "before it runs out of arithmetic). No source gives it, nor says why it is below the stated rate: ggml's "
            "x86 K-quant dot products are 256-bit AVX2 code even on AVX-512 cores (ggml-cpu/arch/x86/quants.c), "
            "while llamafile's iqk_mul_mat, which KTransformers builds, has AVX-512 paths, and every block of "
            "columns dequantizes the weights again. Fitted on the only prefill rates of CPU-expert runs whose "
            "machine is stated: KTransformers V0.2's tutorial on its Xeon Gold 6454S host (one or two sockets, 6 or "
            "8 experts, and V0.2.1 at a 969-token prompt), so leave-one-source-out has nothing to hold it out on "
            "(the time to the first token is not among its speed points); the other prefill figures of CPU-expert runs "
            "cannot be simulated (rows 133, 146 and 150; the catalogue gives each one's reason)",
    unit="fraction",
    used_in="calib/hosts.py FITTED_CPU_INT4_COMPUTE_RATE['server'] (host_and_link_factors: cpu_quant_per_core_flops "
            "of every host with socket_class='server')",
    points=("kt-v02-2s-ttft", "kt-v02-1s-ttft", "kt-v02-2s-6e-ttft", "kt-v02-1s-6e-ttft", "kt-v021-1k-ttft"),
    bounds=(0.05, 1.0),
    neutral=1.0,
    **_host_rate("FITTED_CPU_INT4_COMPUTE_RATE", "server"),
))
