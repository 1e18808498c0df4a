"""Hardware profiles: the contract between calibration (which writes them) and simulation (which reads them).

A profile is a versioned JSON bundle: device and host facts, software versions, the raw measurements,
and fitted cost models. Copies are ``latency + bytes / bandwidth``; compute is roofline-shaped,
``latency + max(flops / flop_rate, bytes / bandwidth)`` (optionally with a soft knee, a measured
correction versus the size variable, and a launch floor below which no call goes), with FLOPs and bytes from :mod:`moesim.calib.workload`, so a
profile measured at one model's shape predicts another's. Every fitted model records the range it was
measured over and what happens outside it: ``"roofline"`` (the declared extrapolation: the roofline
formula, with the correction held at its edge value) or ``"error"`` (a :class:`MoesimError` naming the
query). Profiles derived from public specifications carry ``derived_from_specs: true`` and a source for
every number.

Usage::

    profile = load_profile("h100-sxm")          # bundled name or a path to PROFILE.json
    profile.copy_time(352e6, "h2d", pinned=True)
    profile.expert_time(shape, tokens=np.arange(1, 65), kernel="bf16")
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from moesim.atomic import write_text_atomic
from moesim.errors import MoesimError
from moesim.modelspec import ModelShape

from moesim.calib import workload

SCHEMA_VERSION = 1
EXPERT_KERNEL_KEYS = ("bf16", "int8", "int4", "int3", "int2")
# Bits per weight the real kernels read (see measure.py), experts' and non-expert layers' alike: int8
# per-output-channel scales are negligible; int4 torch._weight_int4pack_mm packs 4-bit weights with a bf16 scale
# and zero per group of 128.
KERNEL_BITS = {"bf16": 16.0, "int8": 8.0 + 16.0 / 4096, "int4": 4.0 + 32.0 / 128}
DIRECTIONS = ("h2d", "d2h")
EXTRAPOLATIONS = ("roofline", "error")
PHASES = ("prefill", "decode")
FIT_STATISTICS = ("median", "p10", "min")


# ----------------------------------------------------------------------------------------------------
# reading JSON with one-line errors that name the missing or malformed field


class _Fields:
    """A JSON object being read; every error names ``where.key`` and what was expected."""

    def __init__(self, data: Any, where: str, source: str):
        self.source = source
        self.where = where
        if not isinstance(data, dict):
            raise MoesimError(f"{source}: field '{where}' must be an object, got {type(data).__name__}")
        self.data = data

    def _name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def req(self, key: str, kind: type | tuple[type, ...] | None = None) -> Any:
        if key not in self.data:
            raise MoesimError(f"{self.source}: missing field '{self._name(key)}'")
        return self._check(key, self.data[key], kind)

    def opt(self, key: str, default: Any = None, kind: type | tuple[type, ...] | None = None) -> Any:
        if key not in self.data or self.data[key] is None:
            return default
        return self._check(key, self.data[key], kind)

    def _check(self, key: str, value: Any, kind) -> Any:
        if kind is None:
            return value
        if kind is float:
            kind = (int, float)
        if isinstance(value, bool) and kind not in (bool, (bool,)):
            ok = False
        else:
            ok = isinstance(value, kind)
        if not ok:
            names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise MoesimError(
                f"{self.source}: field '{self._name(key)}' must be {names}, got {type(value).__name__}"
            )
        return value

    def sub(self, key: str) -> "_Fields":
        return _Fields(self.req(key), self._name(key), self.source)

    def num(self, key: str, positive: bool = False, nonneg: bool = False) -> float:
        value = float(self.req(key, float))
        if not math.isfinite(value) or (positive and value <= 0) or (nonneg and value < 0):
            need = "a positive number" if positive else "a non-negative number" if nonneg else "a finite number"
            raise MoesimError(f"{self.source}: field '{self._name(key)}' must be {need}, got {value}")
        return value


# ----------------------------------------------------------------------------------------------------
# fitted models


@dataclass(frozen=True)
class MeasuredRange:
    """The interval of one query variable a model was fitted over; ``high`` None means unbounded."""

    var: str
    low: float
    high: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"var": self.var, "low": self.low, "high": self.high}

    @classmethod
    def from_fields(cls, f: _Fields) -> "MeasuredRange":
        high = f.opt("high", None, float)
        return cls(str(f.req("var", str)), float(f.req("low", float)), None if high is None else float(high))


def _check_ranges(ranges: Iterable[MeasuredRange], extrapolation: str, values: dict[str, Any], what: str) -> None:
    if extrapolation != "error":
        return
    for r in ranges:
        if r.var not in values:
            continue
        x = np.asarray(values[r.var], dtype=np.float64)
        bad = x[(x < r.low) | ((x > r.high) if r.high is not None else np.zeros_like(x, dtype=bool))]
        if bad.size:
            hi = "inf" if r.high is None else f"{r.high:g}"
            raise MoesimError(
                f"{what}: {r.var}={bad.flat[0]:g} is outside the measured range [{r.low:g}, {hi}] and this "
                f"model's extrapolation is 'error'; calibrate over a wider grid"
            )


@dataclass(frozen=True)
class RooflineModel:
    """``latency + knee(flops / flop_rate, bytes / bandwidth) * correction(x)``.

    ``knee`` is ``max`` when ``sharpness`` is None, else the soft maximum ``(a^p + b^p)^(1/p)`` (real
    kernels bend smoothly from memory- to compute-bound). ``correction`` is a piecewise-linear (in log x)
    factor measured versus ``correction_var``; outside its knots it is held at the edge value.
    """

    latency_s: float
    flops_per_s: float
    bytes_per_s: float
    sharpness: float | None = None
    correction_var: str = ""
    correction_x: tuple[float, ...] = ()
    correction_factor: tuple[float, ...] = ()
    ranges: tuple[MeasuredRange, ...] = ()
    extrapolation: str = "roofline"
    method: str = "roofline"
    loo_rel_error: float | None = None  # mean |relative error| predicting each point from a fit without it
    n_points: int = 0
    loo_max_rel_error: float | None = None
    alternatives: tuple[tuple[str, float], ...] = ()  # (method, its leave-one-out error) of candidates not chosen
    # The launch roof: no call is faster than this, whatever its size. On a GPU, Python launches a
    # kernel sequence asynchronously, so a small expert takes max(launch time, GPU time), not their sum;
    # measured on a tiny expert of the same kernel (0 when not measured).
    floor_s: float = 0.0
    # Attention's arithmetic over the KV cache at its own rate (method "...+attention"), added to the
    # roofline, which then covers the other FLOPs; None when attention shares the one roofline.
    attention_flops_per_s: float | None = None

    def base_time(self, flops, nbytes) -> np.ndarray:
        a = np.asarray(flops, dtype=np.float64) / self.flops_per_s
        b = np.asarray(nbytes, dtype=np.float64) / self.bytes_per_s
        if self.sharpness is None:
            return np.maximum(a, b)
        p = self.sharpness
        m = np.maximum(np.maximum(a, b), 1e-300)
        return m * ((a / m) ** p + (b / m) ** p) ** (1.0 / p)

    def correction(self, values: dict[str, Any]) -> np.ndarray | float:
        if not self.correction_var:
            return 1.0
        x = np.maximum(np.asarray(values[self.correction_var], dtype=np.float64), 1e-12)
        return np.interp(np.log(x), np.log(np.asarray(self.correction_x)), np.asarray(self.correction_factor))

    def predict(self, work: workload.Work, values: dict[str, Any], what: str) -> np.ndarray:
        _check_ranges(self.ranges, self.extrapolation, values, what)
        if self.attention_flops_per_s is not None:
            af = work.attention_share()
            t = (self.latency_s + self.base_time(np.asarray(work.flops) - af, work.nbytes) * self.correction(values)
                 + af / self.attention_flops_per_s)
        else:
            t = self.latency_s + self.base_time(work.flops, work.nbytes) * self.correction(values)
        return np.maximum(t, self.floor_s) if self.floor_s > 0 else t

    def to_dict(self) -> dict[str, Any]:
        return {
            "latency_s": self.latency_s,
            "flops_per_s": self.flops_per_s,
            "bytes_per_s": self.bytes_per_s,
            "sharpness": self.sharpness,
            "correction_var": self.correction_var,
            "correction_x": list(self.correction_x),
            "correction_factor": list(self.correction_factor),
            "ranges": [r.to_dict() for r in self.ranges],
            "extrapolation": self.extrapolation,
            "method": self.method,
            "loo_rel_error": self.loo_rel_error,
            "loo_max_rel_error": self.loo_max_rel_error,
            "alternatives": {k: v for k, v in self.alternatives},
            "n_points": self.n_points,
            "floor_s": self.floor_s,
        } | ({"attention_flops_per_s": self.attention_flops_per_s} if self.attention_flops_per_s is not None else {})

    @classmethod
    def from_fields(cls, f: _Fields) -> "RooflineModel":
        extrapolation = f.req("extrapolation", str)
        if extrapolation not in EXTRAPOLATIONS:
            raise MoesimError(
                f"{f.source}: field '{f.where}.extrapolation' is '{extrapolation}', expected one of {EXTRAPOLATIONS}"
            )
        cx = tuple(float(v) for v in f.opt("correction_x", [], list))
        cf = tuple(float(v) for v in f.opt("correction_factor", [], list))
        cvar = f.opt("correction_var", "", str)
        if cvar and (len(cx) != len(cf) or not cx):
            raise MoesimError(
                f"{f.source}: field '{f.where}.correction_x' and 'correction_factor' must be non-empty lists of "
                f"equal length"
            )
        sharp = f.opt("sharpness", None, float)
        ranges = tuple(
            MeasuredRange.from_fields(_Fields(r, f"{f.where}.ranges[{i}]", f.source))
            for i, r in enumerate(f.req("ranges", list))
        )
        loo = f.opt("loo_rel_error", None, float)
        attention = None
        if f.opt("attention_flops_per_s", None, float) is not None:
            attention = f.num("attention_flops_per_s", positive=True)
        return cls(
            latency_s=f.num("latency_s", nonneg=True),
            flops_per_s=f.num("flops_per_s", positive=True),
            bytes_per_s=f.num("bytes_per_s", positive=True),
            sharpness=None if sharp is None else float(sharp),
            correction_var=cvar,
            correction_x=cx,
            correction_factor=cf,
            ranges=ranges,
            extrapolation=extrapolation,
            method=f.opt("method", "roofline", str),
            loo_rel_error=None if loo is None else float(loo),
            n_points=int(f.opt("n_points", 0, int)),
            loo_max_rel_error=f.opt("loo_max_rel_error", None, float),
            alternatives=tuple((str(k), float(v)) for k, v in f.opt("alternatives", {}, dict).items()),
            floor_s=float(f.opt("floor_s", 0.0, float)),
            attention_flops_per_s=attention,
        )


@dataclass(frozen=True)
class CopyModel:
    """``latency + bytes / bandwidth`` for one (direction, pinned, concurrent) combination."""

    latency_s: float
    bytes_per_s: float
    low_bytes: float = 0.0
    high_bytes: float | None = None
    extrapolation: str = "roofline"  # for copies the declared extrapolation is the same straight line
    method: str = "linear"
    loo_rel_error: float | None = None
    n_points: int = 0
    loo_max_rel_error: float | None = None

    def predict(self, nbytes, what: str) -> np.ndarray:
        b = np.asarray(nbytes, dtype=np.float64)
        if np.any(b < 0):
            raise MoesimError(f"{what}: negative byte count {b[b < 0].flat[0]:g}")
        _check_ranges([MeasuredRange("bytes", self.low_bytes, self.high_bytes)], self.extrapolation,
                      {"bytes": b[b > 0]}, what)
        return np.where(b > 0, self.latency_s + b / self.bytes_per_s, 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "latency_s": self.latency_s,
            "bytes_per_s": self.bytes_per_s,
            "low_bytes": self.low_bytes,
            "high_bytes": self.high_bytes,
            "extrapolation": self.extrapolation,
            "method": self.method,
            "loo_rel_error": self.loo_rel_error,
            "loo_max_rel_error": self.loo_max_rel_error,
            "n_points": self.n_points,
        }

    @classmethod
    def from_fields(cls, f: _Fields) -> "CopyModel":
        extrapolation = f.req("extrapolation", str)
        if extrapolation not in EXTRAPOLATIONS:
            raise MoesimError(
                f"{f.source}: field '{f.where}.extrapolation' is '{extrapolation}', expected one of {EXTRAPOLATIONS}"
            )
        high = f.opt("high_bytes", None, float)
        loo = f.opt("loo_rel_error", None, float)
        return cls(
            latency_s=f.num("latency_s", nonneg=True),
            bytes_per_s=f.num("bytes_per_s", positive=True),
            low_bytes=float(f.opt("low_bytes", 0.0, float)),
            high_bytes=None if high is None else float(high),
            extrapolation=extrapolation,
            method=f.opt("method", "linear", str),
            loo_rel_error=None if loo is None else float(loo),
            n_points=int(f.opt("n_points", 0, int)),
            loo_max_rel_error=f.opt("loo_max_rel_error", None, float),
        )


def copy_key(direction: str, pinned: bool, concurrent: bool) -> str:
    return f"{direction}/{'pinned' if pinned else 'pageable'}/{'concurrent' if concurrent else 'alone'}"


@dataclass(frozen=True)
class ExpertKernelModel:
    """The fitted FFN time of one expert weight format, and which real kernel was timed."""

    kernel: str  # WeightFormat.kernel key
    library: str  # the implementation that ran, e.g. "torch.matmul (cuBLAS)", "torch._weight_int8pack_mm"
    weight_bits_per_param: float  # bits the kernel reads per weight (scales and zeros included)
    model: RooflineModel

    def to_dict(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "library": self.library,
                "weight_bits_per_param": self.weight_bits_per_param, "model": self.model.to_dict()}

    @classmethod
    def from_fields(cls, f: _Fields) -> "ExpertKernelModel":
        kernel = f.req("kernel", str)
        if kernel not in EXPERT_KERNEL_KEYS:
            raise MoesimError(f"{f.source}: field '{f.where}.kernel' is '{kernel}', expected one of {EXPERT_KERNEL_KEYS}")
        return cls(kernel, f.req("library", str), f.num("weight_bits_per_param", positive=True),
                   RooflineModel.from_fields(f.sub("model")))


# ----------------------------------------------------------------------------------------------------
# facts and raw measurements


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    kind: str  # "cuda" | "cpu"
    memory_bytes: int
    facts: dict[str, Any] = field(default_factory=dict)  # driver, clocks, PCIe link, compute capability...

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "memory_bytes": self.memory_bytes, "facts": self.facts}

    @classmethod
    def from_fields(cls, f: _Fields) -> "DeviceInfo":
        kind = f.req("kind", str)
        if kind not in ("cuda", "cpu"):
            raise MoesimError(f"{f.source}: field '{f.where}.kind' is '{kind}', expected 'cuda' or 'cpu'")
        return cls(f.req("name", str), kind, int(f.num("memory_bytes", positive=True)), dict(f.opt("facts", {}, dict)))


@dataclass(frozen=True)
class HostInfo:
    cpu_name: str
    cpu_cores: int
    memory_bytes: int
    facts: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"cpu_name": self.cpu_name, "cpu_cores": self.cpu_cores, "memory_bytes": self.memory_bytes,
                "facts": self.facts}

    @classmethod
    def from_fields(cls, f: _Fields) -> "HostInfo":
        return cls(f.req("cpu_name", str), int(f.num("cpu_cores", positive=True)),
                   int(f.num("memory_bytes", positive=True)), dict(f.opt("facts", {}, dict)))


@dataclass(frozen=True)
class MeasuredPoint:
    """One grid point: its coordinates, the median of the timed repeats and their spread."""

    x: dict[str, float]
    median_s: float
    p10_s: float
    p90_s: float
    repeats: int
    min_s: float | None = None

    def value(self, statistic: str) -> float:
        """The time fits use: ``median`` (default) or ``p10`` (robust to time-sharing, see fit_statistic)."""
        if statistic == "median":
            return self.median_s
        if statistic == "p10":
            return self.p10_s
        if statistic == "min" and self.min_s is not None:
            return self.min_s
        raise MoesimError(f"fit statistic '{statistic}': expected one of {FIT_STATISTICS}")

    def to_dict(self) -> dict[str, Any]:
        return {"x": self.x, "median_s": self.median_s, "p10_s": self.p10_s, "p90_s": self.p90_s,
                "min_s": self.min_s, "repeats": self.repeats}

    @classmethod
    def from_fields(cls, f: _Fields) -> "MeasuredPoint":
        x = {str(k): float(v) for k, v in f.req("x", dict).items()}
        mn = f.opt("min_s", None, float)
        return cls(x, f.num("median_s", nonneg=True), f.num("p10_s", nonneg=True), f.num("p90_s", nonneg=True),
                   int(f.req("repeats", int)), None if mn is None else float(mn))


@dataclass(frozen=True)
class MeasuredSeries:
    """The raw measurements behind one fitted model (``key`` names it, e.g. ``expert/bf16``)."""

    key: str
    description: str
    shape: dict[str, Any] | None  # the ModelShape measured at, if any
    params: dict[str, Any]  # fixed settings: threads, dtype, library...
    points: tuple[MeasuredPoint, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "description": self.description, "shape": self.shape, "params": self.params,
                "points": [p.to_dict() for p in self.points]}

    @classmethod
    def from_fields(cls, f: _Fields) -> "MeasuredSeries":
        pts = tuple(MeasuredPoint.from_fields(_Fields(p, f"{f.where}.points[{i}]", f.source))
                    for i, p in enumerate(f.req("points", list)))
        return cls(f.req("key", str), f.opt("description", "", str), f.opt("shape", None, dict),
                   dict(f.opt("params", {}, dict)), pts)

    def model_shape(self) -> ModelShape:
        if self.shape is None:
            raise MoesimError(f"measured series '{self.key}' has no model shape")
        return ModelShape.from_dict(self.shape, where=f"measured series '{self.key}' shape")


# ----------------------------------------------------------------------------------------------------
# the profile


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    derived_from_specs: bool
    device: DeviceInfo
    host: HostInfo
    runtime_reserve_bytes: int
    cpu_threads: int
    expert_models: dict[str, ExpertKernelModel]  # kernel key -> device expert FFN model
    cpu_expert_models: dict[str, dict[int, ExpertKernelModel]]  # kernel key -> threads -> host CPU FFN model
    copy_models: dict[str, CopyModel]  # copy_key(...) -> model
    non_expert_models: dict[str, dict[str, RooflineModel]]  # kernel -> phase -> model
    head_model: RooflineModel
    layer_overhead_s: float
    step_overhead_s: float
    software: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # which document each spec number came from
    efficiency: dict[str, Any] = field(default_factory=dict)  # spec-derived: the factors applied and why
    notes: str = ""
    created: str = ""
    measurements: tuple[MeasuredSeries, ...] = ()
    fit_statistic: str = "median"  # which per-point statistic the models were fitted to
    schema_version: int = SCHEMA_VERSION
    # A device that shares its memory bus and cores with the copy engine (a CPU standing in for the
    # device) runs an expert FFN slower while a host->device copy is in flight, and the copy slower
    # while the FFN runs: time ratios measured by calib (1.0: independent, as a GPU's DMA engines are).
    compute_slowdown_with_copy: float = 1.0
    copy_slowdown_with_compute: float = 1.0
    # GPU profiles measured by calib: the non-expert layer's kernel time alone (kernel -> phase -> model), the
    # host's launch time hidden. The layer timed host to host (``non_expert_models``) is launch-bound at
    # decode; a decode loop issues it while the GPU still works on the previous layer, so the simulator
    # overlaps the two (simulator/engine.py). Empty: no overlap, the layer costs its host-to-host time.
    non_expert_device_models: dict[str, dict[str, RooflineModel]] = field(default_factory=dict)

    # ---- contract attributes
    @property
    def host_memory_bytes(self) -> int:
        return self.host.memory_bytes

    @property
    def expert_kernels(self) -> tuple[str, ...]:
        return tuple(k for k in EXPERT_KERNEL_KEYS if k in self.expert_models)

    @property
    def cpu_expert_kernels(self) -> tuple[str, ...]:
        return tuple(k for k in EXPERT_KERNEL_KEYS if k in self.cpu_expert_models)

    # ---- contract queries
    def copy_time(self, nbytes, direction: str = "h2d", pinned: bool = True, concurrent: bool = False):
        if direction not in DIRECTIONS:
            raise MoesimError(f"copy direction '{direction}': expected 'h2d' or 'd2h'")
        key = copy_key(direction, pinned, concurrent)
        model = self.copy_models.get(key)
        if model is None:
            raise MoesimError(
                f"profile {self.name} has no {key} copy model (has: {', '.join(sorted(self.copy_models)) or 'none'})"
            )
        return _out(model.predict(nbytes, f"profile {self.name} copy_time[{key}]"), nbytes)

    def _expert_model(self, kernel: str) -> ExpertKernelModel:
        model = self.expert_models.get(kernel)
        if model is None:
            raise MoesimError(
                f"profile {self.name} has no {kernel} expert kernel (has: {', '.join(self.expert_kernels) or 'none'})"
            )
        return model

    def expert_time(self, shape: ModelShape, tokens, kernel: str = "bf16"):
        m = self._expert_model(kernel)
        return self._ffn_time(m, shape, tokens, f"profile {self.name} expert_time[{kernel}]")

    @staticmethod
    def _ffn_time(m: ExpertKernelModel, shape: ModelShape, tokens, what: str):
        t = _counts(tokens, what)
        live = np.where(t > 0, t, 1.0)  # an expert no token was routed to is not run: time 0
        y = m.model.predict(workload.expert_work(shape, live, m.weight_bits_per_param), {"tokens": live}, what)
        return _out(np.where(t > 0, y, 0.0), tokens)

    def cpu_expert_model(self, kernel: str = "bf16", threads: int | None = None) -> ExpertKernelModel:
        """The host-CPU FFN model for ``threads`` threads; between two measured thread counts the
        rates are interpolated linearly (declared), outside them it is an error."""
        per_threads = self.cpu_expert_models.get(kernel)
        if not per_threads:
            raise MoesimError(
                f"profile {self.name} has no {kernel} CPU expert kernel "
                f"(has: {', '.join(self.cpu_expert_kernels) or 'none'})"
            )
        threads = self.cpu_threads if threads is None else int(threads)
        if threads in per_threads:
            return per_threads[threads]
        known = sorted(per_threads)
        if threads < known[0] or threads > known[-1]:
            raise MoesimError(
                f"profile {self.name}: CPU expert kernel {kernel} was measured with {known} threads, "
                f"not {threads}; calibrate with that thread count"
            )
        lo = max(k for k in known if k < threads)
        hi = min(k for k in known if k > threads)
        w = (threads - lo) / (hi - lo)
        a, b = per_threads[lo], per_threads[hi]
        ma, mb = a.model, b.model
        model = RooflineModel(
            latency_s=(1 - w) * ma.latency_s + w * mb.latency_s,
            flops_per_s=(1 - w) * ma.flops_per_s + w * mb.flops_per_s,
            bytes_per_s=(1 - w) * ma.bytes_per_s + w * mb.bytes_per_s,
            sharpness=ma.sharpness, correction_var=ma.correction_var, correction_x=ma.correction_x,
            correction_factor=ma.correction_factor, ranges=ma.ranges, extrapolation=ma.extrapolation,
            method=f"thread-interpolated({lo},{hi})", floor_s=(1 - w) * ma.floor_s + w * mb.floor_s,
        )
        return ExpertKernelModel(kernel, a.library, a.weight_bits_per_param, model)

    def cpu_expert_time(self, shape: ModelShape, tokens, kernel: str = "bf16", threads: int | None = None):
        m = self.cpu_expert_model(kernel, threads)
        what = f"profile {self.name} cpu_expert_time[{kernel}, {threads or self.cpu_threads} threads]"
        return self._ffn_time(m, shape, tokens, what)

    def non_expert_time(self, shape: ModelShape, phase: str, tokens, context, batch=1, kernel: str = "bf16",
                        device_only: bool = False):
        """One decoder layer without its routed experts, timed host to host; ``device_only``: its GPU kernels
        alone (``non_expert_device_models``)."""
        if phase not in PHASES:
            raise MoesimError(f"phase '{phase}': expected 'prefill' or 'decode'")
        family = self.non_expert_device_models if device_only else self.non_expert_models
        models = family.get(kernel)
        if models is None or phase not in models:
            have = ", ".join(f"{k}/{p}" for k, v in family.items() for p in v) or "none"
            what = "non-expert kernel-time" if device_only else "non-expert"
            raise MoesimError(f"profile {self.name} has no {kernel} {what} {phase} model (has: {have})")
        what = f"profile {self.name} non_expert_time[{phase}{', device' if device_only else ''}]"
        t, c, b = np.broadcast_arrays(_counts(tokens, what), _counts(context, what), _counts(batch, what))
        bits = KERNEL_BITS.get(kernel, 16.0)
        if phase == "prefill":
            live = np.where(t > 0, t, 1.0)
            y = models[phase].predict(workload.prefill_work(shape, live, bits), {"tokens": live}, what)
            y = np.where(t > 0, y, 0.0)
        else:
            live_b = np.where(b > 0, b, 1.0)
            y = models[phase].predict(workload.decode_work(shape, live_b, c, bits), {"batch": live_b, "context": c},
                                      what)
            y = np.where(b > 0, y, 0.0)
        scalar = all(np.ndim(v) == 0 for v in (tokens, context, batch))
        return float(y) if scalar else np.asarray(y, dtype=np.float64)

    def head_time(self, shape: ModelShape, tokens):
        what = f"profile {self.name} head_time"
        t = _counts(tokens, what)
        live = np.where(t > 0, t, 1.0)
        y = self.head_model.predict(workload.head_work(shape, live), {"tokens": live}, what)
        return _out(np.where(t > 0, y, 0.0), tokens)

    # ---- serialisation
    def to_dict(self, include_measurements: bool = True) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "name": self.name,
            "derived_from_specs": self.derived_from_specs,
            "created": self.created,
            "notes": self.notes,
            "device": self.device.to_dict(),
            "host": self.host.to_dict(),
            "runtime_reserve_bytes": self.runtime_reserve_bytes,
            "cpu_threads": self.cpu_threads,
            "software": self.software,
            "sources": self.sources,
            "efficiency": self.efficiency,
            "overheads": {"layer_s": self.layer_overhead_s, "step_s": self.step_overhead_s},
            "copy": {k: v.to_dict() for k, v in sorted(self.copy_models.items())},
            "expert": {k: v.to_dict() for k, v in self.expert_models.items()},
            "cpu_expert": {k: {str(t): m.to_dict() for t, m in sorted(v.items())}
                           for k, v in self.cpu_expert_models.items()},
            "non_expert": {k: {p: m.to_dict() for p, m in v.items()} for k, v in self.non_expert_models.items()},
        } | ({"non_expert_device": {k: {p: m.to_dict() for p, m in v.items()}
                                    for k, v in self.non_expert_device_models.items()}}
             if self.non_expert_device_models else {}) | {
            "head": self.head_model.to_dict(),
            "fit_statistic": self.fit_statistic,
        } | ({"interference": {"compute_with_copy": self.compute_slowdown_with_copy,
                               "copy_with_compute": self.copy_slowdown_with_compute}}
             if (self.compute_slowdown_with_copy, self.copy_slowdown_with_compute) != (1.0, 1.0) else {}) | {
            "measurements": [s.to_dict() for s in self.measurements] if include_measurements else [],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False) + "\n"

    def save(self, path: str | Path) -> Path:
        return write_text_atomic(path, self.to_json())

    @classmethod
    def from_dict(cls, data: Any, source: str = "profile") -> "HardwareProfile":
        f = _Fields(data, "", source)
        version = f.req("schema_version", int)
        if version != SCHEMA_VERSION:
            raise MoesimError(f"{source}: field 'schema_version' is {version}, this moesim reads {SCHEMA_VERSION}")
        expert = {}
        ef = f.sub("expert")
        for k in ef.data:
            m = ExpertKernelModel.from_fields(ef.sub(k))
            if m.kernel != k:
                raise MoesimError(f"{source}: field 'expert.{k}.kernel' is '{m.kernel}', expected '{k}'")
            expert[k] = m
        cpu_expert: dict[str, dict[int, ExpertKernelModel]] = {}
        cf = f.sub("cpu_expert")
        for k in cf.data:
            per = cf.sub(k)
            table = {}
            for t in per.data:
                if not str(t).isdigit() or int(t) <= 0:
                    raise MoesimError(f"{source}: field 'cpu_expert.{k}' has key '{t}', expected a thread count")
                table[int(t)] = ExpertKernelModel.from_fields(per.sub(t))
            cpu_expert[k] = table
        copies = {}
        cpf = f.sub("copy")
        for k in cpf.data:
            parts = k.split("/")
            if len(parts) != 3 or parts[0] not in DIRECTIONS or parts[1] not in ("pinned", "pageable") \
                    or parts[2] not in ("alone", "concurrent"):
                raise MoesimError(f"{source}: field 'copy.{k}': expected a key like 'h2d/pinned/alone'")
            copies[k] = CopyModel.from_fields(cpf.sub(k))
        non_expert: dict[str, dict[str, RooflineModel]] = {}
        nf = f.sub("non_expert")
        for k in nf.data:
            per = nf.sub(k)
            for phase in per.data:
                if phase not in PHASES:
                    raise MoesimError(f"{source}: field 'non_expert.{k}.{phase}': expected 'prefill' or 'decode'")
            non_expert[k] = {p: RooflineModel.from_fields(per.sub(p)) for p in per.data}
        non_expert_device: dict[str, dict[str, RooflineModel]] = {}
        if f.opt("non_expert_device", None, dict) is not None:
            nd = f.sub("non_expert_device")
            for k in nd.data:
                per = nd.sub(k)
                for phase in per.data:
                    if phase not in PHASES:
                        raise MoesimError(f"{source}: field 'non_expert_device.{k}.{phase}': expected 'prefill' or "
                                          f"'decode'")
                non_expert_device[k] = {p: RooflineModel.from_fields(per.sub(p)) for p in per.data}
        overheads = f.sub("overheads")
        slowdown = (1.0, 1.0)
        if f.opt("interference", None, dict) is not None:
            inter = f.sub("interference")
            slowdown = (inter.num("compute_with_copy", positive=True), inter.num("copy_with_compute", positive=True))
        measurements = tuple(MeasuredSeries.from_fields(_Fields(s, f"measurements[{i}]", source))
                             for i, s in enumerate(f.opt("measurements", [], list)))
        return cls(
            name=f.req("name", str),
            derived_from_specs=f.req("derived_from_specs", bool),
            device=DeviceInfo.from_fields(f.sub("device")),
            host=HostInfo.from_fields(f.sub("host")),
            runtime_reserve_bytes=int(f.num("runtime_reserve_bytes", nonneg=True)),
            cpu_threads=int(f.num("cpu_threads", positive=True)),
            expert_models=expert,
            cpu_expert_models=cpu_expert,
            copy_models=copies,
            non_expert_models=non_expert,
            head_model=RooflineModel.from_fields(f.sub("head")),
            layer_overhead_s=overheads.num("layer_s", nonneg=True),
            step_overhead_s=overheads.num("step_s", nonneg=True),
            software=dict(f.opt("software", {}, dict)),
            sources=dict(f.opt("sources", {}, dict)),
            efficiency=dict(f.opt("efficiency", {}, dict)),
            notes=f.opt("notes", "", str),
            created=f.opt("created", "", str),
            measurements=measurements,
            fit_statistic=_statistic(f),
            schema_version=version,
            compute_slowdown_with_copy=slowdown[0],
            copy_slowdown_with_compute=slowdown[1],
            non_expert_device_models=non_expert_device,
        )

    def series(self, key: str) -> MeasuredSeries:
        for s in self.measurements:
            if s.key == key:
                return s
        raise MoesimError(f"profile {self.name} has no measured series '{key}'")


def _statistic(f: _Fields) -> str:
    stat = f.opt("fit_statistic", "median", str)
    if stat not in FIT_STATISTICS:
        raise MoesimError(f"{f.source}: field 'fit_statistic' is '{stat}', expected one of {FIT_STATISTICS}")
    return stat


def _counts(values, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size and (np.any(~np.isfinite(arr)) or np.any(arr < 0)):
        raise MoesimError(f"{what}: expected non-negative finite counts, got {arr[(arr < 0) | ~np.isfinite(arr)].flat[0]}")
    return arr


def _out(y, like):
    """float for a scalar query, an array of the query's shape otherwise."""
    y = np.asarray(y, dtype=np.float64)
    if np.ndim(like) == 0:
        return float(y)
    return np.broadcast_to(y, np.shape(like)).copy()


# ----------------------------------------------------------------------------------------------------
# finding and loading


def bundled_profiles() -> dict[str, Path]:
    """Bundled profiles by name (``calib/profiles/*.json``)."""
    root = resources.files("moesim.calib.profiles")
    return {p.name[: -len(".json")]: Path(str(p)) for p in sorted(root.iterdir(), key=lambda p: p.name)
            if p.name.endswith(".json")}


def load_profile(spec: str | Path) -> HardwareProfile:
    """A profile from a bundled name or a path to a PROFILE.json."""
    spec_str = str(spec)
    bundled = bundled_profiles()
    if spec_str in bundled:
        path = bundled[spec_str]
    else:
        path = Path(spec_str)
        if not path.is_file():
            raise MoesimError(
                f"profile '{spec_str}': not a bundled profile ({', '.join(sorted(bundled)) or 'none'}) "
                f"or an existing JSON file"
            )
    from moesim.atomic import note_input

    note_input(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise MoesimError(f"{path}: cannot read profile ({exc})") from None
    except json.JSONDecodeError as exc:
        raise MoesimError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    return HardwareProfile.from_dict(data, source=str(path))
