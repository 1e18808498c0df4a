"""`moesim search`, `moesim costmodel fit|show|predict`, and `moesim sweep` with the cost model's --screen."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Optional

import click

from moesim.errors import MoesimError
from moesim.options import (batch_list, batch_option, byte_size, cache_experts_list, cache_experts_option,
                            check_batches, check_cache_experts, jobs_option, out_option, policy_option, split_list)
from moesim.simulator.cli import SWEEP_HELP, sweep_main, sweep_options
from moesim.tracer.format import trace_requests
from moesim.units import parse_seconds


def _split(text: Optional[str], flag: str = "") -> list[str]:
    return split_list(text, flag)


def _ints(text: Optional[str], flag: str) -> list[int]:
    return batch_list(text, flag) if flag == "--batch" else cache_experts_list(text, flag)


def _formats(text: Optional[str], flag: str) -> list[Optional[str]]:
    from moesim.costmodel.space import parse_format_choice

    return [parse_format_choice(t, flag) for t in _split(text, flag)]


def _load_model(path: Optional[str]):
    from moesim.costmodel.model import CostModel

    return CostModel.load(path)


def _space(ctx, policies, cache_experts, expert_bits, non_expert_bits, batches):
    from moesim.costmodel.search import SpaceSpec, default_space
    from moesim.simulator.compose import policy_names

    base = default_space(ctx)
    pols = policy_names(_split(policies, "--policy"))
    sizes = cache_experts_list(cache_experts)
    check_cache_experts(sizes, ctx.E)
    efs = _formats(expert_bits, "--expert-bits")
    nfs = _formats(non_expert_bits, "--non-expert-bits")
    bs = batch_list(batches)
    check_batches(bs, trace_requests(ctx.trace_path))
    return SpaceSpec(tuple(pols) or base.policies, tuple(sizes) or base.cache_sizes, tuple(efs) or base.expert_formats,
                     tuple(nfs) or base.non_expert_formats, tuple(bs) or base.batches)


@click.command(name="search")
@click.option("--trace", "trace_spec", default=None, help="Trace file or bundled name (default: the bundled Qwen3 "
              "trace).")
@click.option("--profile", "profile_spec", default="rtx-3060", show_default=True,
              help="Hardware profile: bundled name or PROFILE.json.")
@click.option("--objective", default="tpot", show_default=True,
              type=click.Choice(["tpot", "ttft", "tokens-per-s", "memory"]), help="What to minimise (tokens-per-s: "
              "maximise).")
@click.option("--max-gpu-mem", default=None, help="Peak GPU memory bound, e.g. 16GiB (default: the profile's device).")
@click.option("--max-tpot", default=None, help="Mean time per output token bound, e.g. 0.5s or 80ms.")
@click.option("--max-ttft", default=None, help="Mean time to first token bound, e.g. 2s.")
@click.option("--max-ppl", type=float, default=None, help="Perplexity bound (needs --quality-table).")
@click.option("--quality-table", default=None, type=click.Path(dir_okay=False),
              help="Quality table JSON written by `moesim quality` (perplexity per expert format).")
@click.option("--quality-model", default=None, help="Model id (or checkpoint hash) to read in the quality table "
              "(default: the trace's model id).")
@policy_option(many=True, default=None, dest="policies", extra="Default: every preset except the Belady oracle.")
@cache_experts_option(many=True, extra="Default: 0..E.")
@click.option("--expert-bits", default=None, help="Expert formats to search, e.g. trace,16,8,4,3,2 (the default).")
@click.option("--non-expert-bits", default=None, help="Non-expert formats to search (default: trace,16,8,4).")
@batch_option(many=True, default=None, extra="Default: 1 and powers of two up to the trace's requests.")
@click.option("--confirm", type=int, default=8, show_default=True, help="Best predicted configurations the "
              "simulator confirms (plus near-ties and the thinned Pareto front).")
@click.option("--front-points", type=int, default=10, show_default=True, help="Predicted Pareto-front points to "
              "confirm.")
@jobs_option("Simulator processes (default: one per core).")
@click.option("--model", "model_path", default=None, type=click.Path(dir_okay=False),
              help="Cost model artifact (default: the bundled costmodel/artifacts/costmodel.json).")
@out_option("folder", "write report.md with the plots, confirmed.csv and search.json into it.", dest="report_dir",
            flag="--report")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False, allow_dash=True),
              help="Write the result as JSON ('-': only the JSON, to stdout).")
def search_command(trace_spec, profile_spec, objective, max_gpu_mem, max_tpot, max_ttft, max_ppl, quality_table,
                   quality_model, policies, cache_experts, expert_bits, non_expert_bits, batches, confirm, front_points,
                   jobs, model_path, report_dir, json_path):
    """Find the best configuration for a trace on a profile: screen every configuration with the cost
    model, confirm the best and the Pareto front with the simulator, print the commands that reproduce it.

    Exits 0 when a configuration meets the constraints, 1 when none does (the nearest points are shown).
    """
    import json

    from moesim.atomic import write_text_atomic
    from moesim.costmodel.context import TraceProfileContext
    from moesim.costmodel.report import result_json, write_report
    from moesim.costmodel.search import Constraints, format_result, search
    from moesim.traces import resolve_trace

    trace_path = resolve_trace(trace_spec)
    trace = trace_spec if trace_spec else trace_path.stem
    if max_ppl is not None and quality_table is None:
        raise MoesimError("--max-ppl needs perplexities: pass --quality-table PATH (written by `moesim quality`)")
    if max_ppl is not None and not (max_ppl > 0 and math.isfinite(max_ppl)):
        raise MoesimError(f"--max-ppl {max_ppl}: expected a positive number")
    constraints = Constraints(
        max_gpu_mem=byte_size(max_gpu_mem, "--max-gpu-mem"),
        max_tpot=parse_seconds(max_tpot, "--max-tpot") if max_tpot is not None else None,
        max_ttft=parse_seconds(max_ttft, "--max-ttft") if max_ttft is not None else None,
        max_ppl=max_ppl,
    )
    for name, v in (("--max-gpu-mem", constraints.max_gpu_mem), ("--max-tpot", constraints.max_tpot),
                    ("--max-ttft", constraints.max_ttft)):
        if v is not None and not v > 0:
            raise MoesimError(f"{name} {v}: expected a positive value")
    if front_points < 2:
        raise MoesimError(f"--front-points {front_points}: expected at least 2")
    from moesim.atomic import check_output_target

    # outputs are checked before the work, so a read-only target fails now rather than after the search
    if report_dir is not None:
        check_output_target(Path(report_dir) / "report.md")
    to_stdout = json_path == "-"
    if json_path is not None and not to_stdout:
        check_output_target(json_path)
    model = _load_model(model_path)
    ctx = TraceProfileContext(trace, profile_spec)
    space = _space(ctx, policies, cache_experts, expert_bits, non_expert_bits, batches)
    t0 = time.perf_counter()
    log = lambda msg: click.echo(f"search [{time.perf_counter() - t0:6.1f}s]: {msg}", err=True)  # noqa: E731
    result = search(trace, profile_spec, objective, constraints, model=model, space=space,
                    quality_table=quality_table, quality_model=quality_model, confirm=confirm,
                    front_points=front_points, jobs=jobs, log=log, progress=True)
    if not to_stdout:
        click.echo(format_result(result), nl=False)
    if report_dir is not None:
        files = write_report(result, report_dir)
        click.echo(f"report: {files['report']}", err=to_stdout)
    if json_path is not None:
        text = json.dumps(result_json(result), indent=1) + "\n"
        if to_stdout:
            click.echo(text, nl=False)
        else:
            write_text_atomic(json_path, text)
            click.echo(f"result: {json_path}")
    if not result.found:
        sys.exit(1)


@click.group(name="costmodel")
def costmodel_group():
    """Fit, inspect and query the cost model that `moesim search` screens configurations with."""


@costmodel_group.command(name="fit")
@click.option("--trace", "traces", default=None, help="Comma-separated traces to fit on (default: every bundled trace).")
@click.option("--profile", "profiles", default=None, help="Comma-separated profiles (default: every bundled profile).")
@click.option("--per-preset", type=int, default=None, help="Configurations per preset per trace x profile "
              "(default: 3).")
@click.option("--seed", type=int, default=None, help="Sampling seed (default: 1).")
@jobs_option("Simulator processes (default: one per core).")
@out_option("file", "the artifact to write (default: the bundled costmodel/artifacts/costmodel.json).",
            dest="out_path")
@click.option("--force", is_flag=True, help="Refit even when the artifact is up to date.")
def fit_command(traces, profiles, per_preset, seed, jobs, out_path, force):
    """Simulate a stratified Latin-hypercube sample of configurations (cached under $MOESIM_CACHE_DIR/costmodel), compare
    corrections by cross-validation, and write the artifact. Does nothing when the artifact is up to date
    (same simulator, traces, profiles and settings) unless --force."""
    from moesim.atomic import check_output_target, write_text_atomic
    from moesim.calib.profile import bundled_profiles, load_profile
    from moesim.costmodel.fit import DEFAULT_PER_PRESET, DEFAULT_SEED, fit_costmodel, format_cv
    from moesim.costmodel.model import CostModel, default_artifact_path
    from moesim.simulator.presets import PRESETS
    from moesim.traces import bundled_traces, resolve_trace

    trace_list = _split(traces, "--trace") or sorted(bundled_traces())
    for t in trace_list:
        resolve_trace(t)
    profile_list = _split(profiles, "--profile") or sorted(bundled_profiles())
    for p in profile_list:
        load_profile(p)
    per = per_preset if per_preset is not None else DEFAULT_PER_PRESET
    sd = seed if seed is not None else DEFAULT_SEED
    if per < 1:
        raise MoesimError(f"--per-preset {per}: expected a positive integer")
    out = Path(out_path) if out_path else default_artifact_path()
    check_output_target(out)  # before minutes of simulating (e.g. --out naming one of its --trace files)
    presets = list(PRESETS.names())
    if out.exists() and not force:
        try:
            current = CostModel.load(out)
        except MoesimError:
            current = None
        if current is not None:
            stale = current.stale_reasons()
            sampling = current.meta.get("sampling", {})
            same_inputs = (sorted(current.meta.get("fitted_on", {}).get("traces", {})) == sorted(trace_list)
                           and sorted(current.meta.get("fitted_on", {}).get("profiles", {})) == sorted(profile_list)
                           and sampling.get("seed") == sd and sampling.get("per_preset") == per
                           and sampling.get("presets") == presets)
            if not stale and same_inputs:
                click.echo(f"{out}: up to date (fitted on the current simulator, traces and profiles); --force refits")
                return
            for s in stale:
                click.echo(f"refitting: {s}", err=True)
    t0 = time.perf_counter()
    log = lambda msg: click.echo(f"costmodel fit [{time.perf_counter() - t0:6.1f}s]: {msg}", err=True)  # noqa: E731
    model, report = fit_costmodel(trace_list, profile_list, presets, per, sd, jobs, log=log)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, model.to_json())
    click.echo(f"cross-validated MAPE on {report.samples} simulated configurations:")
    click.echo(format_cv(report.cross_validation, report.choice))
    click.echo(f"artifact: {out} ({out.stat().st_size / 1024:.0f} KiB)")


@costmodel_group.command(name="show")
@click.option("--model", "model_path", default=None, type=click.Path(dir_okay=False),
              help="Cost model artifact (default: the bundled one).")
def show_command(model_path):
    """What the artifact was fitted on, how each correction was chosen, and whether it is stale."""
    from moesim.costmodel.fit import format_cv

    model = _load_model(model_path)
    m = model.meta
    click.echo(f"cost model: {model.path}")
    click.echo(f"  fitted with moesim {m.get('moesim_version', '?')} (simulator hash {str(m.get('moesim_sha256', '?'))[:16]})")
    fitted = m.get("fitted_on", {})
    for kind in ("traces", "profiles"):
        items = fitted.get(kind, {})
        click.echo(f"  {kind}: " + ", ".join(f"{k} ({v[:12]})" for k, v in sorted(items.items())))
    s = m.get("sampling", {})
    if s:
        click.echo(f"  sampling: {s.get('runs')} runs ({s.get('runs_with_timings')} with timings), seed {s.get('seed')}, "
                   f"{s.get('per_preset')} per preset per trace x profile; {s.get('method')}")
    cv = m.get("cross_validation_mape")
    if cv:
        click.echo("  5-fold cross-validated MAPE of the candidates:")
        for line in format_cv(cv, m.get("chosen", {})).splitlines():
            click.echo("    " + line)
    stale = model.stale_reasons()
    click.echo("  status: " + ("up to date" if not stale else "STALE: " + "; ".join(stale)))


@costmodel_group.command(name="predict")
@click.option("--trace", "trace_spec", default=None, help="Trace file or bundled name.")
@click.option("--profile", "profile_spec", default="rtx-3060", show_default=True)
@policy_option(many=True)
@cache_experts_option(many=True, required=True)
@click.option("--expert-bits", default="trace", show_default=True, help="Comma-separated expert formats.")
@click.option("--non-expert-bits", default="trace", show_default=True, help="Comma-separated non-expert formats.")
@batch_option(many=True)
@click.option("--model", "model_path", default=None, type=click.Path(dir_okay=False))
def predict_command(trace_spec, profile_spec, policy, cache_experts, expert_bits, non_expert_bits, batches, model_path):
    """Predicted TTFT, TPOT, tokens/s and peak GPU memory of a grid of configurations (no simulation)."""
    from moesim.costmodel.context import TraceProfileContext
    from moesim.costmodel.space import enumerate_space, format_label
    from moesim.simulator.compose import policy_names
    from moesim.traces import resolve_trace

    trace = trace_spec if trace_spec else resolve_trace(None).stem
    model = _load_model(model_path)
    ctx = TraceProfileContext(trace, profile_spec)
    pols = policy_names(_split(policy, "--policy"))
    sizes = cache_experts_list(cache_experts)
    check_cache_experts(sizes, ctx.E)
    bs = _ints(batches, "--batch") or [1]
    check_batches(bs, trace_requests(ctx.trace_path))
    grid = enumerate_space(pols, sizes, _formats(expert_bits, "--expert-bits"),
                           _formats(non_expert_bits, "--non-expert-bits"), bs)
    t0 = time.perf_counter()
    pred = model.predict(ctx, grid)
    dt = time.perf_counter() - t0
    click.echo(f"{'policy':<26} {'cache':>5} {'experts':<10} {'non-expert':<10} {'batch':>5} {'peak_gpu_mib':>12} "
               f"{'tpot_ms':>9} {'ttft_ms':>9} {'tok/s':>8}")
    for i in range(len(grid)):
        p, c, e, n, b = grid.row(i)
        if pred.valid[i]:
            nums = f"{pred.tpot_s[i] * 1e3:9.2f} {pred.ttft_s[i] * 1e3:9.1f} {pred.tokens_per_s[i]:8.2f}"
        else:
            nums = f"  cannot run: {pred.reason[i]}"
        click.echo(f"{p:<26} {c:>5} {format_label(e):<10} {format_label(n):<10} {b:>5} "
                   f"{pred.peak_gpu_bytes[i] / 2**20:12.0f} {nums}")
    click.echo(f"{len(grid)} configurations predicted in {dt:.2f} s", err=True)


def _screen(points: list) -> tuple[list, str]:
    from moesim.costmodel.screen import screen_points

    screened = screen_points(points)
    return screened.kept, screened.summary()


@click.command(name="sweep", help=SWEEP_HELP)
@sweep_options
@click.option("--screen", is_flag=True, help="Skip the configurations the cost model predicts are dominated "
              "(another one of the same trace, profile, formats and batch >5% faster in TPOT with no more GPU memory).")
def sweep_command(screen: bool, **flags):
    # `moesim sweep` is the simulator's; it is assembled here because --screen asks the cost model, which sits
    # above the simulator (tests/test_layering.py)
    sweep_main(**flags, screen=_screen if screen else None)
