"""`moesim trace`: record routing from a Hugging Face MoE model; `trace import`, `stats`, `fit` and `synth` below it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import click

from moesim.errors import MoesimError
from moesim.options import out_option

DEFAULT_MODEL = "mistralai/Mixtral-8x7B-Instruct-v0.1"


def default_out_path(model: str, prompts: str) -> Path:
    """traces/<model-name>-<prompts-stem>.parquet under the current folder."""
    model_name = Path(model.rstrip("/\\")).name or "model"
    return Path("traces") / f"{model_name}-{Path(prompts).stem}.parquet"


def check_output_path(path: Path) -> None:
    """Fail early (before a model loads) when ``path`` could not be written; creates nothing."""
    if path.is_dir():
        raise MoesimError(f"--out {path}: is a folder, expected a file path")
    parent = path.parent if str(path.parent) else Path(".")
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise MoesimError(f"--out {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise MoesimError(f"--out {path}: folder {existing} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise MoesimError(f"--out {path}: file exists and is not writable")


@click.group(name="trace", invoke_without_command=True)
@click.option("--prompts", "prompts", metavar="FILE", help="JSONL prompts, one object a line.")
@click.option("--model", "model", default=DEFAULT_MODEL, show_default=True, metavar="ID_OR_PATH",
              help="Hugging Face hub id or a local folder with config.json, weights and tokenizer.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True,
              help="Tokens to generate per prompt; the last one is not fed back, so N-1 decode steps are recorded.")
@click.option("--device", default=None, metavar="cpu|cuda|cuda:N", help="Default: cuda if available, else cpu.")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto",
              show_default=True, help="auto: the checkpoint's dtype.")
@click.option("--limit", type=int, default=None, metavar="N", help="Trace only the first N prompts.")
@click.option("--field", default=None, metavar="NAME",
              help="Prompt field; default: the first of prompt, question, text, instruction that is present.")
@click.option("--chat-template/--no-chat-template", "chat_template", default=None,
              help="Wrap each prompt as a user turn; default: when the tokenizer has a chat template.")
@out_option("file", "the trace to write (default: traces/<model-name>-<prompts-stem>.parquet).")
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--seed", type=int, default=0, show_default=True, help="With --sample: request i uses seed+i.")
@click.option("--temperature", type=float, default=None, help="With --sample (default: the model's).")
@click.option("--top-p", "top_p", type=float, default=None, help="With --sample (default: the model's).")
@click.option("--top-k", "top_k", type=int, default=None, help="With --sample (default: the model's).")
@click.option("--ignore-eos", is_flag=True, help="Generate exactly --max-new-tokens tokens, past the EOS token.")
@click.option("--next-layer-guess/--no-next-layer-guess", default=True, show_default=True,
              help="Record the next MoE layer's router top-k on each layer's input.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@click.pass_context
def trace_group(ctx: click.Context, prompts: Optional[str], model: str, max_new_tokens: int, device: Optional[str],
                dtype: str, limit: Optional[int], field: Optional[str], chat_template: Optional[bool],
                out: Optional[str], sample: bool, seed: int, temperature: Optional[float], top_p: Optional[float],
                top_k: Optional[int], ignore_eos: bool, next_layer_guess: bool, progress: bool) -> None:
    """Record routing traces (`moesim trace --prompts P --model M`), import them, and summarise them.

    Every token's top-k experts and applied weights at every MoE layer, in prefill and decode, are written
    one request per row group. Each finished request is saved at once: Ctrl-C or a kill keeps them, and
    the same command run again resumes where it stopped.
    """
    if ctx.invoked_subcommand is not None:
        if prompts is not None:
            raise MoesimError(f"--prompts: not used with `moesim trace {ctx.invoked_subcommand}`")
        return
    if prompts is None:
        given = [p.name for p in ctx.command.params
                 if ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE]
        if given:
            raise MoesimError("--prompts FILE: required to record a trace")
        click.echo(ctx.get_help())
        return
    if sample is False and any(v is not None for v in (temperature, top_p, top_k)):
        raise MoesimError("--temperature/--top-p/--top-k: only apply with --sample")
    record(prompts=prompts, model=model, max_new_tokens=max_new_tokens, device=device, dtype=dtype, limit=limit,
           field=field, chat_template=chat_template, out=out, sample=sample, seed=seed, temperature=temperature,
           top_p=top_p, top_k=top_k, ignore_eos=ignore_eos, next_layer_guess=next_layer_guess, progress=progress)


def record(*, prompts: str, model: str, max_new_tokens: int, device: Optional[str], dtype: str, limit: Optional[int],
           field: Optional[str], chat_template: Optional[bool], out: Optional[str], sample: bool, seed: int,
           temperature: Optional[float], top_p: Optional[float], top_k: Optional[int], ignore_eos: bool,
           next_layer_guess: bool, progress: bool) -> None:
    from moesim.tracer.capture import GenerationSettings, load_model, resolve_device, trace_prompts
    from moesim.failures import reported_failures
    from moesim.tracer.prompts import load_prompts

    # Everything a user can get wrong is checked before the (slow) model load and before any file exists.
    prompt_set = load_prompts(prompts, field=field, limit=limit)
    settings = GenerationSettings(
        max_new_tokens=max_new_tokens, do_sample=sample, seed=seed, temperature=temperature, top_p=top_p,
        top_k=top_k, chat_template=chat_template, ignore_eos=ignore_eos, next_layer_guess=next_layer_guess,
    )
    resolve_device(device)
    out_path = Path(out) if out else default_out_path(model, prompts)
    check_output_path(out_path)
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    with reported_failures("trace") as steps:
        steps.current = f"loading model {model}"
        loaded = load_model(model, device=device, dtype=dtype)
        steps.current = f"recording {len(prompt_set)} prompts"
        summary = trace_prompts(loaded, prompt_set, settings, out_path, progress=progress,
                                log=lambda message: click.echo(message, err=True))
    layers = loaded.shape.num_moe_layers
    if summary.resumed:
        click.echo(f"moesim: resumed {out_path}: {summary.resumed} requests were already recorded there", err=True)
    if not summary.complete:
        if summary.path is None:
            click.echo("moesim: interrupted before any request finished; nothing written", err=True)
        else:
            click.echo(f"moesim: interrupted; kept {summary.requests} finished requests in {summary.path}", err=True)
        raise SystemExit(130)
    click.echo(
        f"wrote {summary.path}: {summary.requests} requests, {summary.rows} rows "
        f"({summary.prefill_tokens} prefill + {summary.decode_tokens} decode tokens x {layers} MoE layers), "
        f"{summary.generated_tokens} tokens generated in {summary.seconds:.1f} s on {loaded.device} ({loaded.dtype})"
    )


# `import` and `stats` live beside the importers and statistics they drive.
from moesim.tracer.importers import import_command  # noqa: E402
from moesim.tracer.stats import stats_command  # noqa: E402
from moesim.tracer.synth_cli import fit_command, synth_command  # noqa: E402

trace_group.add_command(import_command, name="import")
trace_group.add_command(stats_command, name="stats")
trace_group.add_command(fit_command, name="fit")
trace_group.add_command(synth_command, name="synth")
