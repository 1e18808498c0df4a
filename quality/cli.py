"""`moesim quality` (perplexity under expert quantization and gating) and `moesim demo-model`."""

from __future__ import annotations

import dataclasses

import click

from moesim.errors import MoesimError
from moesim.options import out_option
from moesim.quant import SUPPORTED_BITS

DEFAULT_SEQ_LEN = 1024


def _parse_list(text: str, flag: str, cast, what: str) -> list:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    values = []
    for item in items:
        try:
            values.append(cast(item))
        except ValueError:
            raise MoesimError(f"{flag} {text}: '{item}' is not {what}") from None
    return values


def parse_bits(text: str) -> list[int]:
    bits = _parse_list(text, "--expert-bits", int, "an integer")
    if not bits:
        raise MoesimError(f"--expert-bits '{text}': expected a comma-separated list like 16,8,4,3,2")
    for b in bits:
        if b not in SUPPORTED_BITS:
            raise MoesimError(f"--expert-bits {b}: expected bits among {', '.join(map(str, SUPPORTED_BITS))}")
    return list(dict.fromkeys(bits))


def _quiet_transformers() -> None:
    """Progress bars and warnings of transformers would bury the one-line results and errors."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _format_row(row) -> str:
    gate = "off" if row.gating_threshold == 0 else (
        f"{row.gating_threshold:g}" + (f" ({row.gating_sensitivity})" if row.gating_sensitivity else "")
    )
    return (f"{row.weight_format:>10}  gating {gate:<8}  top-{row.top_k}  ppl {row.perplexity:10.3f}  "
            f"experts/token {row.experts_per_token:.3f}  ({row.predicted_tokens} tokens)")


@click.command(name="quality")
@click.option("--model", "model_path", required=True, help="Folder written by save_pretrained (model + tokenizer).")
@click.option("--expert-bits", default="16", show_default=True,
              help="Comma-separated expert bit widths to measure: 16 (bf16), 8, 4, 3, 2.")
@click.option("--group-size", default=64, show_default=True, type=int,
              help="Weights per scale/zero group along the input dim.")
@click.option("--quantizer", default="rtn", show_default=True,
              help="rtn: group-wise asymmetric round-to-nearest (torch); hqq: the hqq package's HQQ.")
@click.option("--adaptive-gating", default="",
              help="Comma-separated AdapMoE thresholds (drop the 2nd expert when its weight is below); off if empty.")
@click.option("--gating-sensitivity", default="none", show_default=True,
              help="none: threshold used as is (AdapMoE naive); mixtral-8x7b, mixtral-8x22b or a JSON list file: "
                   "per-layer sqrt(t/s_l) as AdapMoE's run.py; adapmoe-loglinear: Mixtral-8x7B's s_l stretched "
                   "over the model's layers (as moesim's simulator gates).")
@click.option("--top-k", "top_k", default="",
              help="Comma-separated top-k values to measure (default: the model's own).")
@click.option("--data", default="wikitext-2", show_default=True,
              help="wikitext-2 (../shared/data/wikitext-2/test.txt), wikitext-2-valid, or a text file.")
@click.option("--seq-len", type=int, default=None,
              help=f"Tokens per window (default {DEFAULT_SEQ_LEN}, capped at the model's max positions).")
@click.option("--max-tokens", type=int, default=None, help="Score only the first N tokens of the text.")
@out_option("file", "the quality table (JSON) to write; rows are merged into an existing table.",
            default="quality.json")
@click.option("--model-id", default=None, help="Name recorded for the model (default: the folder name).")
@click.option("--batch-size", type=int, default=None, help="Windows per forward pass (default: by memory).")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Progress on stderr: a bar on a terminal, plain lines otherwise.")
def quality_command(model_path, expert_bits, group_size, quantizer, adaptive_gating, gating_sensitivity, top_k,
                    data, seq_len, max_tokens, out, model_id, batch_size, threads, progress):
    """Perplexity of a model with its experts quantized and its gating changed, stored as a quality table."""
    _quiet_transformers()
    from moesim.atomic import prepare_output_path
    from moesim.quality.data import load_eval_text, token_windows, tokenize_text
    from moesim.quality.gating import load_sensitivities
    from moesim.quality.measure import measure_quality, settings_grid
    from moesim.quality.moe import load_moe_model
    from moesim.quality.quantize import get_quantizer
    from moesim.quality.table import write_quality_table

    # Check everything that needs no model first: loading a model is the slow part.
    bits = parse_bits(expert_bits)
    if group_size <= 0:
        raise MoesimError(f"--group-size {group_size}: expected a positive integer")
    get_quantizer(quantizer)
    thresholds = _parse_list(adaptive_gating, "--adaptive-gating", float, "a number")
    top_ks = _parse_list(top_k, "--top-k", int, "an integer") or [None]
    if seq_len is not None and seq_len < 2:
        raise MoesimError(f"--seq-len {seq_len}: expected at least 2 (one token of context, one to predict)")
    if max_tokens is not None and max_tokens < 2:
        raise MoesimError(f"--max-tokens {max_tokens}: expected at least 2")
    if batch_size is not None and batch_size < 1:
        raise MoesimError(f"--batch-size {batch_size}: expected a positive integer")
    if threads is not None and threads < 1:
        raise MoesimError(f"--threads {threads}: expected a positive integer")
    sensitivities = load_sensitivities(gating_sensitivity)
    text = load_eval_text(data)
    prepare_output_path(out)

    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    loaded = load_moe_model(model_path, model_id)
    max_pos = loaded.max_positions
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, max_pos) if max_pos else DEFAULT_SEQ_LEN
    elif max_pos and seq_len > max_pos:
        raise MoesimError(f"--seq-len {seq_len}: the model has {max_pos} positions (max_position_embeddings)")
    settings = settings_grid(bits, group_size, quantizer, thresholds, top_ks, sensitivities, loaded.layers[0].top_k)
    windows = token_windows(tokenize_text(loaded.tokenizer, text.text), seq_len, max_tokens)
    click.echo(f"{loaded.model_id}: {len(loaded.layers)} MoE layers, {loaded.layers[0].num_experts} experts, "
               f"top-{loaded.layers[0].top_k}; {text.name}: {windows.shape[0]} windows of {seq_len} tokens; "
               f"{len(settings)} settings")
    from moesim.progress import Progress

    bar = Progress(len(settings), "quality", "setting") if progress else None
    rows = measure_quality(loaded, text, windows, settings, on_row=lambda r, _: click.echo(_format_row(r)),
                           batch_size=batch_size, progress=bar)
    if bar is not None:
        bar.close()
    table = write_quality_table(out, rows)
    click.echo(f"wrote {len(rows)} rows to {out} ({len(table.rows)} rows in the table)")


@click.command(name="demo-model")
@out_option("folder", "the model, tokenizer and demo_report.json are written into it.", required=True)
@click.option("--quick", is_flag=True, help="A tiny model trained for seconds (for tests and smoke runs).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--steps", type=int, default=None, help="Override the number of training steps.")
@click.option("--threads", type=int, default=2, show_default=True, help="torch CPU threads for training.")
@click.option("--train-data", default="wikitext-2-valid", show_default=True, help="Training text.")
@click.option("--test-data", default="wikitext-2", show_default=True, help="Text the model is scored on.")
@click.option("--stop-at-step", type=int, default=None,
              help="Stop after this many steps of the schedule: that checkpoint of the full run (its learning "
                   "rate still decays over --steps).")
def demo_model_command(out, quick, seed, steps, threads, train_data, test_data, stop_at_step):
    """Train a small Mixtral-architecture MoE (8 experts, top-2) on WikiText-2 valid, score it on test."""
    _quiet_transformers()
    from moesim.quality.demo_model import FULL, QUICK, train_demo_model

    cfg = QUICK if quick else FULL
    if steps is not None and steps < 1:
        raise MoesimError(f"--steps {steps}: expected a positive integer")
    if threads < 1:
        raise MoesimError(f"--threads {threads}: expected a positive integer")
    cfg = dataclasses.replace(cfg, seed=seed, threads=threads, steps=steps or cfg.steps,
                              warmup_steps=min(cfg.warmup_steps, max(1, (steps or cfg.steps) // 10)))
    report = train_demo_model(out, cfg, train_data, test_data, log=click.echo, stop_at_step=stop_at_step)
    steps_run = f"{report.trained_steps} of {cfg.steps}" if report.trained_steps < cfg.steps else f"{cfg.steps}"
    click.echo(
        f"wrote {out}: {report.parameters} parameters, {steps_run} steps in {report.train_seconds:.1f} s "
        f"({report.steps_per_second:.2f} steps/s); test perplexity {report.test_perplexity:.2f} vs unigram "
        f"{report.unigram_perplexity:.2f}; top-expert share per layer "
        f"{', '.join(f'{s:.2f}' for s in report.top_expert_share)}; reuse "
        f"{', '.join(f'{r:.2f}' for r in report.reuse_rate)} (uniform {report.uniform_reuse_rate:.2f})"
    )
