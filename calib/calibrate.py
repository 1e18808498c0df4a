"""`moesim calib`: measure this machine at a model's shape and write a fitted hardware profile."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from moesim.calib import facts, workload
from moesim.calib.fit import RooflineData, fit_copy, fit_roofline
from moesim.calib.journal import CalibJournal, calibration_code_version, series_from_json, series_to_json, unit_key
from moesim.calib.kernels import KernelInfo, probe_kernels
from moesim.calib.layers import build_attention_layer, hf_config_for, tiny_config
from moesim.calib.measure import (
    CopyBench,
    DeviceClock,
    Grids,
    copy_series_from_samples,
    cpu_copy_point,
    cuda_copy_samples,
    decode_device_series,
    decode_series,
    expert_series,
    fastest_kernel,
    floor_series,
    grids_for,
    head_series,
    interference_series,
    overhead_series,
    prefill_device_series,
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
    journal: CalibJournal | None = None  # finished units of an interrupted run; None: nothing kept on disk
    progress: Callable[[int], Any] | None = None  # total units -> an object with update() and close()


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
        if s.key == "overhead" or s.key.startswith(("floor/", "interference/", "non_expert_device/")):
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


def fit_device_time_models(measurements: tuple[MeasuredSeries, ...],
                           statistic: str = "median") -> dict[str, dict[str, RooflineModel]]:
    """kernel -> phase -> the non-expert layer's GPU kernel time (``non_expert_device/`` series), for the
    phases where one was measured and fitted; a series the roofline cannot fit leaves its phase out."""
    out: dict[str, dict[str, RooflineModel]] = {}
    for s in measurements:
        if not s.key.startswith("non_expert_device/"):
            continue
        _, kernel, phase = s.key.split("/")
        try:
            out.setdefault(kernel, {})[phase] = fit_series(s, statistic)
        except MoesimError:
            continue
    return out


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


@dataclass
class CalibRun:
    """What every step of one calibration shares: the settings, the journal and what was measured so far."""

    opts: CalibOptions
    device: torch.device
    cores: int
    threads: int
    shape: Any
    config: Any
    act_dtype: torch.dtype
    statistic: str
    grids: Grids
    policy: RepeatPolicy
    journal: CalibJournal
    context: dict[str, Any]
    kernels: dict[str, KernelInfo] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    kernel_choice: dict[str, dict[str, float]] = field(default_factory=dict)
    series: list[MeasuredSeries] = field(default_factory=list)
    progress: Any = None

    def log(self, msg: str) -> None:
        self.opts.log(msg)

    @property
    def timer(self) -> Timer:
        return Timer(self.device, self.policy)

    def unit(self, name: str, params: dict[str, Any], measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """One journaled unit: reused when an earlier run finished it with the same content key."""
        key = unit_key(self.context, name, params)
        reused = key in self.journal
        if not reused:
            self.log(f"{name} ...")
        payload = self.journal.run(key, name, measure)
        if reused:
            self.log(f"{name}: kept from the journal of an interrupted run")
        if self.progress is not None:
            (self.progress.reused if reused else self.progress.update)(1)
        return payload


def _start(opts: CalibOptions) -> CalibRun:
    """Resolve the device, threads, model and grids, and open the journal."""
    device = facts.resolve_device(opts.device)
    cores = facts.cpu_cores()
    threads = cores if opts.threads is None else opts.threads  # 0 is not "all cores": the flag says 1..N
    if threads < 1 or threads > cores:
        raise MoesimError(f"--threads {threads}: expected 1..{cores} (the CPU cores available here)")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    shape = load_shape(opts.model_config)
    act_dtype = _activation_dtype(device)
    statistic = opts.statistic if opts.statistic != "auto" else ("median" if device.type == "cuda" else "p10")
    grids = opts.grids or grids_for(device, opts.quick, cores)
    policy = opts.policy or (RepeatPolicy.quick() if opts.quick else RepeatPolicy())
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else facts.cpu_name()
    # everything a unit's numbers depend on besides its own grid: a change here measures afresh
    context = {"device": str(device), "device_name": device_name, "cpu": facts.cpu_name(), "cores": cores,
               "threads": threads, "torch": torch.__version__, "activation_dtype": str(act_dtype),
               "shape": shape.to_dict(), "policy": dataclasses.asdict(policy), "statistic": statistic,
               "code": calibration_code_version()}
    journal = opts.journal if opts.journal is not None else CalibJournal(None)
    return CalibRun(opts, device, cores, threads, shape, hf_config_for(opts.model_config, shape), act_dtype,
                    statistic, grids, policy, journal, context)


def _choose_kernels(run: CalibRun) -> None:
    """Which expert kernels run here, and of several implementations of one format the fastest."""

    def measure() -> dict[str, Any]:
        candidates, dropped = probe_kernels(run.device, run.act_dtype)
        chosen, choice = {}, {}
        for kernel, infos in candidates.items():
            chosen[kernel], times = fastest_kernel(run.shape, infos, run.device, run.act_dtype, run.timer)
            if times:
                choice[kernel] = times
        return {"kernels": {k: dataclasses.asdict(v) for k, v in chosen.items()}, "dropped": dropped,
                "choice": choice}

    payload = run.unit("kernel choice", {}, measure)
    run.kernels = {k: KernelInfo(**v) for k, v in payload["kernels"].items()}
    run.dropped = dict(payload["dropped"])
    run.kernel_choice = dict(payload["choice"])
    if "bf16" not in run.kernels:
        raise MoesimError(f"--device {run.opts.device}: the bf16 expert kernel does not run here "
                          f"({run.dropped.get('bf16')})")


def _expert_unit(run: CalibRun, key: str, info: KernelInfo, device: torch.device, dtype: torch.dtype,
                 tokens: tuple[int, ...], budget_s: float, threads: int | None, timer: Timer) -> dict[str, Any]:
    """One kernel's timing group (the expert FFN over the token grid and its launch floor), or why it
    does not run at this shape."""

    def measure() -> dict[str, Any]:
        try:
            budget = Budget(budget_s, run.grids.complete)
            found = [expert_series(key, run.shape, info, device, dtype, tokens, timer, budget, threads),
                     floor_series(key, info, device, dtype, timer, threads)]
        except RuntimeError as exc:  # e.g. int4 packing needs K divisible by its group and tile sizes
            if info.kernel == "bf16":
                raise
            return {"dropped": f"does not run at {run.shape.model_id}'s shape: {str(exc).splitlines()[0][:200]}"}
        return {"series": series_to_json(found)}

    params = {"kernel": dataclasses.asdict(info), "tokens": list(tokens), "budget_s": budget_s,
              "complete": run.grids.complete, "threads": threads, "dtype": str(dtype)}
    return run.unit(key, params, measure)


def _measure_device_experts(run: CalibRun) -> None:
    for kernel, info in list(run.kernels.items()):
        threads = run.threads if run.device.type == "cpu" else None
        payload = _expert_unit(run, f"expert/{kernel}", info, run.device, run.act_dtype, run.grids.expert_tokens,
                               run.grids.budget_expert_s, threads, run.timer)
        if "dropped" in payload:
            run.dropped[kernel] = payload["dropped"]
            del run.kernels[kernel]
            run.log(f"  {kernel} dropped: {payload['dropped']}")
            continue
        run.series.extend(series_from_json(payload["series"], f"journal unit expert/{kernel}"))


def _cpu_thread_grid(run: CalibRun) -> list[int]:
    return sorted(set(run.grids.cpu_threads) | ({run.threads} if run.device.type == "cpu" else set()))


def _measure_cpu_experts(run: CalibRun) -> dict[str, str]:
    """The host CPU computing experts (Fiddler-style), versus threads; returns the CPU kernels dropped."""
    cpu = torch.device("cpu")
    if run.device.type == "cuda":
        cpu_candidates, cpu_dropped = probe_kernels(cpu, torch.bfloat16)
        cpu_kernels = {k: v[0] for k, v in cpu_candidates.items()}
    else:
        cpu_kernels, cpu_dropped = run.kernels, run.dropped
    for t in _cpu_thread_grid(run):
        for kernel, info in cpu_kernels.items():
            if run.device.type == "cpu" and t == run.threads:  # the device's own expert series, renamed
                for key in (f"expert/{kernel}", f"floor/expert/{kernel}"):
                    dev = next((s for s in run.series if s.key == key), None)
                    if dev is not None:
                        run.series.append(MeasuredSeries(key.replace("expert/", "cpu_expert/", 1) + f"/{t}t",
                                                         dev.description, dev.shape, dev.params, dev.points))
                continue
            if run.opts.quick and kernel != "bf16":
                continue
            torch.set_num_threads(t)
            try:
                payload = _expert_unit(run, f"cpu_expert/{kernel}/{t}t", info, cpu, torch.bfloat16,
                                       run.grids.cpu_expert_tokens, run.grids.budget_cpu_expert_s, t,
                                       Timer(cpu, run.policy))
            finally:
                torch.set_num_threads(run.threads)
            if "dropped" in payload:
                cpu_dropped[kernel] = payload["dropped"]
                continue
            run.series.extend(series_from_json(payload["series"], f"journal unit cpu_expert/{kernel}/{t}t"))
    return cpu_dropped


def _measure_copies(run: CalibRun) -> None:
    """Host<->device copies: on a CPU each size is its own unit; on CUDA the sizes are timed in
    interleaved passes, so all of them are one unit."""
    sizes = run.grids.copy_bytes
    threads = torch.get_num_threads()
    bench: list[CopyBench] = []  # allocated once, and only when a size is measured

    def the_bench() -> CopyBench:
        if not bench:
            bench.append(CopyBench(run.device, max(sizes)))
        return bench[0]

    if run.device.type == "cpu":
        samples: dict[str, dict[int, list[float]]] = {}
        for pinned in (True, False):
            for n in sizes:
                tag = "pinned" if pinned else "pageable"
                payload = run.unit(f"copy/{tag}/{n}", {"bytes": n, "pinned": pinned, "buffer": max(sizes)},
                                   lambda: {"samples": cpu_copy_point(the_bench(), pinned, n, run.policy)})
                for key, s in payload["samples"].items():
                    samples.setdefault(key, {})[n] = [float(v) for v in s]
    else:
        def measure() -> dict[str, Any]:
            found = cuda_copy_samples(the_bench(), sizes, run.policy, Budget(run.grids.budget_copy_s))
            return {"samples": {k: {str(n): s for n, s in v.items()} for k, v in found.items()}}

        payload = run.unit("copies", {"sizes": list(sizes), "budget_s": run.grids.budget_copy_s}, measure)
        samples = {k: {int(n): s for n, s in v.items()} for k, v in payload["samples"].items()}
    bench.clear()
    run.series.extend(copy_series_from_samples(run.device, samples, threads))


def _measure_interference(run: CalibRun) -> None:
    """A CPU device shares its memory bus and cores between copies and compute: both slowdowns."""
    if run.device.type != "cpu":
        return
    payload = run.unit("copies against compute", {"kernel": dataclasses.asdict(run.kernels["bf16"])},
                       lambda: {"series": series_to_json(interference_series(
                           run.shape, run.kernels["bf16"], run.device, run.act_dtype, run.threads))})
    run.series.extend(series_from_json(payload["series"], "journal unit copies against compute"))


def _measure_non_expert(run: CalibRun) -> None:
    """The decoder layer without its routed experts, decode and prefill (one unit each)."""
    layer: list[Any] = []  # built once, and only when a phase is measured

    def the_layer():
        if not layer:
            layer.append(build_attention_layer(run.config, run.device, run.act_dtype,
                                               first_moe_layer=run.shape.moe_layer_ids[0]))
        return layer[0]

    half = run.grids.budget_non_expert_s / 2
    decode = run.unit("non-expert layer, decode", {"grid": [list(p) for p in run.grids.decode], "budget_s": half,
                                                   "complete": run.grids.complete},
                      lambda: {"series": series_to_json([decode_series(
                          the_layer(), run.shape, run.grids.decode, run.timer, Budget(half, run.grids.complete))])})
    prefill = run.unit("non-expert layer, prefill", {"tokens": list(run.grids.prefill_tokens), "budget_s": half,
                                                     "complete": run.grids.complete},
                       lambda: {"series": series_to_json([prefill_series(
                           the_layer(), run.shape, run.grids.prefill_tokens, run.timer,
                           Budget(half, run.grids.complete))])})
    found = {name: series_from_json(payload["series"], f"journal unit non-expert layer, {name}")
             for name, payload in (("decode", decode), ("prefill", prefill))}
    for name in ("decode", "prefill"):
        run.series.extend(found[name])
    if run.device.type == "cuda":
        # the same points timed as kernels only: a decode loop hides the launches behind the GPU's backlog
        measure_kernels = {"decode": decode_device_series, "prefill": prefill_device_series}
        clock = DeviceClock(run.device)
        for name in ("decode", "prefill"):
            wall = found[name][0]

            def kernels(wall=wall, name=name) -> dict[str, Any]:
                s = measure_kernels[name](the_layer(), wall, clock)
                return {"series": series_to_json([s] if s is not None else [])}

            payload = run.unit(f"non-expert layer, {name}, kernel time",
                               {"points": [p.x for p in wall.points]}, kernels)
            got = series_from_json(payload["series"], f"journal unit non-expert layer, {name}, kernel time")
            if not got:
                run.log(f"  non-expert {name}: the profiler timed fewer than 4 points; no kernel-time model, "
                        f"the layer costs its host-to-host time")
            run.series.extend(got)
    layer.clear()


def _measure_head(run: CalibRun) -> None:
    g = run.grids
    payload = run.unit("head", {"tokens": list(g.head_tokens), "budget_s": g.budget_head_s, "complete": g.complete},
                       lambda: {"series": series_to_json([head_series(
                           run.shape, run.device, run.act_dtype, g.head_tokens, run.timer,
                           Budget(g.budget_head_s, g.complete))])})
    run.series.extend(series_from_json(payload["series"], "journal unit head"))


def _measure_overheads(run: CalibRun) -> tuple[float, float, str]:
    """Per-layer and per-step Python overheads; returns (layer_s, step_s, how they were found)."""

    def measure() -> dict[str, Any]:
        try:
            over = overhead_series(tiny_config(run.config), run.device, run.act_dtype, run.timer, run.statistic)
            note = over.note
        except Exception as exc:  # an architecture transformers cannot shrink: a tiny Mixtral instead, said so
            from moesim.modelspec import load_hf_config

            over = overhead_series(tiny_config(load_hf_config("mixtral-8x7b")), run.device, run.act_dtype,
                                   run.timer, run.statistic)
            note = f"{over.note} (tiny Mixtral: shrinking {run.shape.architecture} failed: {type(exc).__name__})"
        return {"layer_s": over.layer_s, "step_s": over.step_s, "note": note,
                "series": series_to_json(list(over.series))}

    payload = run.unit("per-layer and per-step overheads", {}, measure)
    run.series.extend(series_from_json(payload["series"], "journal unit overheads"))
    return float(payload["layer_s"]), float(payload["step_s"]), str(payload["note"])


def _planned_units(run: CalibRun) -> int:
    """How many units are left after the kernel choice (the progress count)."""
    cpu_kernels = len(run.kernels) if run.device.type == "cpu" else 3
    cpu_units = sum(1 for t in _cpu_thread_grid(run) if not (run.device.type == "cpu" and t == run.threads))
    cpu_units *= 1 if run.opts.quick else cpu_kernels
    copies = 2 * len(run.grids.copy_bytes) if run.device.type == "cpu" else 1
    interference = 1 if run.device.type == "cpu" else 0
    kernel_times = 2 if run.device.type == "cuda" else 0  # the non-expert layer's kernels alone, each phase
    return len(run.kernels) + cpu_units + copies + interference + 2 + kernel_times + 1 + 1


def _measure_all(run: CalibRun) -> tuple[dict[str, str], tuple[float, float, str]]:
    """Every unit after the kernel choice, in order; returns (CPU kernels dropped, overheads)."""
    if run.opts.progress:
        run.progress = run.opts.progress(_planned_units(run))
    try:
        _measure_device_experts(run)
        cpu_dropped = _measure_cpu_experts(run)
        _measure_copies(run)
        _measure_interference(run)
        _measure_non_expert(run)
        _measure_head(run)
        overheads = _measure_overheads(run)
        if run.progress is not None and run.progress.done < run.progress.total:
            run.progress.update(run.progress.total - run.progress.done)  # the skipped units of a dropped kernel
    finally:
        if run.progress is not None:
            run.progress.close()
    return cpu_dropped, overheads


def calibrate(opts: CalibOptions) -> HardwareProfile:
    """Measure every unit (or take it from the journal of an interrupted run), then fit the profile."""
    started = time.perf_counter()
    run = _start(opts)
    reserve, reserve_note = _runtime_reserve(run.device)
    load_before = facts.load_average()
    if load_before is not None and load_before > 0.5 * run.cores:
        run.log(f"warning: load average {load_before:.1f} on {run.cores} cores: other processes compete for the "
                f"CPU, CPU-side timings will be noisy (fits use the per-point {run.statistic})")
    _choose_kernels(run)
    run.log(f"device {run.device}, {run.threads} threads, kernels {', '.join(run.kernels)}; "
            f"model {run.shape.model_id}")
    cpu_dropped, overheads = _measure_all(run)
    if run.journal.reused:
        run.log(f"resumed: {run.journal.reused} units kept from the journal of an interrupted run")
    run.log(f"fitting to the per-point {run.statistic} ...")
    return _assemble_profile(run, reserve, reserve_note, load_before, cpu_dropped, overheads,
                             time.perf_counter() - started)


def _assemble_profile(run: CalibRun, reserve: int, reserve_note: str, load_before: float | None,
                      cpu_dropped: dict[str, str], overheads: tuple[float, float, str],
                      elapsed: float) -> HardwareProfile:
    """The fitted profile from the measured series and the facts of this machine."""
    measurements = tuple(run.series)
    expert, cpu_expert, copies, non_expert, head = fit_profile_models(measurements, run.statistic)
    slowdown = fit_interference(measurements)
    name, mem, dev_facts = facts.device_facts(run.device)
    dev_facts["kernels_not_available"] = dict(run.dropped)
    dev_facts["kernel_choice_seconds_at_1_plus_64_tokens"] = run.kernel_choice
    dev_facts["activation_dtype"] = str(run.act_dtype).replace("torch.", "")
    host_info = HostInfo(facts.cpu_name(), run.cores, facts.host_memory_bytes(),
                         {"flags": facts.cpu_flags(), "cpu_kernels_not_available": cpu_dropped,
                          "load_average_1min_before": load_before, "load_average_1min_after": facts.load_average()})
    software = facts.software_versions()
    software["torch_num_threads"] = run.threads
    opts = run.opts
    profile_name = opts.name or ("cpu-calibrated" if run.device.type == "cpu" else _slug(name))
    resumed = f"; {run.journal.reused} units resumed from an interrupted run" if run.journal.reused else ""
    return HardwareProfile(
        name=profile_name,
        derived_from_specs=False,
        device=DeviceInfo(name, run.device.type, mem, dev_facts),
        host=host_info,
        runtime_reserve_bytes=int(reserve),
        cpu_threads=run.threads if run.device.type == "cpu" else max(_cpu_thread_grid(run)),
        expert_models=expert,
        cpu_expert_models=cpu_expert,
        copy_models=copies,
        non_expert_models=non_expert,
        non_expert_device_models=fit_device_time_models(measurements, run.statistic),
        head_model=head,
        layer_overhead_s=overheads[0],
        step_overhead_s=overheads[1],
        software=software,
        sources={"runtime_reserve_bytes": reserve_note, "overheads": overheads[2],
                 "model_config": str(opts.model_config)},
        efficiency={},
        notes=(f"measured by moesim calib{' --quick' if opts.quick else ''} in {elapsed:.0f} s at the shape of "
               f"{run.shape.model_id}{resumed}"),
        created=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        measurements=measurements,
        fit_statistic=run.statistic,
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
                               non_expert_models=non_expert,
                               non_expert_device_models=fit_device_time_models(profile.measurements, stat),
                               head_model=head, fit_statistic=stat,
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
    for k, per in profile.non_expert_device_models.items():
        for phase, m in per.items():
            rows.append((f"non_expert {k} {phase} kernels", m.method, m.n_points, m.loo_rel_error,
                         m.loo_max_rel_error))
    h = profile.head_model
    rows.append(("head", h.method, h.n_points, h.loo_rel_error, h.loo_max_rel_error))
    return rows


def format_model_table(profile: HardwareProfile) -> str:
    lines = [f"{'model':<34} {'method':<26} {'points':>6} {'LOO mean':>9} {'LOO max':>8}"]
    for name, method, n, mean, mx in model_rows(profile):
        f = lambda v: "-" if v is None else f"{100 * v:.1f}%"
        lines.append(f"{name:<34} {method:<26} {n:>6} {f(mean):>9} {f(mx):>8}")
    return "\n".join(lines)
