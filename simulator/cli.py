"""`moesim simulate` (one configuration) and the simulator's part of `moesim sweep` (a grid, in parallel,
resumable; the command itself is assembled in :mod:`moesim.costmodel.cli`, which adds the cost model's --screen)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import click

from moesim.errors import MoesimError
from moesim.options import (batch_list, batch_option, byte_size, byte_sizes, cache_experts_list,
                            cache_experts_option, check_batches, check_cache_experts, jobs_option, one_int,
                            out_option, policy_option, split_list)
from moesim.quant import WeightFormat
from moesim.simulator.compose import PARTS, build_policy, policy_names
from moesim.simulator.knobs import KNOBS
from moesim.tracer.format import trace_requests

DEFAULT_PROFILE = "rtx-3060"  # 12 GiB: the smallest GPU of the Mixtral-Offloading paper


def _formats(text: Optional[str], flag: str) -> Optional[WeightFormat]:
    if text is None or str(text).lower() in ("trace", "native"):
        return None
    try:
        return WeightFormat.parse(text)
    except MoesimError as exc:
        raise MoesimError(f"{flag} {exc.message}") from None


def _ms(x: float) -> str:
    """Every time of the summary in ms, like the tables (a unit that changes with the value misleads)."""
    if x is None or math.isnan(x):
        return "-"
    return f"{x * 1e3:.2f} ms"


def summary_text(result) -> str:
    lab = result.label
    m = result.memory
    mib = 2**20
    lines = [
        f"trace {lab.trace} on {lab.profile}, policy {lab.policy}: cache {lab.cache_policy}/{lab.cache_scope}, "
        f"prefetch {lab.prefetch}, placement {lab.placement}, transfer {lab.transfer}, gating {lab.gating}",
        f"  experts          {lab.expert_format} ({result.expert_kernel or '-'} kernel), non-expert "
        f"{lab.non_expert_format} ({result.non_expert_kernel or '-'}), batch {lab.batch}",
        f"  cache            {result.cache_slots} expert slots, {m.cache_bytes / mib:.0f} MiB",
        f"  peak GPU memory  {result.peak_gpu_mib:.0f} MiB of {lab.gpu_mem_mib:.0f} MiB (non-expert "
        f"{m.non_expert_bytes / mib:.0f}, cache {m.cache_bytes / mib:.0f}, staging "
        f"{(m.staging_bytes + m.prefetch_buffer_bytes) / mib:.0f}, KV {m.kv_cache_bytes / mib:.0f}, activations "
        f"{m.activation_bytes / mib:.0f}, reserve {m.reserve_bytes / mib:.0f}"
        + (f", load-time 16-bit trunk +{m.build_transient_bytes / mib:.0f}" if m.build_transient_bytes else "") + ")",
    ]
    if not result.feasible:
        lines.append(f"  DOES NOT FIT     {result.reason}")
        return "\n".join(lines)
    lines += [
        f"  requests         {result.requests}, {result.output_tokens} output tokens, "
        f"{_ms(result.makespan_s)} simulated",
        f"  TTFT             {_ms(result.ttft_mean_s)} mean, {_ms(result.ttft_p50_s)} p50, "
        f"{_ms(result.ttft_p90_s)} p90",
        f"  TPOT             {_ms(result.tpot_mean_s)} mean, {_ms(result.tpot_p50_s)} p50, "
        f"{_ms(result.tpot_p90_s)} p90",
        f"  end-to-end       {_ms(result.e2e_mean_s)} mean; {result.tokens_per_s:.2f} tokens/s "
        f"({result.decode_tokens_per_s:.2f} in decode)",
        f"  hit rate         {result.hit_rate:.3f} decode, {result.prefill_hit_rate:.3f} prefill",
    ]
    if result.prefetch_issued:
        lines.append(f"  prefetch         {result.prefetch_issued} issued, precision {result.prefetch_precision:.3f}, "
                     f"recall {result.prefetch_recall:.3f} (guess from {result.guess_source})")
    lines += [
        f"  PCIe             {result.h2d_bytes / mib:.0f} MiB host->device, {result.d2h_bytes / mib:.0f} MiB "
        f"device->host",
        f"  stall            {_ms(result.stall_s)} waiting for copies or the CPU",
        f"  utilization      GPU {result.gpu_util:.2f}, PCIe H2D {result.h2d_util:.2f}, D2H {result.d2h_util:.2f}, "
        f"CPU {result.cpu_util:.2f}",
    ]
    if not math.isnan(result.cpu_expert_fraction) and result.cpu_expert_fraction > 0:
        lines.append(f"  CPU experts      {result.cpu_expert_fraction:.3f} of decode activations")
    if result.gated_fraction > 0:
        lines.append(f"  adaptive gating  skipped {result.gated_fraction:.3f} of decode activations")
    return "\n".join(lines)


def _notes(result, policy) -> list[str]:
    notes = []
    if "(for " in (result.expert_kernel or ""):
        notes.append(f"the profile has no kernel for this expert format; timed with {result.expert_kernel}")
    guessing = policy.prefetch.policy in ("next-layer", "first-non-resident")
    if guessing and result.guess_source == "previous-token":
        notes.append("the next-layer guess is the previous token's experts at that layer, which a cache of "
                     ">= top-k slots always holds: expect few or no prefetches")
    elif guessing and result.guess_source.startswith("accuracy-"):
        notes.append(f"the trace has no next_layer_guess column; the next-layer guess is a model "
                     f"(per-slot accuracy {result.guess_source.split('-', 1)[1]} against the real next layer, "
                     f"--guess accuracy:P to change it)")
    if policy.prefetch.policy != "none" and result.feasible and not result.prefetch_issued:
        notes.append(f"prefetcher '{policy.prefetch.policy}' issued no prefetch in this run: the result equals "
                     f"the same cache without prefetch")
    return notes


@click.command(name="simulate")
@click.option("--trace", "trace_spec", default=None,
              help="Trace file or bundled name (default: the bundled Qwen3 trace).")
@click.option("--profile", "profile_spec", default=DEFAULT_PROFILE, show_default=True,
              help="Hardware profile: bundled name or PROFILE.json.")
@click.option("--host", default=None, help="Host CPU the GPU sits in (calib/hosts.py), e.g. xeon-gold-6126-x2: "
              "the profile is then composed from the GPU spec named by --profile, this host and --link.")
@click.option("--link", default=None, type=click.Choice(["pcie3", "pcie4", "pcie5"]),
              help="PCIe generation of the composed profile (default: the GPU's own).")
@policy_option(many=False, extra=f"Parts: {', '.join(PARTS)}.")
@cache_experts_option(many=False, extra="A global cache gets as many per layer on average.")
@click.option("--cache-mem", default=None, help="Cache size in bytes, e.g. 4000MiB (instead of --cache-experts).")
@click.option("--gpu-mem", default=None, help="GPU memory budget, e.g. 16GiB (default: the profile's device). "
              "Without a cache size the cache fills what is left.")
@click.option("--expert-bits", default=None, help="Expert weight format: 16, 8, 4, 3, 2 or e.g. int2-g16-m8 "
              "(default: the trace's own).")
@click.option("--non-expert-bits", default=None, help="Non-expert weight format (default: the trace's own).")
@batch_option(many=False)
@click.option("--eviction", default=None, help="Replace the preset's cache rule: lru, lfu, fifo, static, belady, mrs.")
@click.option("--scope", default=None, type=click.Choice(["layer", "global"]), help="Cache per layer or global.")
@click.option("--prefetch", default=None, help="Replace the prefetcher: none, next-layer, first-non-resident, eam, "
              "predictive, oracle.")
@click.option("--knob", "knobs", multiple=True, help="A system's own setting, NAME=VALUE: " + ", ".join(
    f"{k.name} ({', '.join(k.presets)})" for k in KNOBS.values()) + ".")
@click.option("--guess", default=None, help="Next-layer guess of next-layer/first-non-resident prefetch: auto "
              "(the trace's column, else a guess model), trace, previous-token, or accuracy:P.")
@click.option("--placement", default=None, help="Replace the placement: gpu, fiddler, hybrimoe, cpu.")
@click.option("--placement-rule", default=None, type=click.Choice(["profile", "code"]),
              help="CPU/GPU decision from the profile's costs or the released code's constants.")
@click.option("--transfer", default=None, help="Replace the transfer mode: swap, stream, sync, layer.")
@click.option("--gating", default=None, help="Adaptive gating: off, adapmoe, or a uniform threshold.")
@click.option("--predictor-train", multiple=True, help="Trace(s) the predictive prefetcher is fitted on "
              "(default: the other bundled traces).")
@click.option("--timeline", "timeline_path", default=None, type=click.Path(dir_okay=False),
              help="Write a Chrome-trace JSON (open in Perfetto) of the GPU, PCIe and CPU lanes.")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False, allow_dash=True),
              help="Write the result as JSON ('-': only the JSON, to stdout).")
@click.option("--engine", default="clocked", hidden=True, type=click.Choice(["clocked", "python", "events"]),
              help="clocked: the compiled replay where it covers the run, else the event-free engine; python: the "
              "event-free engine always; events: the previous engine, a SimPy event per copy (same results, "
              "slower; the oracles of the faster paths).")
def simulate_command(trace_spec, profile_spec, host, link, policy, cache_experts, cache_mem, gpu_mem, expert_bits,
                     non_expert_bits, batch, knobs, eviction, scope, prefetch, guess, placement, placement_rule,
                     transfer, gating, predictor_train, timeline_path, json_path, engine):
    """Replay a routing trace under one offloading policy on a modelled machine."""
    from moesim.atomic import prepare_output_path, write_text_atomic
    from moesim.simulator.config import SimConfig
    from moesim.simulator.run import simulate
    from moesim.simulator.timeline import Timeline
    from moesim.simulator.sweep import trace_label
    from moesim.traces import resolve_trace

    from moesim.tracer import read_trace_meta

    trace_path = resolve_trace(trace_spec)
    spec = build_policy(policy, eviction, scope, prefetch, placement, placement_rule, transfer, gating,
                        tuple(predictor_train), guess)
    cache_experts = one_int(cache_experts, "--cache-experts", minimum=0)
    if cache_experts is not None:
        check_cache_experts([cache_experts], read_trace_meta(trace_path).num_experts)
    batch = one_int(batch, "--batch", minimum=1)
    check_batches([batch], trace_requests(trace_path))
    config = SimConfig(
        policy=spec, cache_experts=cache_experts,
        cache_bytes=byte_size(cache_mem, "--cache-mem"), gpu_mem_bytes=byte_size(gpu_mem, "--gpu-mem"),
        expert_format=_formats(expert_bits, "--expert-bits"),
        non_expert_format=_formats(non_expert_bits, "--non-expert-bits"), batch=batch,
    )
    if timeline_path:
        prepare_output_path(timeline_path)
    to_stdout = json_path == "-"
    if json_path and not to_stdout:
        prepare_output_path(json_path)
    if knobs:
        from moesim.simulator.knobs import apply_knobs, parse_knobs

        # a knob belongs to its preset, whatever parts the string replaced
        as_preset = replace(config, policy=replace(spec, name=policy.partition("+")[0].strip()))
        from moesim.simulator.run import layer_expert_bytes

        meta = read_trace_meta(trace_path)
        config = apply_knobs(as_preset, parse_knobs(knobs), meta.num_experts,
                             layer_expert_bytes(meta, config.expert_format))
        config = replace(config, policy=replace(config.policy, name=spec.name))
    profile, profile_name = profile_spec, profile_spec
    if host is not None or link is not None:
        from moesim.calib.hosts import UNSTATED, compose_profile

        profile = compose_profile(profile_spec, host or UNSTATED, link)
        profile_name = profile.name
    timeline = Timeline(f"moesim {policy}") if timeline_path else None
    result = simulate(trace_path, profile, config, timeline=timeline,
                      trace_name=trace_label(trace_spec) if trace_spec else trace_path.stem, profile_name=profile_name,
                      exact_events=engine == "events", compiled=engine == "clocked")
    if not to_stdout:
        click.echo(summary_text(result))
    for note in _notes(result, spec):
        click.echo(f"note: {note}", err=True)
    if timeline is not None:
        if result.feasible:
            timeline.write(timeline_path)
            click.echo(f"timeline: {timeline_path} ({len(timeline.events)} events; open in https://ui.perfetto.dev)",
                       err=to_stdout)
        else:
            click.echo("timeline: not written (the configuration does not fit)", err=True)
    if json_path:
        text = json.dumps(_json_safe(result.to_dict()), indent=1, sort_keys=True) + "\n"
        if to_stdout:
            click.echo(text, nl=False)
        else:
            write_text_atomic(json_path, text)
            click.echo(f"result: {json_path}")


def _command_line(name: str) -> str:
    """The command as typed, when it was typed (tests call the command directly)."""
    import shlex
    import sys

    args = sys.argv[2:] if len(sys.argv) > 1 and sys.argv[1] == name else []
    return " ".join(["moesim", name] + [shlex.quote(a) for a in args])


def _json_safe(obj):
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def default_cache_sizes(trace_path: Path) -> list[int]:
    """k, 2k, 4k, 8k experts per layer below the number of experts (at least three sizes)."""
    from moesim.tracer import read_trace_meta

    meta = read_trace_meta(trace_path)
    k, E = meta.top_k, meta.num_experts
    sizes = sorted({s for s in (k, 2 * k, 4 * k, 8 * k) if 1 <= s < E})
    for extra in (E // 2, E - 2, E - 1):
        if len(sizes) >= 3:
            break
        if 1 <= extra < E and extra not in sizes:
            sizes = sorted(sizes + [extra])
    return sizes


SWEEP_HELP = """Simulate a grid of policies x traces x profiles x cache sizes x formats x batch sizes in parallel.

    --out is a results store: a rerun reuses the configurations whose trace, profile and simulator are
    unchanged (by content), and every grid swept into it stays readable with --list and --all.
    """


def sweep_options(command: Callable) -> Callable:
    """The flags of `moesim sweep` that the simulator owns (the command is assembled in moesim.costmodel.cli,
    which adds --screen: the cost model sits above the simulator)."""
    decorators = [
        policy_option(many=True, default=None, dest="policies", extra="Default: a representative set of presets."),
        click.option("--trace", "traces", default=None, help="Comma-separated traces or bundled names (default: "
                     "the bundled Qwen3 trace)."),
        click.option("--profile", "profiles", default=DEFAULT_PROFILE, show_default=True,
                     help="Comma-separated profiles."),
        cache_experts_option(many=True, extra="Default: k, 2k, 4k, 8k for the trace's top-k."),
        click.option("--gpu-mem", default=None, help="Comma-separated GPU memory budgets (instead of "
                     "--cache-experts)."),
        click.option("--expert-bits", default=None, help="Comma-separated expert formats, e.g. 16,4,2 (default: "
                     "the trace's)."),
        click.option("--non-expert-bits", default=None, help="Non-expert weight format for every point."),
        batch_option(many=True),
        out_option("folder", "sweep.parquet, sweep.csv, sweep.png and the results store (a rerun resumes).",
                   default="out/sweep", dest="out_dir"),
        jobs_option(),
        click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                     help="Where the configurations run: this machine's cores, or a Ray cluster (pip install -e "
                          "\".[ray]\"); both share --out's resumable journal."),
        click.option("--address", default=None, metavar="ADDR",
                     help="With --executor ray: the cluster to join (auto, or HOST:PORT; default: a local Ray "
                          "instance of --jobs CPUs)."),
        click.option("--no-progress", is_flag=True, help="No progress bar."),
        click.option("--no-plot", is_flag=True, help="Do not draw the latency-vs-memory plot."),
        click.option("--list", "list_grids_", is_flag=True, help="List the grids swept into --out (nothing is run)."),
        click.option("--all", "show_all", is_flag=True, help="Print the table of every grid swept into --out "
                     "(nothing is run)."),
    ]
    for decorate in reversed(decorators):
        command = decorate(command)
    return command


def _show_store(out_dir: str, list_grids_: bool, show_all: bool) -> None:
    from moesim.simulator.sweep import format_grid_list, format_table, grid_rows, list_grids

    records = list_grids(Path(out_dir))
    if list_grids_ or not records:
        click.echo(format_grid_list(records, Path(out_dir)))
    if show_all:
        for r in records:
            click.echo(f"\ngrid {r.grid} ({r.created}, {r.points} points"
                       f"{'' if r.finished else ', interrupted'}): {r.command}")
            rows = grid_rows(r, Path(out_dir))
            click.echo(format_table(rows) if rows else "(no finished table; rerun its command to complete it)")


def sweep_grid(policies, traces, profiles, cache_experts, gpu_mem, expert_bits, non_expert_bits, batches) -> list:
    """The grid the flags name, every value checked before any work."""
    from moesim.calib.profile import load_profile
    from moesim.simulator.presets import DEFAULT_SWEEP_POLICIES
    from moesim.simulator.sweep import build_grid
    from moesim.tracer import read_trace_meta
    from moesim.traces import resolve_trace

    policy_list = policy_names(split_list(policies, "--policy") or list(DEFAULT_SWEEP_POLICIES))
    trace_list = split_list(traces, "--trace") or [None]
    trace_paths = [resolve_trace(t) for t in trace_list]
    trace_specs = [t if t is not None else p.stem for t, p in zip(trace_list, trace_paths)]
    profile_list = split_list(profiles, "--profile") or [DEFAULT_PROFILE]
    for p in profile_list:
        load_profile(p)
    if cache_experts is not None and gpu_mem is not None:
        raise MoesimError("--cache-experts and --gpu-mem both given: expected one way to size the cache")
    mems = byte_sizes(gpu_mem, "--gpu-mem")
    sizes = cache_experts_list(cache_experts)
    for path in trace_paths:
        check_cache_experts(sizes, read_trace_meta(path).num_experts)
    if not mems and not sizes:
        sizes = default_cache_sizes(trace_paths[0])
    bits = split_list(expert_bits, "--expert-bits") or [None]
    for b in bits:
        if b is not None:
            _formats(b, "--expert-bits")
    if non_expert_bits is not None:
        _formats(non_expert_bits, "--non-expert-bits")
    batch_sizes = batch_list(batches) or [1]
    for path in trace_paths:
        check_batches(batch_sizes, trace_requests(path))
    return build_grid(trace_specs, profile_list, policy_list, sizes, mems, bits, non_expert_bits, batch_sizes)


def sweep_main(policies, traces, profiles, cache_experts, gpu_mem, expert_bits, non_expert_bits, batches, out_dir,
               jobs, executor, address, no_progress, no_plot, list_grids_, show_all,
               screen: Optional[Callable[[list], tuple[list, str]]] = None) -> None:
    """`moesim sweep`; ``screen`` maps the grid to (the points to run, a line saying what was skipped)."""
    from moesim.simulator.sweep import (PLOT, check_writable, finish_grid, format_table, run_sweep, start_grid,
                                        write_plot, write_tables)

    if list_grids_ or show_all:
        _show_store(out_dir, list_grids_, show_all)
        return
    if address is not None and executor != "ray":
        raise MoesimError("--address is the Ray cluster to run on: it needs --executor ray")
    points = sweep_grid(policies, traces, profiles, cache_experts, gpu_mem, expert_bits, non_expert_bits, batches)
    if screen is not None:
        points, summary = screen(points)
        click.echo(summary, err=True)
    out = check_writable(Path(out_dir))
    record = start_grid(points, out, _command_line("sweep"))
    click.echo(f"sweep: {len(points)} configurations -> {out} (grid {record.grid})", err=True)
    try:
        rows = run_sweep(points, out, jobs=jobs, progress=not no_progress, executor=executor, address=address,
                         log=lambda msg: click.echo(f"sweep: {msg}", err=True))
    except KeyboardInterrupt:
        click.echo(f"moesim: sweep interrupted; the finished configurations are kept in {out}; run the same command "
                   f"again to resume", err=True)
        raise SystemExit(130) from None
    parquet, csv_path = write_tables(rows, out)
    finish_grid(record, rows, out)
    click.echo(format_table(rows))
    click.echo(f"results: {parquet}, {csv_path} (this grid; earlier grids: moesim sweep --list --out {out})")
    if not no_plot:
        title = ", ".join(sorted({r['trace'] for r in rows})) + " on " + ", ".join(sorted({r['profile'] for r in rows}))
        plot = write_plot(rows, out / PLOT, title=title)
        if plot is not None:
            click.echo(f"plot: {plot}")
