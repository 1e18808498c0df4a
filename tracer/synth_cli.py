"""`moesim trace fit` (routing model from traces) and `moesim trace synth` (traces from a routing model)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Optional

import click
import numpy as np
import pyarrow.parquet as pq

from moesim.atomic import atomic_path, prepare_output_path
from moesim.errors import MoesimError
from moesim.options import out_option
from moesim.tracer.format import DECODE, METADATA_KEY, SCHEMA, STATUS_KEY, Trace, TraceMeta, sha256_of_file
from moesim.tracer.routing import (PARTS, UNIFORM, RoutingModel, edge_positions, read_routing, resolve_routing,
                                   routing_to_json, uniform_routing, write_routing)


def _parts(text: Optional[str]) -> tuple[str, ...]:
    if not text:
        return ()
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    for p in parts:
        if p not in PARTS:
            raise MoesimError(f"--disable {p}: expected a comma-separated list of {', '.join(PARTS)}")
    return parts


def write_trace_whole(path: str | Path, meta: TraceMeta, trace: Trace) -> Path:
    """Write a trace built in memory: one row group per request, to a temp file renamed into place (so a
    failure leaves nothing), with no timestamp but the one in ``meta`` (same inputs, same bytes)."""
    table = trace.cells.to_arrow()
    schema = SCHEMA.with_metadata({METADATA_KEY: meta.to_json().encode()})
    req = trace.cells.request
    bounds = np.flatnonzero(np.diff(req, prepend=-1, append=-2) != 0)
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for a, b in zip(bounds[:-1], bounds[1:]):
                writer.write_table(table.slice(int(a), int(b - a)).cast(schema), row_group_size=int(b - a))
            writer.add_key_value_metadata({STATUS_KEY: b"complete"})
    return Path(path)


@click.command(name="fit")
@click.argument("traces", nargs=-1, required=True, metavar="TRACE...")
@out_option("file", "the routing model to write (routing.json: JSON, versioned).", required=True)
@click.option("--name", default=None, help="Name stored in the file (default: the --out file stem).")
@click.option("--classes", type=int, default=None,
              help="Token classes for cross-layer correlation (default: 1 per 64 tokens of a phase, at most 4).")
@click.option("--disable", default=None, metavar="PART,...", help=f"Leave parts out of the model: {', '.join(PARTS)}.")
@click.option("--request-groups", "request_groups", default="auto", show_default=True, metavar="auto|N",
              help="Groups of requests that route alike, each fitted on its own requests: 'auto' chooses how many "
                   "(BIC, at most 4), a number fixes it, 1 fits one set of parameters to all requests.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the EM start and of the fit's syntheses.")
def fit_command(traces: tuple[str, ...], out: str, name: Optional[str], classes: Optional[int],
                disable: Optional[str], request_groups: str, seed: int) -> None:
    """Fit a routing model to TRACE... (files or bundled trace names) and write it to --out."""
    from moesim.tracer.format import read_trace
    from moesim.tracer.routing_fit import fit_routing
    from moesim.traces import resolve_trace

    parts = _parts(disable)
    if classes is not None and classes < 1:
        raise MoesimError(f"--classes {classes}: expected a positive integer")
    groups = None
    if request_groups != "auto":
        try:
            groups = int(request_groups)
        except ValueError:
            groups = 0
        if groups < 1:
            raise MoesimError(f"--request-groups {request_groups}: expected 'auto' or a positive integer")
    if Path(out).suffix.lower() != ".json":
        raise MoesimError(f"--out {out}: expected a .json file name")
    prepare_output_path(out)
    loaded = [read_trace(resolve_trace(t)) for t in traces]
    if not any((tr.cells.phase == DECODE).any() for tr in loaded):
        raise MoesimError(f"{', '.join(traces)}: no decode rows to fit (the routing model's decode phase is fitted "
                          f"on them)")
    t0 = time.perf_counter()
    model = fit_routing(loaded, name or Path(out).stem, classes=classes, seed=seed, disabled=parts, groups=groups)
    write_routing(out, model)
    dec = model.decode
    grouped = (f"{len(model.groups)} request groups ({', '.join(str(g.fitted_requests) for g in model.groups)} "
               f"requests)" if model.groups else "one request group")
    prompt_edge, decode_edge = edge_positions(model)
    edges = (f"the prompt's last {prompt_edge} positions, decode's first {decode_edge}" if prompt_edge or decode_edge
             else "none")
    click.echo(f"wrote {out}: {model.num_layers} MoE layers x {model.num_experts} experts, top-{model.top_k}; "
               f"{dec.num_classes} decode token class(es); {grouped}; phase edges: {edges}; fitted to "
               f"{len(loaded)} trace(s) in {time.perf_counter() - t0:.1f} s")


# Peak memory of `trace synth` per routed cell, bytes: 48 + 36 per expert of the cell, fitted to measured peaks
# (Mixtral top-2, 0.64M and 2.56M cells: 186 and 382 MB; Qwen3 top-6, 0.48M cells: 237 MB), plus the process.
SYNTH_BYTES_PER_CELL = (48, 36)
SYNTH_BASE_BYTES = 150 * 2**20


def check_fits_in_memory(requests: int, tokens: int, layers: int, top_k: int) -> None:
    """A one-line error, before anything is allocated, when the trace asked for cannot fit in this machine's
    available memory (numpy's allocation error otherwise surfaced as a traceback, or swapping for minutes)."""
    cells = requests * tokens * layers
    need = SYNTH_BASE_BYTES + cells * (SYNTH_BYTES_PER_CELL[0] + SYNTH_BYTES_PER_CELL[1] * top_k)
    from moesim.machine import memory_bytes

    have = memory_bytes(available=True)
    if need > have:
        raise MoesimError(f"--requests {requests} x {tokens} tokens (--prompt-len + --output-len) x {layers} layers "
                          f"= {cells:,} cells need about {need / 2**30:.1f} GiB to synthesize, more than the "
                          f"{have / 2**30:.1f} GiB available; synthesize fewer requests or tokens per file")


def check_model_config(model: RoutingModel, spec: str, where: str):
    """The shape of ``spec``, or a one-line error when it does not match the routing model."""
    from moesim.modelspec import load_model_shape

    shape = load_model_shape(spec)
    mine = (model.num_layers, model.num_experts, model.top_k)
    theirs = (shape.num_moe_layers, shape.num_experts, shape.top_k)
    if mine != theirs:
        raise MoesimError(
            f"--model-config {spec}: {theirs[0]} MoE layers x {theirs[1]} experts, top-{theirs[2]}, but routing "
            f"{where} is for {mine[0]} x {mine[1]}, top-{mine[2]}")
    return shape


@click.command(name="synth")
@click.option("--routing", "routing", required=True, metavar="FILE|NAME",
              help="A routing model file (`moesim trace fit`), a bundled name (e.g. mixtral-8x7b-published), or "
                   "'uniform' (no structure: k experts uniformly per cell, for any --model-config).")
@click.option("--model-config", "model_config", default=None, metavar="M",
              help="Model the trace is labelled with (a bundled name, config.json or folder); must match the "
                   "routing's layers, experts and top-k. Default: the model the routing was fitted for.")
@click.option("--requests", type=int, required=True, help="Requests to synthesize.")
@click.option("--prompt-len", "prompt_len", type=int, required=True, help="Prompt tokens (prefill cells) per request.")
@click.option("--output-len", "output_len", type=int, required=True, help="Decode steps per request.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--disable", default=None, metavar="PART,...",
              help=f"Synthesize without some parts of the model: {', '.join(PARTS)}.")
@out_option("file", "the trace to write (T.parquet, the normal trace format).", required=True)
def synth_command(routing: str, model_config: Optional[str], requests: int, prompt_len: int, output_len: int,
                  seed: int, disable: Optional[str], out: str) -> None:
    """Synthesize a routing trace from a routing model; its metadata says it is synthetic and from what."""
    from moesim.tracer.synth import synthetic_meta, synthetic_trace

    if requests < 1:
        raise MoesimError(f"--requests {requests}: expected at least 1")
    if prompt_len < 0:
        raise MoesimError(f"--prompt-len {prompt_len}: expected 0 or more")
    if output_len < 1:
        raise MoesimError(f"--output-len {output_len}: expected at least 1")
    if Path(out).suffix.lower() != ".parquet":
        raise MoesimError(f"--out {out}: expected a .parquet file name")
    parts = _parts(disable)
    if routing == UNIFORM and not Path(routing).is_file():
        if not model_config:
            raise MoesimError("--routing uniform: expected --model-config (the model whose layers, experts and top-k "
                              "to draw)")
        from moesim.modelspec import load_model_shape

        model = uniform_routing(load_model_shape(model_config))
        shape, routing_sha = None, hashlib.sha256(routing_to_json(model).encode()).hexdigest()
        parts = tuple(PARTS)  # nothing to switch on: every part of the model is absent
    else:
        path = resolve_routing(routing)
        model = read_routing(path)
        shape = check_model_config(model, model_config, routing) if model_config else None
        routing_sha = sha256_of_file(path)
    check_fits_in_memory(requests, prompt_len + output_len, model.num_layers, model.top_k)
    prepare_output_path(out)
    t0 = time.perf_counter()
    details = {"seed": seed, "requests": requests, "prompt_len": prompt_len, "output_len": output_len,
               "disabled": list(parts)}
    meta = synthetic_meta(model, shape, routing_path=routing if not Path(routing).is_file() else str(path),
                          routing_sha256=routing_sha, details=details)
    trace = synthetic_trace(model, np.full(requests, prompt_len), np.full(requests, output_len), seed=seed,
                            disabled=parts, meta=meta)
    write_trace_whole(out, meta, trace)
    acts = trace.experts.size
    click.echo(f"wrote {out}: {requests} requests x ({prompt_len} prefill + {output_len} decode) tokens x "
               f"{model.num_layers} MoE layers, {acts} routed experts, synthetic from {model.name} "
               f"in {time.perf_counter() - t0:.1f} s")
