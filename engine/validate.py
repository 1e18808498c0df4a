"""`moesim validate`: simulate a configuration, run it for real on the engine, and compare.

:class:`Validator` holds what is shared by every policy of one validation (device, profile, model on the
device, experts in host memory, the fitted trace). :meth:`Validator.predict` runs the simulator on the
fitted trace with policy objects built by :mod:`moesim.engine.policies` and logs their decisions;
:meth:`Validator.measure` runs the engine with fresh objects of the same construction (after an untimed
warm-up with another fresh set) and logs its decisions; :func:`compare` turns both into one row per
metric: predicted, measured, relative error ``(predicted - measured) / measured``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from moesim.engine.kernels import ExpertFormat
from moesim.engine.memory import MemoryMeasurement, finish_measurement, start_measurement
from moesim.engine.policies import DecisionLog, build_policy_objects, simulate_with_log
from moesim.engine.runner import EngineStats, OffloadEngine
from moesim.engine.shapes import EngineModelSpec, fit_trace, resolve_model
from moesim.errors import MoesimError
from moesim.simulator.results import MIB, SimResult, mean, percentile

TIMING_METRICS = ("TTFT mean", "TPOT mean", "TPOT p50", "TPOT p90")


@dataclass(frozen=True)
class ValidateOptions:
    trace: Optional[str] = None
    policies: tuple[str, ...] = ("lru",)
    cache_experts: int = 2
    model_config: Optional[str] = None
    model: Optional[str] = None  # a Hugging Face checkpoint folder
    layers: Optional[int] = None
    device: str = "cpu"
    profile: Optional[str] = None
    calibrate: bool = False
    expert_format: str = "bf16"
    requests: Optional[int] = 1
    decode_tokens: Optional[int] = 32
    warmup_steps: int = 3
    repeats: int = 1
    statistic: str = "median"  # each token's time over the repeats: median or min
    fit_statistic: str = "median"  # refit the profile's measurements to this per-point statistic ("profile": keep)
    seed: int = 0
    threads: Optional[int] = None
    out: Optional[Path] = None
    log: Callable[[str], None] = field(default=lambda msg: None)
    progress: Optional[Callable[[int], Any]] = None  # total runs -> a bar (update, close); None: lines via log


@dataclass(frozen=True)
class MetricRow:
    metric: str
    unit: str
    predicted: float
    measured: float
    note: str = ""
    paired_error: Optional[float] = None  # set when rounds were compared pairwise (the median of their errors)

    @property
    def error(self) -> Optional[float]:
        if self.paired_error is not None:
            return self.paired_error
        if self.measured is None or self.predicted is None:
            return None
        if not (math.isfinite(self.measured) and math.isfinite(self.predicted)):
            return None
        if self.measured == 0:
            return 0.0 if self.predicted == 0 else None
        return (self.predicted - self.measured) / self.measured

    def to_dict(self) -> dict:
        d = asdict(self)
        d["error"] = self.error
        return d


@dataclass
class EngineMeasurement:
    """One measured run of one policy (counters are identical between repeats; timings are not)."""

    policy: str
    stats: EngineStats
    memory: MemoryMeasurement
    log: DecisionLog
    wall_s: float

    @property
    def ttft(self) -> list[float]:
        return list(self.stats.ttft.values())

    @property
    def hit_rate(self) -> float:
        a = sum(self.stats.decode_accesses)
        return sum(self.stats.decode_hits) / a if a else math.nan

    @property
    def prefill_hit_rate(self) -> float:
        a = self.stats.prefill_accesses
        return self.stats.prefill_hits / a if a else math.nan

    @property
    def cpu_expert_fraction(self) -> float:
        a = sum(self.stats.decode_accesses)
        return self.stats.decode_cpu / a if a else math.nan


@dataclass
class PresetValidation:
    policy: str
    feasible: bool
    reason: str = ""
    rows: list[MetricRow] = field(default_factory=list)
    decisions_identical: Optional[bool] = None
    decision_calls: int = 0
    first_difference: Optional[int] = None
    repeats: int = 0
    sim: dict = field(default_factory=dict)
    engine: dict = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)

    def row(self, metric: str) -> Optional[MetricRow]:
        return next((r for r in self.rows if r.metric == metric), None)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rows"] = [r.to_dict() for r in self.rows]
        return d


@dataclass
class ValidationReport:
    created: str
    settings: dict
    environment: dict
    profile: dict
    model: dict
    trace: dict
    expert_format: dict
    presets: list[PresetValidation]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["presets"] = [p.to_dict() for p in self.presets]
        return d


def _activation_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


class Validator:
    """The shared setup of one validation: device, profile, model, host experts, fitted trace."""

    def __init__(self, opts: ValidateOptions):
        from moesim.calib.facts import resolve_device
        from moesim.tracer import read_trace, write_trace
        from moesim.traces import resolve_trace

        self.opts = opts
        log = opts.log
        self.device = resolve_device(opts.device)
        if opts.profile is not None and opts.calibrate:
            raise MoesimError("--profile and --calibrate both given: expected one")
        if opts.repeats < 1:
            raise MoesimError(f"--repeats {opts.repeats}: expected a positive integer")
        if opts.warmup_steps < 0:
            raise MoesimError(f"--warmup-steps {opts.warmup_steps}: expected a non-negative integer")
        if opts.cache_experts is None or opts.cache_experts < 0:
            raise MoesimError(f"--cache-experts {opts.cache_experts}: expected a non-negative integer")
        trace_path = resolve_trace(opts.trace)
        self.trace_name = Path(trace_path).stem
        self.source_trace = read_trace(trace_path)
        self.out = Path(opts.out) if opts.out is not None else None
        self.spec: EngineModelSpec = resolve_model(self.source_trace, opts.model_config, opts.model, opts.layers)
        log(f"model {self.spec.shape.model_id}: {self.spec.shape.num_moe_layers} MoE layers x "
            f"{self.spec.shape.num_experts} experts, top-{self.spec.shape.top_k}")
        self.profile, self.profile_ref = self._profile()
        if self.device.type == "cpu" or opts.threads:
            torch.set_num_threads(int(opts.threads or self.profile.cpu_threads))
        kernel = ExpertFormat(opts.expert_format).kernel
        if kernel not in self.profile.expert_kernels:
            raise MoesimError(f"--expert-format {kernel}: profile {self.profile.name} has no {kernel} expert kernel "
                              f"(has: {', '.join(self.profile.expert_kernels)})")
        self.fmt = ExpertFormat.for_profile(kernel, self.profile)
        self.act_dtype = _activation_dtype(self.device)
        t0 = time.perf_counter()
        self.engine = self._build_engine()
        log(f"engine ready in {time.perf_counter() - t0:.1f} s: {len(self.engine.store.experts)} experts of "
            f"{self.engine.store.expert_bytes / MIB:.1f} MiB in host memory, model on {self.device}")
        if self.out is not None:
            path = write_trace(self.out / f"trace-{self.trace_name}-fit-{self.device.type}-{self.fmt.kernel}.parquet",
                               self.fitted.meta, self.fitted.cells)
            self.fitted = read_trace(path)
            self.engine.trace = self.fitted
        self._sim_cache: dict[str, tuple] = {}

    # ---- setup
    def _profile(self):
        from moesim.calib.profile import load_profile

        opts = self.opts
        if opts.profile is not None:
            return self._refit(load_profile(opts.profile)), opts.profile
        if not opts.calibrate:
            raise MoesimError("no hardware profile: expected --profile P (calibrated on this machine) or --calibrate")
        if self.out is None:
            raise MoesimError("--calibrate needs --out (the profile and the model config are written there)")
        return self.calibrate_now()

    def calibrate_now(self, tag: str = "") -> tuple:
        """Calibrate this machine (quick) at the engine's exact shape; returns (profile, path)."""
        import json

        from moesim.atomic import write_text_atomic
        from moesim.calib.calibrate import CalibOptions, calibrate

        opts = self.opts
        config_path = self.out / f"engine-model-config-{self.device.type}.json"
        self.out.mkdir(parents=True, exist_ok=True)
        d = self.spec.config.to_dict()
        d["model_type"] = self.spec.config.model_type
        write_text_atomic(config_path, json.dumps(d, indent=1, default=str) + "\n")
        opts.log(f"calibrating {self.device} at the engine's shape (quick) ...")
        profile = calibrate(CalibOptions(device=opts.device, model_config=str(config_path), quick=True,
                                         name=f"{self.device.type}-validate{tag}", threads=opts.threads,
                                         log=lambda m: opts.log(f"  calib: {m}")))
        path = profile.save(self.out / f"profile-{self.device.type}-validate{tag}.json")
        return self._refit(profile), str(path)

    def use_profile(self, profile, ref: str) -> None:
        """Predict with another profile from now on (e.g. one calibrated just before a round of runs)."""
        self.profile, self.profile_ref = profile, ref
        self._sim_cache.clear()

    def _refit(self, profile):
        """The profile fitted to the statistic the engine's timings are compared with.

        The simulator adds up per-component times; on a time-shared machine the sum of each component's
        10th percentile lies below the 10th percentile of the sum, so comparing a p10-fitted profile with
        measured steps is biased. Both sides use the median by default."""
        stat = self.opts.fit_statistic
        if stat == "profile" or profile.fit_statistic == stat or not profile.measurements:
            return profile
        from moesim.calib.calibrate import refit
        from moesim.calib.profile import FIT_STATISTICS

        if stat not in FIT_STATISTICS:
            raise MoesimError(f"--fit-statistic '{stat}': expected one of {', '.join(FIT_STATISTICS)} or profile")
        return refit(profile, stat)

    def _build_engine(self) -> OffloadEngine:
        from moesim.engine.model import build_model, expert_activation, non_expert_bytes
        from moesim.engine.store import build_host_store

        spec = self.spec
        shape = spec.shape
        holder: list[OffloadEngine] = []
        model, ckpt = build_model(spec.config, self.device, self.act_dtype,
                                  lambda layer, h: holder[0].run_layer(layer, h), seed=self.opts.seed,
                                  checkpoint=spec.checkpoint)
        act = expert_activation(spec.config)
        weights = None
        if ckpt is not None and ckpt.gate_up:
            weights = lambda layer, e: ckpt.expert(layer, e)  # noqa: E731
        store = build_host_store(shape.num_moe_layers, shape.num_experts, shape.hidden_size,
                                 shape.expert_intermediate_size, self.fmt, self.device, self.act_dtype, pinned=True,
                                 seed=self.opts.seed, act_fn=act, weights=weights,
                                 source=spec.checkpoint or "synthetic")
        ckpt = None  # the checkpoint's expert matrices now live in the host store
        self.non_expert_bytes = non_expert_bytes(model)
        self.fitted, self.fit = fit_trace(self.source_trace, shape, store.expert_bytes, self.fmt.trace_dtype,
                                          self.non_expert_bytes, self.opts.requests, self.opts.decode_tokens,
                                          self.trace_name)
        engine = OffloadEngine(model, store, self.fitted, self.device, self.act_dtype, self.fmt, self.opts.seed)
        holder.append(engine)
        return engine

    # ---- one policy
    def prepare(self, policy):
        """``policy``: a policy string (a preset, or ``lru+scope=global``) or a :class:`PolicySpec`."""
        from moesim.simulator.compose import policy_spec
        from moesim.simulator.config import SimConfig
        from moesim.simulator.run import prepare

        spec = policy_spec(policy) if isinstance(policy, str) else policy
        # the engine makes the preset's decisions with its own code: the released code's fitted costs
        # (MoE-Infinity's dispatcher, accelerate's hooks) are not in what it measures
        spec = spec.with_parts(released_code_costs=False)
        config = SimConfig(policy=spec, cache_experts=self.opts.cache_experts, batch=1)
        return prepare(self.fitted, self.profile, config, trace_name=f"{self.trace_name}-fit",
                       profile_name=self.profile.name)

    def unsupported(self, policy: str) -> str:
        """Why the engine cannot run ``policy`` here ("" when it can)."""
        prep = self.prepare(policy)
        if not prep.plan.fits:
            return f"does not fit: {prep.plan.reason}"
        if prep.policy.placement.policy != "gpu" and self.device.type == "cuda" and \
                self.fmt.variant not in ("bf16", "int8/pack"):
            return (f"CPU-placed experts need host weights the CPU can run; {self.fmt.variant} is packed for the "
                    f"GPU kernel")
        if prep.policy.placement.policy != "gpu" and not self.profile.cpu_expert_kernels:
            return f"profile {self.profile.name} has no CPU expert model"
        return ""

    def predict(self, policy: str) -> tuple[SimResult, DecisionLog]:
        if policy not in self._sim_cache:
            log = DecisionLog()
            result = simulate_with_log(self.prepare(policy), log)
            self._sim_cache[policy] = (result, log)
        return self._sim_cache[policy]

    def measure(self, policy) -> EngineMeasurement:
        prep = self.prepare(policy)
        log = DecisionLog()
        objects = build_policy_objects(prep, log)
        warm = build_policy_objects(prep) if self.opts.warmup_steps > 0 else None
        t0 = time.perf_counter()
        self.engine.release_buffers()  # the run allocates its own: the measured peak is this policy's
        start_measurement(self.device)
        with denormals_flushed(self.device):
            stats = self.engine.run(prep, objects, warm, self.opts.warmup_steps)
        pool = self.engine._pool
        parts = {"non_expert": self.non_expert_bytes, "expert_buffers": pool.total_bytes if pool else 0,
                 "kv_cache": stats.kv_peak_bytes}
        memory = finish_measurement(self.device, parts)
        name = policy if isinstance(policy, str) else policy.name
        return EngineMeasurement(name, stats, memory, log, time.perf_counter() - t0)

    # ---- report parts
    def environment(self) -> dict:
        from moesim.calib.facts import cpu_name, device_facts, software_versions

        name, mem, facts = device_facts(self.device)
        sw = software_versions()
        try:
            import simpy

            sw["simpy"] = simpy.__version__
        except Exception:
            sw["simpy"] = None
        return {"device": name, "device_kind": self.device.type, "device_memory_bytes": mem, "device_facts": facts,
                "host_cpu": cpu_name(), "hostname_platform": platform.platform(), "software": sw,
                "torch_threads": torch.get_num_threads()}

    def header(self) -> dict:
        p = self.profile
        lib = p.expert_models[self.fmt.kernel].library
        return {
            "profile": {"name": p.name, "ref": self.profile_ref, "device": p.device.name, "notes": p.notes,
                        "created": p.created, "fit_statistic": p.fit_statistic,
                        "derived_from_specs": p.derived_from_specs},
            "model": {"source": self.spec.source, "checkpoint": self.spec.checkpoint, "notes": list(self.spec.notes),
                      "shape": self.spec.shape.to_dict(), "non_expert_bytes": self.non_expert_bytes,
                      "weights": "checkpoint" if self.spec.checkpoint else "synthetic (random; latency depends on "
                                                                             "shapes, not values)"},
            "trace": {**asdict(self.fit), "description": self.fit.describe(),
                      "fitted_path": str(self.fitted.path) if self.fitted.path else None},
            "expert_format": {"kernel": self.fmt.kernel, "variant": self.fmt.variant, "library": lib,
                              "expert_bytes": self.engine.store.expert_bytes,
                              "activation_dtype": str(self.act_dtype).replace("torch.", "")},
        }


# ------------------------------------------------------------------------------------------ comparing


def _median(values: list[float]) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else math.nan


STATISTICS = ("median", "min")


def resolve_statistic(statistic: str, device_kind: str) -> str:
    if statistic not in STATISTICS:
        raise MoesimError(f"--statistic '{statistic}': expected one of {', '.join(STATISTICS)}")
    return statistic


def _run_timings(m: EngineMeasurement) -> dict[str, float]:
    iv = m.stats.token_intervals
    return {"TTFT mean": mean(m.ttft), "TPOT mean": mean(iv), "TPOT p50": percentile(iv, 50),
            "TPOT p90": percentile(iv, 90)}


def aggregate_timings(runs: list[EngineMeasurement], statistic: str) -> dict[str, float]:
    """Each token's interval (and each request's TTFT) over the repeats by ``statistic``, then the
    metrics over tokens. Repeats make identical decisions, so token j is the same work in every run."""
    agg = min if statistic == "min" else statistics.median
    n = min(len(m.stats.token_intervals) for m in runs)
    iv = [agg([m.stats.token_intervals[j] for m in runs]) for j in range(n)]
    reqs = sorted(runs[0].stats.ttft)
    ttft = [agg([m.stats.ttft[r] for m in runs]) for r in reqs]
    return {"TTFT mean": mean(ttft), "TPOT mean": mean(iv), "TPOT p50": percentile(iv, 50),
            "TPOT p90": percentile(iv, 90)}


def _diagnostics(v: Validator, prep, runs: list[EngineMeasurement], sim: SimResult) -> dict:
    profile = v.profile
    eb = v.engine.store.expert_bytes
    shape = v.spec.shape
    out: dict = {}
    copies = [c for m in runs for c in m.stats.copy_seconds()]
    for pinned in (True, False):
        xs = [t for p, t in copies if p == pinned]
        if xs:
            tag = "pinned" if pinned else "pageable"
            out[f"expert_copy_{tag}_ms"] = {
                "measured_median": 1e3 * statistics.median(xs), "measured_count": len(xs),
                "profile": 1e3 * float(profile.copy_time(eb, "h2d", pinned=pinned)),
            }
    kern = prep.expert_kernel.split(" ")[0]
    ffn = [(n, t, ph) for m in runs for n, t, ph in m.stats.expert_times]
    xs = [t for n, t, ph in ffn if n == 1 and ph == 1]
    if xs:
        out["expert_ffn_1tok_ms"] = {"measured_median": 1e3 * statistics.median(xs), "measured_count": len(xs),
                                     "profile": 1e3 * float(profile.expert_time(shape, 1, kernel=kern))}
    cpu = [(n, fwd, whole) for m in runs for n, fwd, whole, ph in m.stats.cpu_expert_times if n == 1 and ph == 1]
    if cpu and kern in profile.cpu_expert_kernels:
        predicted = 1e3 * float(profile.cpu_expert_time(shape, 1, kernel=kern))  # what the simulator charges
        out["cpu_expert_1tok_ms"] = {"measured_median": 1e3 * statistics.median(f for _, f, _ in cpu),
                                     "measured_count": len(cpu), "profile": predicted}
        out["cpu_expert_1tok_with_copies_ms"] = {"measured_median": 1e3 * statistics.median(w for _, _, w in cpu),
                                                 "measured_count": len(cpu), "profile": predicted}
    for m in runs[:1]:
        pre = [(n, t) for n, t, ph in m.stats.expert_times if ph == 0]
        if pre:
            out["prefill_expert_ffns_total_ms"] = {
                "measured_median": 1e3 * sum(t for _, t in pre), "measured_count": len(pre),
                "profile": 1e3 * float(sum(profile.expert_time(shape, n, kernel=kern) for n, _ in pre))}
        steps = [t for _, ph, t in m.stats.step_times if ph == 0]
        if steps:
            out["prefill_step_ms"] = {"measured_median": 1e3 * statistics.median(steps), "measured_count": len(steps),
                                      "predicted_mean": 1e3 * sim.ttft_mean_s}
    steps = [(idx, ph, t) for m in runs for idx, ph, t in m.stats.step_times]
    dec = [t for _, ph, t in steps if ph == 1]
    if dec:
        out["decode_step_ms"] = {"measured_median": 1e3 * statistics.median(dec), "measured_count": len(dec),
                                 "predicted_mean": 1e3 * sim.tpot_mean_s}
    if v.device.type == "cpu":
        out["stall_s"] = {"measured_median": statistics.median(m.stats.stall_s for m in runs),
                          "measured_count": len(runs), "predicted_mean": sim.stall_s}
    scratch = sum(m.stats.scratch_copies for m in runs)
    if scratch:
        out["scratch_copies"] = scratch
    extra = max(m.stats.extra_buffers for m in runs)
    if extra:
        out["extra_buffers"] = (f"{extra} expert buffer(s) beyond the memory plan: bypassed loads the plan gives "
                                f"no staging buffer")
    return out


def compare(v: Validator, policy: str, sim: SimResult, sim_log: DecisionLog,
            runs: list[EngineMeasurement]) -> PresetValidation:
    """One row per metric; timings per token over the repeats by the statistic (see aggregate_timings)."""
    if not sim.feasible:
        return PresetValidation(policy, False, sim.reason, sim=sim.to_dict())
    prep = v.prepare(policy)
    first = runs[0]
    timings = [_run_timings(m) for m in runs]
    statistic = resolve_statistic(v.opts.statistic, v.device.type)
    med = aggregate_timings(runs, statistic)
    ms = 1e3
    rows = [
        MetricRow("TTFT mean", "ms", sim.ttft_mean_s * ms, med["TTFT mean"] * ms),
        MetricRow("TPOT mean", "ms", sim.tpot_mean_s * ms, med["TPOT mean"] * ms),
        MetricRow("TPOT p50", "ms", sim.tpot_p50_s * ms, med["TPOT p50"] * ms),
        MetricRow("TPOT p90", "ms", sim.tpot_p90_s * ms, med["TPOT p90"] * ms),
    ]
    mem = first.memory
    b = sim.memory
    if mem.device_kind == "cuda":
        rows.append(MetricRow("peak device memory (allocator)", "MiB", b.total_bytes / MIB,
                              mem.allocator_total_bytes / MIB,
                              "torch.cuda.max_memory_allocated + the runtime's own use (device used - reserved)"))
        if mem.nvml_process_bytes is not None:
            rows.append(MetricRow("device memory used (nvml)", "MiB", b.total_bytes / MIB,
                                  mem.nvml_process_bytes / MIB, mem.nvml_error or "nvidia-ml-py, after the run"))
    else:
        predicted = b.non_expert_bytes + b.cache_bytes + b.staging_bytes + b.prefetch_buffer_bytes + b.kv_cache_bytes
        rows.append(MetricRow("device tensors (weights, expert buffers, KV)", "MiB", predicted / MIB,
                              mem.device_tensor_bytes / MIB,
                              "CPU as the device: no allocator; activations and runtime excluded on both sides"))
    rows += [
        MetricRow("hit rate (decode)", "", sim.hit_rate, first.hit_rate),
        MetricRow("hit rate (prefill)", "", sim.prefill_hit_rate, first.prefill_hit_rate),
        MetricRow("host->device bytes", "MiB", sim.h2d_bytes / MIB, first.stats.h2d_bytes / MIB),
        MetricRow("device->host bytes", "MiB", sim.d2h_bytes / MIB, first.stats.d2h_bytes / MIB),
        MetricRow("prefetches issued", "", float(sim.prefetch_issued), float(first.stats.prefetch_issued)),
        MetricRow("CPU expert fraction (decode)", "", sim.cpu_expert_fraction, first.cpu_expert_fraction),
    ]
    diffs = [sim_log.first_difference(m.log) for m in runs]
    identical = all(d is None for d in diffs)
    st = first.stats
    engine = {
        "runs": len(runs), "statistic": statistic,
        "ttft_s": [list(m.stats.ttft.values()) for m in runs],
        "tpot_mean_s": [t["TPOT mean"] for t in timings],
        "tpot_p50_s": [t["TPOT p50"] for t in timings],
        "token_intervals_s": [m.stats.token_intervals for m in runs],
        "makespan_s": [m.stats.makespan_s for m in runs],
        "wall_s": [m.wall_s for m in runs],
        "h2d_bytes": st.h2d_bytes, "d2h_bytes": st.d2h_bytes, "inline_copies": st.inline_copies,
        "lane_copies": st.lane_copies, "scratch_copies": st.scratch_copies, "extra_buffers": st.extra_buffers,
        "memory": asdict(mem),
    }
    return PresetValidation(
        policy=policy, feasible=True, rows=rows, decisions_identical=identical, decision_calls=len(sim_log),
        first_difference=next((d for d in diffs if d is not None), None), repeats=len(runs), sim=sim.to_dict(),
        engine=engine, diagnostics=_diagnostics(v, prep, runs, sim),
    )


def merge_rounds(rounds: list[PresetValidation]) -> PresetValidation:
    """Rounds of one policy, each compared with the profile calibrated just before it: every row's
    predicted and measured values are the medians over rounds, its error the median of the rounds' errors."""
    first = rounds[0]
    if len(rounds) == 1 or not first.feasible:
        return first
    rows = []
    for i, r in enumerate(first.rows):
        same = [p.rows[i] for p in rounds]
        errs = [x.error for x in same if x.error is not None]
        rows.append(MetricRow(r.metric, r.unit, _median([x.predicted for x in same]), _median([x.measured for x in same]),
                              r.note, statistics.median(errs) if errs else None))
    merged = PresetValidation(
        policy=first.policy, feasible=True, rows=rows,
        decisions_identical=all(p.decisions_identical for p in rounds), decision_calls=first.decision_calls,
        first_difference=next((p.first_difference for p in rounds if p.first_difference is not None), None),
        repeats=sum(p.repeats for p in rounds), sim=first.sim,
        engine={"rounds": [p.engine for p in rounds], "tpot_error_per_round": [p.row("TPOT mean").error for p in rounds],
                "sim_tpot_mean_s_per_round": [p.sim.get("tpot_mean_s") for p in rounds]},
        diagnostics=first.diagnostics,
    )
    return merged


def build_report(v: Validator, presets: list[PresetValidation], command: str = "") -> ValidationReport:
    o = v.opts
    header = v.header()
    settings = {"command": command, "statistic": resolve_statistic(o.statistic, v.device.type), "trace": v.trace_name, "cache_experts": o.cache_experts, "layers": o.layers,
                "device": str(v.device), "expert_format": o.expert_format, "requests": o.requests,
                "decode_tokens": o.decode_tokens, "warmup_steps": o.warmup_steps, "repeats": o.repeats,
                "seed": o.seed, "batch": 1}
    notes = [
        "error = (predicted - measured) / measured; measured timings: each token's interval (and each TTFT) "
        f"taken over the repeats by '{resolve_statistic(o.statistic, v.device.type)}', then mean/p50/p90 over tokens",
        "warm-up: an untimed run of the first request's prefill and first decode steps with separate policy "
        "objects; the measured run starts from the policy's initial cache state",
    ]
    if v.fit.remapped:
        notes.append(f"the trace was remapped to the model: {v.fit.describe()}")
    notes += list(v.spec.notes)
    return ValidationReport(
        created=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(), settings=settings,
        environment=v.environment(), profile=header["profile"], model=header["model"], trace=header["trace"],
        expert_format=header["expert_format"], presets=presets, notes=notes,
    )


@contextlib.contextmanager
def denormals_flushed(device: torch.device):
    """Flush denormals on a CPU while the engine is timed (they slow CPU kernels unevenly).

    The setting is process-wide, so it is undone afterwards: the caller's arithmetic (numpy, later tests
    in the same process) stays as it was.
    """
    if device.type != "cpu":
        yield
        return
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def run_validation(opts: ValidateOptions, command: str = "") -> ValidationReport:
    """Every policy of ``opts``: predict, measure ``repeats`` times (policies interleaved), compare."""
    v = Validator(opts)
    runnable = []
    skipped: list[PresetValidation] = []
    for policy in opts.policies:
        why = v.unsupported(policy)
        if why:
            skipped.append(PresetValidation(policy, False, why))
            opts.log(f"{policy}: skipped ({why})")
        else:
            runnable.append(policy)
    runs: dict[str, list[EngineMeasurement]] = {p: [] for p in runnable}
    from moesim.progress import Progress

    total = opts.repeats * len(runnable)  # a bar when the caller passes one, else plain lines through the log
    bar = opts.progress(total) if opts.progress else Progress(total, "validate", "run", log=opts.log)
    for rep in range(opts.repeats):
        for policy in runnable:
            m = v.measure(policy)
            runs[policy].append(m)
            opts.log(f"{policy}: run {rep + 1}/{opts.repeats}: TPOT mean {mean(m.stats.token_intervals) * 1e3:.2f} ms, "
                     f"hit rate {m.hit_rate:.3f} ({m.wall_s:.1f} s)")
            bar.update(1)
    bar.close()
    results = []
    for policy in opts.policies:
        if policy in runs:
            sim, log = v.predict(policy)
            results.append(compare(v, policy, sim, log, runs[policy]))
        else:
            results.extend(p for p in skipped if p.policy == policy)
    return build_report(v, results, command)
