"""`moesim calib`: measure this machine at a model's shape and write a fitted hardware profile."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from moesim.calib import facts, workload
from moesim.calib.fit import RooflineData, fit_copy, fit_roofline
from moesim.calib.kernels import KernelInfo, probe_kernels
from moesim.calib.layers import build_attention_layer, hf_config_for, tiny_config
from moesim.calib.measure import (
    Grids,
    copy_series,
    decode_series,
    expert_series,
    fastest_kernel,
    floor_series,
    grids_for,
    head_series,
    interference_series,
    overhead_series,
    prefill_series,
)
from moesim.calib.profile import (
    CopyModel,
    DeviceInfo,
    ExpertKernelModel,
    HardwareProfile,
    HostInfo,
    MeasuredSeries,
    RooflineModel,
)
from moesim.calib.timing import Budget, RepeatPolicy, Timer
from moesim.errors import MoesimError
from moesim.tracer import load_shape


@dataclass(frozen=True)
class CalibOptions:
    device: str = "cpu"
    model_config: str = "mixtral-8x7b"
    quick: bool = False
    name: str = ""
    threads: int | None = None
    statistic: str = "auto"  # per-point time the fits use; auto: p10 on CPU (time-shared cores), median on CUDA
    grids: Grids | None = None  # override the grid (tests use tiny ones)
    policy: RepeatPolicy | None = None
    log: Callable[[str], None] = field(default=lambda msg: None)


# ------------------------------------------------------------------------------------------ fitting


def expert_data(series: MeasuredSeries, statistic: str = "median") -> RooflineData:
    shape = series.model_shape()
    tokens = np.array([p.x["tokens"] for p in series.points])
    w = workload.expert_work(shape, tokens, float(series.params["weight_bits_per_param"]))
    return RooflineData(w.flops, w.nbytes, np.array([p.value(statistic) for p in series.points]), {"tokens": tokens})


def decode_data(series: MeasuredSeries, statistic: str = "median") -> RooflineData:
    shape = series.model_shape()
    b = np.array([p.x["batch"] for p in series.points])
    c = np.array([p.x["context"] for p in series.points])
    w = workload.decode_work(shape, b, c)
    times = np.array([p.value(statistic) for p in series.points])
    return RooflineData(w.flops, w.nbytes, times, {"batch": b, "context": c}, w.attention_share())


def tokens_data(series: MeasuredSeries, work_fn, statistic: str = "median") -> RooflineData:
    shape = series.model_shape()
    t = np.array([p.x["tokens"] for p in series.points])
    w = work_fn(shape, t)
    return RooflineData(w.flops, w.nbytes, np.array([p.value(statistic) for p in series.points]), {"tokens": t},
                        w.attention_share())


def fit_expert(series: MeasuredSeries, statistic: str = "median") -> ExpertKernelModel:
    return ExpertKernelModel(series.params["kernel"], series.params["library"],
                             float(series.params["weight_bits_per_param"]),
                             fit_roofline(expert_data(series, statistic), "tokens"))


def series_data(series: MeasuredSeries, statistic: str = "median") -> RooflineData:
    """A compute series as FLOPs, bytes, times and query variables."""
    key = series.key
    if key.startswith("expert/") or key.startswith("cpu_expert/"):
        return expert_data(series, statistic)
    if key.endswith("/decode"):
        return decode_data(series, statistic)
    if key.endswith("/prefill"):
        return tokens_data(series, workload.prefill_work, statistic)
    if key == "head":
        return tokens_data(series, workload.head_work, statistic)
    raise MoesimError(f"measured series '{key}': not a compute series")


def series_statistic(key: str, statistic: str) -> str:
    """The per-point statistic a series is fitted to: the profile's, except that a concurrent copy takes
    the median. Its fastest samples are those its partner direction happened not to overlap (on a CPU
    the partner is a thread between two copies), so a low percentile measures a copy alone again."""
    return "median" if key.startswith("copy/") and key.endswith("/concurrent") else statistic


def fit_series(series: MeasuredSeries, statistic: str = "median") -> RooflineModel | CopyModel | ExpertKernelModel:
    """The fitted model for one measured series, by its key."""
    key = series.key
    if key.startswith("copy/"):
        return fit_copy(series, series_statistic(key, statistic))
    if key.startswith("expert/") or key.startswith("cpu_expert/"):
        return fit_expert(series, statistic)
    if key.endswith("/decode"):
        return fit_roofline(series_data(series, statistic))
    if key.endswith("/prefill") or key == "head":
        return fit_roofline(series_data(series, statistic), "tokens")
    raise MoesimError(f"measured series '{key}': no model is fitted to this kind of series")


def fit_interference(measurements: tuple[MeasuredSeries, ...],
                     unmeasured: tuple[float, float] = (1.0, 1.0)) -> tuple[float, float]:
    """(compute slowdown while copying, copy slowdown while computing): median time with the partner
    over median time without, at least 1; ``unmeasured`` where a series is absent (a GPU: 1, independent)."""
    out = []
    for key, default in zip(("interference/compute", "interference/copy"), unmeasured):
        s = next((m for m in measurements if m.key == key), None)
        if s is None:
            out.append(default)
            continue
        by = {p.x["partner"]: p.value("median") for p in s.points}
        if set(by) != {0.0, 1.0}:
            raise MoesimError(f"measured series '{key}': expected points at partner 0 and 1, got {sorted(by)}")
        out.append(round(max(1.0, by[1.0] / by[0.0]), 4))
    return out[0], out[1]


def fit_profile_models(measurements: tuple[MeasuredSeries, ...], statistic: str = "median"):
    """(expert, cpu_expert, copies, non_expert, head) models from a profile's raw measurements."""
    expert: dict[str, ExpertKernelModel] = {}
    cpu_expert: dict[str, dict[int, ExpertKernelModel]] = {}
    copies: dict[str, CopyModel] = {}
    non_expert: dict[str, dict[str, RooflineModel]] = {}
    head = None
    floors = {s.key[len("floor/"):]: min(p.value(statistic) for p in s.points)
              for s in measurements if s.key.startswith("floor/")}
    for s in measurements:
        if s.key == "overhead" or s.key.startswith(("floor/", "interference/")):
            continue
        model = fit_series(s, statistic)
        if isinstance(model, ExpertKernelModel) and s.key in floors:
            model = dataclasses.replace(model, model=dataclasses.replace(model.model, floor_s=floors[s.key]))
        if s.key.startswith("copy/"):
            copies[s.key[len("copy/"):]] = model
        elif s.key.startswith("expert/"):
            expert[s.key.split("/")[1]] = model
        elif s.key.startswith("cpu_expert/"):
            _, kernel, threads = s.key.split("/")
            cpu_expert.setdefault(kernel, {})[int(threads.rstrip("t"))] = model
        elif s.key.startswith("non_expert/"):
            _, kernel, phase = s.key.split("/")
            non_expert.setdefault(kernel, {})[phase] = model
        elif s.key == "head":
            head = model
    if head is None:
        raise MoesimError("measurements have no 'head' series")
    return expert, cpu_expert, copies, non_expert, head


# ------------------------------------------------------------------------------------------ measuring


def _activation_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16  # Turing and older: the 16-bit kernel is fp16
    return torch.bfloat16


def _runtime_reserve(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        torch.ones(256, 256, device=device) @ torch.ones(256, 256, device=device)  # context + cuBLAS handle
        torch.cuda.synchronize(device)
        free, total = torch.cuda.mem_get_info(device)
        used_by_us = torch.cuda.memory_reserved(device)
        return int(total - free - used_by_us), "device memory in use after CUDA context and cuBLAS initialisation"
    return facts.process_rss_bytes(), "resident memory of this Python process with torch and transformers loaded"


def calibrate(opts: CalibOptions) -> HardwareProfile:
    started = time.perf_counter()
    log = opts.log
    device = facts.resolve_device(opts.device)
    cores = facts.cpu_cores()
    threads = opts.threads or cores
    if threads < 1 or threads > cores:
        raise MoesimError(f"--threads {threads}: expected 1..{cores} (the CPU cores available here)")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    shape = load_shape(opts.model_config)
    config = hf_config_for(opts.model_config, shape)
    act_dtype = _activation_dtype(device)
    statistic = opts.statistic if opts.statistic != "auto" else ("median" if device.type == "cuda" else "p10")
    reserve, reserve_note = _runtime_reserve(device)
    grids = opts.grids or grids_for(device, opts.quick, cores)
    policy = opts.policy or (RepeatPolicy.quick() if opts.quick else RepeatPolicy())
    timer = Timer(device, policy)
    cpu_timer = Timer(torch.device("cpu"), policy)
    candidates, dropped = probe_kernels(device, act_dtype)
    if "bf16" not in candidates:
        raise MoesimError(f"--device {opts.device}: the bf16 expert kernel does not run here ({dropped.get('bf16')})")
    kernels: dict[str, KernelInfo] = {}
    kernel_choice: dict[str, dict[str, float]] = {}
    for kernel, infos in candidates.items():
        kernels[kernel], times = fastest_kernel(shape, infos, device, act_dtype, timer)
        if times:
            kernel_choice[kernel] = times
    load_before = facts.load_average()
    if load_before is not None and load_before > 0.5 * cores:
        log(f"warning: load average {load_before:.1f} on {cores} cores: other processes compete for the CPU, "
            f"CPU-side timings will be noisy (fits use the per-point {statistic})")
    log(f"device {device}, {threads} threads, kernels {', '.join(kernels)}; model {shape.model_id}")
    series: list[MeasuredSeries] = []

    for kernel, info in list(kernels.items()):
        log(f"expert FFN {kernel} ...")
        try:
            dev_threads = threads if device.type == "cpu" else None
            series.append(expert_series(f"expert/{kernel}", shape, info, device, act_dtype, grids.expert_tokens,
                                        timer, Budget(grids.budget_expert_s, grids.complete), dev_threads))
            series.append(floor_series(f"expert/{kernel}", info, device, act_dtype, timer, dev_threads))
        except RuntimeError as exc:  # e.g. int4 packing needs K divisible by its group and tile sizes
            if kernel == "bf16":
                raise
            dropped[kernel] = f"does not run at {shape.model_id}'s shape: {str(exc).splitlines()[0][:200]}"
            del kernels[kernel]
            log(f"  {kernel} dropped: {dropped[kernel]}")

    # the host CPU computing experts (Fiddler-style), versus threads
    if device.type == "cuda":
        cpu_candidates, cpu_dropped = probe_kernels(torch.device("cpu"), torch.bfloat16)
        cpu_kernels = {k: v[0] for k, v in cpu_candidates.items()}
    else:
        cpu_kernels, cpu_dropped = kernels, dropped
    cpu_thread_grid = sorted(set(grids.cpu_threads) | ({threads} if device.type == "cpu" else set()))
    for t in cpu_thread_grid:
        for kernel, info in cpu_kernels.items():
            if device.type == "cpu" and t == threads:
                for key in (f"expert/{kernel}", f"floor/expert/{kernel}"):
                    dev = next((s for s in series if s.key == key), None)
                    if dev is not None:
                        series.append(MeasuredSeries(key.replace("expert/", "cpu_expert/", 1) + f"/{t}t",
                                                     dev.description, dev.shape, dev.params, dev.points))
                continue
            if opts.quick and kernel != "bf16":
                continue
            log(f"CPU expert FFN {kernel}, {t} threads ...")
            torch.set_num_threads(t)
            try:
                series.append(expert_series(f"cpu_expert/{kernel}/{t}t", shape, info, torch.device("cpu"),
                                            torch.bfloat16, grids.cpu_expert_tokens, cpu_timer,
                                            Budget(grids.budget_cpu_expert_s, grids.complete), t))
                series.append(floor_series(f"cpu_expert/{kernel}/{t}t", info, torch.device("cpu"), torch.bfloat16,
                                           cpu_timer, t))
            except RuntimeError as exc:
                if kernel == "bf16":
                    raise
                cpu_dropped[kernel] = f"does not run at {shape.model_id}'s shape: {str(exc).splitlines()[0][:200]}"
            finally:
                torch.set_num_threads(threads)

    log("copies ...")
    series.extend(copy_series(device, grids.copy_bytes, Timer(device, policy),
                              Budget(grids.budget_copy_s, grids.complete)))

    if device.type == "cpu":
        log("copies against compute ...")
        series.extend(interference_series(shape, kernels["bf16"], device, act_dtype, threads))

    log("non-expert layer (decode, prefill) ...")
    layer = build_attention_layer(config, device, act_dtype, first_moe_layer=shape.moe_layer_ids[0])
    half = grids.budget_non_expert_s / 2
    series.append(decode_series(layer, shape, grids.decode, timer, Budget(half, grids.complete)))
    series.append(prefill_series(layer, shape, grids.prefill_tokens, timer, Budget(half, grids.complete)))
    del layer

    log("head ...")
    series.append(head_series(shape, device, act_dtype, grids.head_tokens, timer,
                              Budget(grids.budget_head_s, grids.complete)))

    log("per-layer and per-step overheads ...")
    try:
        over = overhead_series(tiny_config(config), device, act_dtype, timer, statistic)
        over_note = over.note
    except Exception as exc:  # an architecture transformers cannot shrink: use a tiny Mixtral instead, and say so
        from moesim.modelspec import load_hf_config

        over = overhead_series(tiny_config(load_hf_config("mixtral-8x7b")), device, act_dtype, timer, statistic)
        over_note = f"{over.note} (tiny Mixtral: shrinking {shape.architecture} failed: {type(exc).__name__})"
    series.extend(over.series)

    log(f"fitting to the per-point {statistic} ...")
    measurements = tuple(series)
    expert, cpu_expert, copies, non_expert, head = fit_profile_models(measurements, statistic)
    slowdown = fit_interference(measurements)
    name, mem, dev_facts = facts.device_facts(device)
    dev_facts["kernels_not_available"] = {k: v for k, v in dropped.items()}
    dev_facts["kernel_choice_seconds_at_1_plus_64_tokens"] = kernel_choice
    dev_facts["activation_dtype"] = str(act_dtype).replace("torch.", "")
    host_info = HostInfo(facts.cpu_name(), cores, facts.host_memory_bytes(),
                         {"flags": facts.cpu_flags(), "cpu_kernels_not_available": cpu_dropped,
                          "load_average_1min_before": load_before, "load_average_1min_after": facts.load_average()})
    software = facts.software_versions()
    software["torch_num_threads"] = threads
    elapsed = time.perf_counter() - started
    profile_name = opts.name or ("cpu-calibrated" if device.type == "cpu" else _slug(name))
    return HardwareProfile(
        name=profile_name,
        derived_from_specs=False,
        device=DeviceInfo(name, device.type, mem, dev_facts),
        host=host_info,
        runtime_reserve_bytes=int(reserve),
        cpu_threads=threads if device.type == "cpu" else max(cpu_thread_grid),
        expert_models=expert,
        cpu_expert_models=cpu_expert,
        copy_models=copies,
        non_expert_models=non_expert,
        head_model=head,
        layer_overhead_s=over.layer_s,
        step_overhead_s=over.step_s,
        software=software,
        sources={"runtime_reserve_bytes": reserve_note, "overheads": over_note,
                 "model_config": str(opts.model_config)},
        efficiency={},
        notes=(f"measured by moesim calib{' --quick' if opts.quick else ''} in {elapsed:.0f} s at the shape of "
               f"{shape.model_id}"),
        created=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        measurements=measurements,
        fit_statistic=statistic,
        compute_slowdown_with_copy=slowdown[0],
        copy_slowdown_with_compute=slowdown[1],
    )


def refit(profile: HardwareProfile, statistic: str | None = None) -> HardwareProfile:
    """The same measurements fitted again (e.g. to another statistic)."""
    import dataclasses

    stat = statistic or profile.fit_statistic
    expert, cpu_expert, copies, non_expert, head = fit_profile_models(profile.measurements, stat)
    slowdown = fit_interference(profile.measurements,
                                (profile.compute_slowdown_with_copy, profile.copy_slowdown_with_compute))
    return dataclasses.replace(profile, expert_models=expert, cpu_expert_models=cpu_expert, copy_models=copies,
                               non_expert_models=non_expert, head_model=head, fit_statistic=stat,
                               compute_slowdown_with_copy=slowdown[0], copy_slowdown_with_compute=slowdown[1])


def _slug(text: str) -> str:
    out = "".join(ch.lower() if ch.isalnum() else "-" for ch in text)
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-") + "-measured"


def model_rows(profile: HardwareProfile) -> list[tuple[str, str, int, float | None, float | None]]:
    """(model, method, points, LOO mean error, LOO max error) for every fitted model of a profile."""
    rows = []
    for key, m in sorted(profile.copy_models.items()):
        rows.append((f"copy {key}", m.method, m.n_points, m.loo_rel_error, m.loo_max_rel_error))
    for k, m in profile.expert_models.items():
        rows.append((f"expert {k}", m.model.method, m.model.n_points, m.model.loo_rel_error, m.model.loo_max_rel_error))
    for k, per in profile.cpu_expert_models.items():
        for t, m in sorted(per.items()):
            rows.append((f"cpu_expert {k} {t}t", m.model.method, m.model.n_points, m.model.loo_rel_error,
                         m.model.loo_max_rel_error))
    for k, per in profile.non_expert_models.items():
        for phase, m in per.items():
            rows.append((f"non_expert {k} {phase}", m.method, m.n_points, m.loo_rel_error, m.loo_max_rel_error))
    h = profile.head_model
    rows.append(("head", h.method, h.n_points, h.loo_rel_error, h.loo_max_rel_error))
    return rows


def format_model_table(profile: HardwareProfile) -> str:
    lines = [f"{'model':<34} {'method':<26} {'points':>6} {'LOO mean':>9} {'LOO max':>8}"]
    for name, method, n, mean, mx in model_rows(profile):
        f = lambda v: "-" if v is None else f"{100 * v:.1f}%"
        lines.append(f"{name:<34} {method:<26} {n:>6} {f(mean):>9} {f(mx):>8}")
    return "\n".join(lines)
