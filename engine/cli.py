"""`moesim validate`: run a configuration on the real offloading engine and report the simulator's error."""

from __future__ import annotations

import dataclasses
import shlex
import sys
import time
from pathlib import Path

import click

from moesim.errors import MoesimError
from moesim.options import cache_experts_option, out_option, policy_option
from moesim.progress import Progress


def _policies(policy: str, all_presets: bool) -> tuple[str, ...]:
    from moesim.options import split_list
    from moesim.simulator.compose import policy_names
    from moesim.simulator.presets import PRESETS

    if all_presets:
        return tuple(PRESETS.names())
    return tuple(policy_names(split_list(policy, "--policy")))


def _check_counts(trace_path: Path, requests: int, decode_tokens: int, warmup_steps: int, repeats: int,
                  threads: int | None) -> None:
    """The run's counts against the trace, before minutes of loading weights (and so the report's settings
    are what ran: the trace cannot give more requests or decode tokens than it holds)."""
    import numpy as np

    from moesim.tracer import DECODE, read_trace
    from moesim.tracer.format import trace_requests

    for flag, value, least in (("--requests", requests, 1), ("--decode-tokens", decode_tokens, 0),
                               ("--warmup-steps", warmup_steps, 0), ("--repeats", repeats, 1),
                               ("--threads", threads, 1)):
        if value is not None and value < least:
            raise MoesimError(f"{flag} {value}: expected {least} or more")
    held = trace_requests(trace_path)  # the request column alone: the run reads the whole trace later
    if requests > held:
        raise MoesimError(f"--requests {requests}: the trace holds {held} request(s)")
    if click.get_current_context().get_parameter_source("decode_tokens").name != "COMMANDLINE":
        return  # the default is "up to 32": a shorter trace gives what it has
    c = read_trace(trace_path).cells
    dec = c.phase == DECODE
    steps = np.unique(np.stack([c.request[dec], c.position[dec]], axis=1), axis=0)
    longest = int(np.bincount(np.unique(steps[:, 0], return_inverse=True)[1]).max()) if len(steps) else 0
    if decode_tokens > longest:
        raise MoesimError(f"--decode-tokens {decode_tokens}: the trace's requests have at most {longest} decode "
                          f"tokens")


def engine_format(expert_bits: str | None, expert_format: str | None) -> str:
    """The engine's expert format from --expert-bits (the grammar of every other command) or --expert-format."""
    from moesim.costmodel.space import VALIDATE_FORMATS
    from moesim.quant import WeightFormat

    if expert_bits is None:
        return expert_format or "bf16"
    try:
        bits = str(WeightFormat.parse(expert_bits).bits)
    except MoesimError as exc:
        raise MoesimError(f"--expert-bits {exc.message}") from None
    if bits not in VALIDATE_FORMATS:
        raise MoesimError(f"--expert-bits {expert_bits}: the engine has real kernels for "
                          f"{', '.join(VALIDATE_FORMATS)}-bit experts only")
    fmt = VALIDATE_FORMATS[bits]
    if expert_format is not None and expert_format != fmt:
        raise MoesimError(f"--expert-bits {expert_bits} and --expert-format {expert_format} disagree: give one")
    return fmt


@click.command("validate")
@click.option("--trace", "trace_spec", default=None, help="Trace file or bundled name (default: the bundled Qwen3 trace).")
@policy_option(many=True)
@click.option("--all-presets", is_flag=True, help="Every preset the device supports (the others are listed as not run).")
@cache_experts_option(many=False, required=True)
@click.option("--model-config", default=None, help="Model whose shapes to run: bundled name (mixtral-8x7b, ...), "
              "config.json or folder (default: the trace's own model).")
@click.option("--model", "checkpoint", default=None, help="A Hugging Face checkpoint folder: its real weights.")
@click.option("--layers", type=int, default=None, help="Run only the first N decoder layers.")
@click.option("--device", default="cpu", show_default=True, help="cpu (the host plays the device) or cuda[:N].")
@click.option("--profile", "profile_spec", default=None, help="Hardware profile calibrated on this machine.")
@click.option("--calibrate", is_flag=True, help="Calibrate this machine at the engine's exact shape first (quick).")
@click.option("--expert-bits", default=None, help="Expert weight bits, as in simulate/sweep/search: 16, 8 or 4 "
              "(the engine's real bf16, int8 and int4 kernels; default 16).")
@click.option("--expert-format", default=None, type=click.Choice(["bf16", "int8", "int4"]),
              help="Same as --expert-bits 16|8|4 (older spelling).")
@click.option("--requests", type=int, default=1, show_default=True, help="Requests of the trace to run.")
@click.option("--decode-tokens", type=int, default=32, show_default=True, help="Decode tokens per request to run.")
@click.option("--warmup-steps", type=int, default=3, show_default=True,
              help="Decode steps of the untimed warm-up (after the first prompt's prefill).")
@click.option("--repeats", type=int, default=1, show_default=True, help="Measured runs per policy (median reported).")
@click.option("--statistic", default="median", show_default=True, type=click.Choice(["median", "min"]),
              help="Each token's measured time over the repeats.")
@click.option("--fit-statistic", default="median", show_default=True,
              type=click.Choice(["median", "p10", "min", "profile"]),
              help="Refit the profile's raw measurements to this per-point statistic before predicting "
                   "('profile': as calibrated).")
@click.option("--threads", type=int, default=None, help="CPU threads (default: the profile's).")
@click.option("--seed", type=int, default=0, show_default=True)
@out_option("folder", "the JSON and Markdown reports (and the fitted trace).", required=True, dest="out_dir")
@click.option("--quiet", is_flag=True, help="No progress lines.")
def validate_command(trace_spec, policy, all_presets, cache_experts, model_config, checkpoint, layers, device,
                     profile_spec, calibrate, expert_bits, expert_format, requests, decode_tokens, warmup_steps,
                     repeats, statistic,
                     fit_statistic, threads, seed, out_dir, quiet):
    """Simulate a configuration, run it on the real offloading engine, and report the error of every metric."""
    from moesim.atomic import check_output_target, prepare_output_path
    from moesim.engine.report import summary_table, write_report
    from moesim.engine.validate import ValidateOptions, run_validation
    from moesim.failures import reported_failures
    from moesim.options import check_cache_experts, one_int
    from moesim.tracer import read_trace_meta
    from moesim.traces import resolve_trace

    out = Path(out_dir)
    check_output_target(out / "validate.json")  # before any work, and without creating anything yet
    if profile_spec is None and not calibrate:
        raise MoesimError("no hardware profile: expected --profile P (calibrated on this machine) or --calibrate")
    expert_format = engine_format(expert_bits, expert_format)
    cache_experts = one_int(cache_experts, "--cache-experts", minimum=0)
    trace_path = resolve_trace(trace_spec)
    check_cache_experts([cache_experts], read_trace_meta(trace_path).num_experts)
    _check_counts(trace_path, requests, decode_tokens, warmup_steps, repeats, threads)
    if all_presets and click.get_current_context().get_parameter_source("policy").name == "COMMANDLINE":
        raise MoesimError("--all-presets and --policy: give one (--all-presets runs every preset)")
    policies = _policies(policy, all_presets)
    if quiet:  # transformers' "Loading weights" bar is progress too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    created = not out.exists()
    t0 = time.perf_counter()
    log = (lambda msg: None) if quiet else (
        lambda msg: click.echo(f"validate [{time.perf_counter() - t0:6.1f}s]: {msg}", err=True))
    opts = ValidateOptions(
        trace=trace_spec, policies=policies, cache_experts=cache_experts,
        model_config=model_config, model=checkpoint, layers=layers, device=device, profile=profile_spec,
        calibrate=calibrate, expert_format=expert_format, requests=requests, decode_tokens=decode_tokens,
        warmup_steps=warmup_steps, repeats=repeats, statistic=statistic,
        fit_statistic=fit_statistic, seed=seed, threads=threads, out=out, log=log,
        # a bar with rate and ETA on a terminal (plain lines off one); --quiet: none at all
        progress=None if quiet else (lambda total: Progress(total, "validate", "run")),
    )
    args = sys.argv[2:] if len(sys.argv) > 1 and sys.argv[1] == "validate" else []
    try:
        prepare_output_path(out / "validate.json")
        with reported_failures("validate") as steps:
            opts = dataclasses.replace(opts, log=steps.wrap(log))
            report = run_validation(opts, command="moesim validate " + " ".join(shlex.quote(a) for a in args))
    except MoesimError:  # a library failure (StepFailure) too
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a refused run leaves no empty output folder behind
        raise
    stem = f"validate-{report.settings['device'].replace(':', '')}-{expert_format}"
    j, m = write_report(report, out, stem)
    click.echo(summary_table(report.presets))
    click.echo(f"wrote {j} and {m}")
