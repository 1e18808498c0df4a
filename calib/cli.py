"""`moesim calib` and `moesim profiles`."""

from __future__ import annotations

import click

from moesim.errors import MoesimError
from moesim.options import out_option


@click.command("calib")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda:N")
@click.option("--model-config", default="mixtral-8x7b", show_default=True,
              help="model whose shapes to time: a bundled name, a config.json or folder, a hub id, or a trace")
@click.option("--quick", is_flag=True, help="a short grid (under a minute) instead of the full one")
@out_option("file", "the PROFILE.json to write.", required=True)
@click.option("--name", default="", help="profile name (default: cpu-calibrated, or the GPU name + '-measured')")
@click.option("--threads", type=int, default=None, help="CPU threads for CPU work (default: all available cores)")
@click.option("--statistic", type=click.Choice(["auto", "median", "p10", "min"]), default="auto", show_default=True,
              help="per-point time the models are fitted to; auto = median on CUDA, p10 on CPU (robust to other "
                   "processes sharing the cores)")
@click.option("--quiet", is_flag=True, help="no progress lines")
def calib_command(device: str, model_config: str, quick: bool, out: str, name: str, threads: int | None,
                  statistic: str, quiet: bool) -> None:
    """Measure this machine and write a hardware profile with fitted cost models.

    Times expert FFNs per weight format, the non-expert part of a layer, host<->device copies, CPU
    experts and Python overheads, then fits roofline-shaped models with leave-one-out errors.
    Each finished unit of measurement is kept in a journal beside FILE; after a kill, the same command
    resumes from it (units measured on another device, model or grid are measured again).
    """
    from moesim.atomic import prepare_output_path
    from moesim.calib.calibrate import CalibOptions, calibrate, format_model_table
    from moesim.calib.journal import CalibJournal, journal_path_for
    from moesim.failures import reported_failures
    from moesim.progress import Progress

    out_path = prepare_output_path(out)  # fail on a bad path before minutes of measuring
    import time

    t0 = time.perf_counter()
    bars: list[Progress] = []

    def log(msg: str) -> None:
        line = f"calib [{time.perf_counter() - t0:5.1f}s]: {msg}"
        bars[0].write(line) if bars else click.echo(line, err=True)

    def progress(total: int) -> Progress:
        bars.append(Progress(total, "calib", "unit"))
        return bars[0]

    if quiet:
        log = lambda msg: None  # noqa: E731
    with reported_failures("calib") as steps:
        journal = CalibJournal(journal_path_for(out_path), steps.wrap(log))
        if journal.units:
            log(f"resuming: {len(journal.units)} finished units in {journal.path} (those measured on this device, "
                f"model and grid are kept)")
        profile = calibrate(CalibOptions(device=device, model_config=model_config, quick=quick, name=name or "",
                                         threads=threads, statistic=statistic, log=steps.wrap(log), journal=journal,
                                         progress=None if quiet else progress))
    profile.save(out_path)
    journal.finish()
    click.echo(format_model_table(profile))
    click.echo(f"wrote {out_path} ({profile.name}; {profile.notes})")


@click.command("profiles")
@click.option("--model-config", default="mixtral-8x7b", show_default=True,
              help="model whose expert time and size the table shows")
def profiles_command(model_config: str) -> None:
    """List the bundled hardware profiles."""
    from moesim.calib.profile import bundled_profiles, load_profile
    from moesim.tracer import load_shape

    shape = load_shape(model_config)
    nbytes = shape.expert_bytes("bfloat16")
    header = (f"{'name':<18} {'device':<36} {'source':<8} {'memory':>9} {'H2D GB/s':>9} {'copy ms':>8} "
              f"{'bf16 1t ms':>10} {'bf16 64t ms':>11} {'CPU 1t ms':>9}  kernels")
    click.echo(f"expert times for one {shape.model_id} expert ({nbytes / 1e6:.0f} MB at bf16); copy = that expert "
               f"host->device, pinned")
    click.echo(header)
    for name, path in bundled_profiles().items():
        try:
            p = load_profile(path)
        except MoesimError as exc:
            click.echo(f"{name:<18} unreadable: {exc}")
            continue
        h2d = p.copy_models.get("h2d/pinned/alone")
        bw = f"{h2d.bytes_per_s / 1e9:.1f}" if h2d else "-"
        copy_ms = f"{p.copy_time(nbytes) * 1e3:.2f}" if h2d else "-"
        cpu = f"{p.cpu_expert_time(shape, 1) * 1e3:.2f}" if "bf16" in p.cpu_expert_models else "-"
        click.echo(
            f"{name:<18} {p.device.name[:36]:<36} {'specs' if p.derived_from_specs else 'measured':<8} "
            f"{p.device.memory_bytes / 2**30:>6.1f}GiB {bw:>9} {copy_ms:>8} "
            f"{p.expert_time(shape, 1) * 1e3:>10.3f} {p.expert_time(shape, 64) * 1e3:>11.3f} {cpu:>9}  "
            f"{','.join(p.expert_kernels)}"
        )
