"""`moesim trace import`: convert other engines' routing dumps into the moesim trace format.

One registry, :data:`IMPORTERS`, maps a format name to an :class:`Importer`. An importer reads and checks
the whole source before anything is written, so a bad file leaves no output; what it repaired or dropped
comes back as summary lines that the command prints and the trace keeps in ``TraceSource.details``.

Formats
-------
``llama-route-csv``
    The ``route_trace v1`` CSV of BigMoeOnEdge (a llama.cpp-based engine that streams experts from flash):
    ``#`` preamble lines (model, per-layer ``expert_bytes`` and ``dense_bytes``), then one row per routed
    expert ``turn,phase,step,layer,slot,expert,weight,residency,expert_bytes`` in execution order
    (prefill layer-major, decode step-major). ``turn`` becomes the request, ``step`` the position.
    ``recorded_hit`` is the engine's own cache record: ``residency`` 1 or 2 on decode rows; on prefill
    rows the engine writes ``residency=0`` throughout but reads no bytes for an expert already in its
    cache, so there ``expert_bytes == 0`` is the hit (this matches a replay of its LRU on every prefill
    row of the bundled traces). The engine's cache budget is not in the CSV: ``--engine-cache-budget``,
    or the ``cache_budget_MiB`` of the run's ``<name>.metrics`` file beside the CSV.
``vllm-jsonl``
    JSON lines written by a hook on vLLM's fused-MoE expert selection, one object per (token, layer):
    ``{"dataset", "problem_id", "layer", "token_idx" | "token_pos", "experts", "gating_probs"}``.
    With ``token_idx`` (decode only) the index is the hook's per-layer counter, so a cell the hook
    dropped (exact 0.5/0.5 top-2 ties) leaves that layer's later indices one step behind. Line order
    does not matter: a layer that lost no cell is placed at its token_idx; a layer that lost one is
    re-aligned when the problem's lines are in execution order (a new step wherever the layer index
    stops increasing) and otherwise dropped alone as ambiguous, with a count. With ``token_pos`` (raw) a new forward pass starts wherever the layer
    index stops increasing, the first pass of a problem is its prefill, and positions follow from the
    pass and the rank of ``token_pos`` inside it. Cells with the wrong number of experts, expert or
    layer ids out of range, repeated experts, or non-finite or negative weights are dropped; cells not in
    descending weight order are reordered; all counted in the summary.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

import click
import numpy as np

from moesim.atomic import atomic_path, note_input
from moesim.errors import MoesimError
from moesim.modelspec import ModelShape, bundled_model_configs, load_model_shape
from moesim.options import out_option
from moesim.tracer.format import (
    DECODE,
    PREFILL,
    RecordedEngine,
    TraceCells,
    TraceMeta,
    TraceSource,
    sha256_of_file,
    write_trace,
)
from moesim.units import parse_bytes


@dataclass(frozen=True)
class ImportOptions:
    """What the user may add on the command line; each importer says which it needs."""

    model_config: Optional[str] = None  # bundled name or config path
    engine_cache_budget: Optional[int] = None  # bytes
    dtype: Optional[str] = None  # weights dtype, for formats that do not record expert sizes


@dataclass
class ImportResult:
    meta: TraceMeta
    cells: TraceCells  # in execution order
    summary: list[str] = field(default_factory=list)  # what was read, repaired and dropped


class Importer(Protocol):
    name: str
    description: str

    def load(self, src: Path, options: ImportOptions) -> ImportResult: ...


# ------------------------------------------------------------------------------------------------
# Model shapes
# ------------------------------------------------------------------------------------------------
# GGUF architecture names (llama.cpp) -> transformers model_type.
_GGUF_ARCH_TO_MODEL_TYPE = {
    "qwen3moe": "qwen3_moe", "qwen2moe": "qwen2_moe", "gpt-oss": "gpt_oss", "gptoss": "gpt_oss",
    "llama": "mixtral", "mixtral": "mixtral", "olmoe": "olmoe", "deepseek2": "deepseek_v2", "gemma4": "gemma4",
}


def _bundled_candidates(model_type: str, num_experts: int) -> list[str]:
    """Bundled config names with this model_type and expert count (read from the JSON, no model built)."""
    names = []
    for name, path in sorted(bundled_model_configs().items()):
        data = json.loads(path.read_text())
        cfg = data.get("text_config", data)
        experts = next((cfg[k] for k in ("num_local_experts", "num_experts", "n_routed_experts") if k in cfg), None)
        if data.get("model_type") == model_type and experts == num_experts:
            names.append(name)
    return names


def _check_shape_matches(shape: ModelShape, spec: str, num_layers: int, num_experts: int, where: str) -> None:
    if shape.num_moe_layers != num_layers or shape.num_experts != num_experts:
        raise MoesimError(
            f"--model-config {spec}: has {shape.num_moe_layers} MoE layers x {shape.num_experts} experts, "
            f"but {where} has {num_layers} x {num_experts}"
        )


def _with_trace_top_k(shape: ModelShape, top_k: int, why: str) -> ModelShape:
    """The trace's top-k replaces the config's; ``extra`` keeps both and why they differ."""
    if shape.top_k == top_k:
        return shape
    extra = dict(shape.extra)
    extra["top_k_override"] = {"config_top_k": shape.top_k, "trace_top_k": top_k, "why": why}
    return dataclasses.replace(shape, top_k=top_k, extra=extra)


def gemma4_26b_a4b_shape(num_layers: int, num_experts: int, top_k: int) -> ModelShape:
    """Gemma-4-26B-A4B, for which no config.json is available here: built from what is known.

    Exact from the route trace: 30 MoE layers (every decoder layer), 128 experts, top-6 as run. The
    expert size is inferred exactly from the GGUF bytes per expert: gate/up at Q4_K (144 B per 256
    weights) with down at Q5_K (176 B/256) gives 3,593,216 B and with down at Q8_0 (34 B/32) gives
    4,336,640 B, both for hidden x expert-intermediate = 1,982,464, i.e. 3 x 1,982,464 parameters. The
    split 2816 x 704, the dense MLP (2112), the attention sizes and the native top-8 are the published
    model-card figures (25.2B total, 3.8B active parameters, which this shape reproduces); they are
    assumed, not read from a config.
    """
    hidden, expert_inter, dense_inter = 2816, 704, 2112
    heads, kv_heads, head_dim = 16, 8, 256  # sliding-window layers
    global_kv_heads, global_head_dim = 2, 512  # full-attention layers (every 6th), keys reused as values
    vocab = 262_144  # Gemma tokenizer; embeddings tied to the output head
    full_layers = [i for i in range(num_layers) if (i + 1) % 6 == 0]
    norm_params = 7 * hidden  # input/post-attention/pre-/post-feedforward (+_1, _2, pre_2) RMSNorms
    router = hidden * num_experts + num_experts  # projection + per-expert scale
    dense_mlp = 3 * hidden * dense_inter
    sliding = (2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + 2 * head_dim
               + dense_mlp + router + norm_params)
    full = (2 * hidden * heads * global_head_dim + hidden * global_kv_heads * global_head_dim
            + 2 * global_head_dim + dense_mlp + router + norm_params)
    non_expert = vocab * hidden + hidden + sliding * (num_layers - len(full_layers)) + full * len(full_layers)
    return ModelShape(
        model_id="google/gemma-4-26B-A4B-it",
        architecture="gemma4",
        num_model_layers=num_layers,
        moe_layer_ids=tuple(range(num_layers)),
        num_experts=num_experts,
        top_k=top_k,
        hidden_size=hidden,
        expert_intermediate_size=expert_inter,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        expert_params=3 * hidden * expert_inter,
        non_expert_params=non_expert,
        num_shared_experts=0,
        kv_bytes_per_token_per_layer_fp16=2 * kv_heads * head_dim * 2,
        extra={
            "exact": ["num_model_layers", "moe_layer_ids", "num_experts", "top_k (as run)"],
            "inferred": {"expert_params": "3 x 1,982,464 from the GGUF bytes per expert (Q4_K gate/up; "
                                          "Q5_K or Q8_0 down); exact under that block arithmetic"},
            "assumed": {
                "hidden_size, expert_intermediate_size": "2816 x 704, the model-card split of 1,982,464",
                "num_attention_heads, num_key_value_heads, head_dim": "16, 8, 256 on sliding-window layers; "
                "full-attention layers (every 6th) use 2 KV heads of 512 with keys reused as values",
                "non_expert_params": "counted from the assumed sizes (dense MLP 2112 beside the experts, "
                "tied 262,144-token embeddings); approximate",
                "kv_bytes_per_token_per_layer_fp16": "sliding-window layers; the window (1024) caps them",
                "native_top_k": 8,
            },
            "why": "no config.json for Gemma-4-26B-A4B is bundled or reachable offline; give the real one "
                   "with --model-config to replace these",
        },
    )


# ------------------------------------------------------------------------------------------------
# llama-route-csv
# ------------------------------------------------------------------------------------------------
ROUTE_CSV_COLUMNS = ("turn", "phase", "step", "layer", "slot", "expert", "weight", "residency", "expert_bytes")
_MODEL_LINE = re.compile(
    r"#\s*model=(?P<model>.*?)\s+arch=(?P<arch>\S+)\s+n_layer=(?P<n_layer>\d+)\s+n_expert=(?P<n_expert>\d+)"
    r"\s+n_expert_used=(?P<k>\d+)\s*$"
)
_LAYER_LINE = re.compile(r"#\s*layer=(?P<layer>\d+)\s+expert_bytes=(?P<eb>\d+)\s+dense_bytes=(?P<db>\d+)\s*$")


@dataclass(frozen=True)
class RouteCsvHeader:
    model_path: str
    arch: str
    num_layers: int
    num_experts: int
    top_k: int
    expert_bytes: tuple[int, ...]
    dense_bytes: tuple[int, ...]


@dataclass
class RouteCsvRows:
    """The rows of a route CSV grouped into cells (one per turn, phase, step, layer), in file order."""

    header: RouteCsvHeader
    cells: TraceCells
    first_line: np.ndarray  # file line number of each cell's first row


def gguf_dtype(model_path: str) -> str:
    """'gguf-q4_k_m' from '.../Qwen3-30B-A3B-Q4_K_M.gguf'; plain 'gguf' when the file name does not say."""
    m = re.search(r"(?i)\b(q\d+_(?:k_[sml]|k|\d)|iq\d+_(?:xxs|xs|s|m|nl)|bf16|f16|f32|mxfp4)\b", Path(model_path).name)
    return f"gguf-{m.group(1).lower()}" if m else "gguf"


def _metrics_budget(src: Path) -> Optional[int]:
    """``cache_budget_MiB`` from the run's metrics file beside the CSV (``qwen.route.csv`` -> ``qwen.metrics``)."""
    name = src.name
    stem = name[: -len(".route.csv")] if name.endswith(".route.csv") else src.stem
    metrics = src.with_name(stem + ".metrics")
    if not metrics.is_file():
        return None
    note_input(metrics)
    for number, line in enumerate(metrics.read_text(errors="replace").splitlines(), start=1):
        m = re.search(r"\bcache_budget_MiB=(\S*)", line)
        if line.startswith("#") and m:
            try:
                mib = float(m.group(1))
            except ValueError:
                mib = math.nan
            if not math.isfinite(mib) or mib <= 0:
                raise MoesimError(f"{metrics}: line {number}: cache_budget_MiB={m.group(1)}, expected a positive "
                                  f"number of MiB (or give --engine-cache-budget)")
            return int(round(mib * 2**20))
    return None


def read_route_csv(src: Path) -> RouteCsvRows:
    """Parse and check a ``route_trace v1`` CSV; every problem is an error naming its line."""
    text = _read_text(src)
    lines = text.splitlines()
    if not lines or lines[0].strip() != "# route_trace v1":
        got = lines[0].strip()[:60] if lines else "an empty file"
        raise MoesimError(f"{src}: line 1 is '{got}', expected '# route_trace v1' (llama-route-csv)")
    model_m: Optional[re.Match] = None
    layer_bytes: dict[int, tuple[int, int]] = {}
    n = 1
    while n < len(lines) and lines[n].startswith("#"):
        line = lines[n]
        if line.lstrip("# ").startswith("model="):
            model_m = _MODEL_LINE.match(line)
            if not model_m:
                raise MoesimError(f"{src}: line {n + 1}: expected '# model=PATH arch=A n_layer=L n_expert=E "
                                  f"n_expert_used=K'")
        elif line.lstrip("# ").startswith("layer="):
            lm = _LAYER_LINE.match(line)
            if not lm:
                raise MoesimError(f"{src}: line {n + 1}: expected '# layer=I expert_bytes=B dense_bytes=D'")
            layer_bytes[int(lm["layer"])] = (int(lm["eb"]), int(lm["db"]))
        n += 1
    if model_m is None:
        raise MoesimError(f"{src}: preamble has no '# model=... arch=... n_layer=... n_expert=... n_expert_used=...' line")
    L, E, k = int(model_m["n_layer"]), int(model_m["n_expert"]), int(model_m["k"])
    if L < 1 or E < 1 or not 1 <= k <= E:
        raise MoesimError(f"{src}: preamble has n_layer={L} n_expert={E} n_expert_used={k}, expected positive "
                          f"sizes with n_expert_used <= n_expert")
    missing = [i for i in range(L) if i not in layer_bytes]
    if missing:
        raise MoesimError(f"{src}: preamble has no '# layer={missing[0]} expert_bytes=... dense_bytes=...' line "
                          f"(expected one per layer 0..{L - 1})")
    header = RouteCsvHeader(
        model_path=model_m["model"], arch=model_m["arch"], num_layers=L, num_experts=E, top_k=k,
        expert_bytes=tuple(layer_bytes[i][0] for i in range(L)), dense_bytes=tuple(layer_bytes[i][1] for i in range(L)),
    )
    if n >= len(lines):
        raise MoesimError(f"{src}: no CSV header after the preamble, expected '{','.join(ROUTE_CSV_COLUMNS)}'")
    columns = tuple(c.strip() for c in lines[n].split(","))
    if columns != ROUTE_CSV_COLUMNS:
        raise MoesimError(f"{src}: line {n + 1}: columns are '{','.join(columns)}', expected "
                          f"'{','.join(ROUTE_CSV_COLUMNS)}'")
    body = lines[n + 1:]
    first_data_line = n + 2
    if not body:
        raise MoesimError(f"{src}: no data rows after the header")
    values = np.zeros((len(body), 8), dtype=np.int64)
    weights = np.zeros(len(body), dtype=np.float64)
    int_cols = [0, 1, 2, 3, 4, 5, 7, 8]
    for i, row in enumerate(csv.reader(body)):
        line_no = first_data_line + i
        if len(row) != len(ROUTE_CSV_COLUMNS):
            raise MoesimError(f"{src}: line {line_no}: {len(row)} fields, expected {len(ROUTE_CSV_COLUMNS)} "
                              f"({','.join(ROUTE_CSV_COLUMNS)})")
        try:
            for j, c in enumerate(int_cols):
                values[i, j] = int(row[c])
            weights[i] = float(row[6])
        except ValueError:
            bad = next(c for c in range(len(row)) if not _parses(row[c], float if c == 6 else int))
            raise MoesimError(f"{src}: line {line_no}: column '{ROUTE_CSV_COLUMNS[bad]}' is '{row[bad]}', "
                              f"expected {'a number' if bad == 6 else 'an integer'}") from None
    turn, phase, step, layer, slot, expert, residency, nbytes = values.T
    line_no = np.arange(len(body)) + first_data_line

    def check(bad: np.ndarray, column: str, value: np.ndarray, expected: str) -> None:
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise MoesimError(f"{src}: line {int(line_no[i])}: column '{column}' is {value[i]}, expected {expected}")

    check(turn < 0, "turn", turn, ">= 0")
    check((phase != 0) & (phase != 1), "phase", phase, "0 (prefill) or 1 (decode)")
    check(step < 0, "step", step, ">= 0")
    check((layer < 0) | (layer >= L), "layer", layer, f"0..{L - 1}")
    check((slot < 0) | (slot >= k), "slot", slot, f"0..{k - 1}")
    check((expert < 0) | (expert >= E), "expert", expert, f"0..{E - 1}")
    check(~np.isfinite(weights) | (weights < 0), "weight", weights, "a finite non-negative number")
    check((residency < 0) | (residency > 2), "residency", residency, "0 (miss), 1 (hit) or 2 (prefetched hit)")
    layer_eb = np.asarray(header.expert_bytes, dtype=np.int64)[layer]
    check((nbytes != 0) & (nbytes != layer_eb), "expert_bytes", nbytes,
          "0 (hit) or the layer's expert_bytes from the preamble")

    # Cells: consecutive rows with the same (turn, phase, step, layer), slots 0..k-1 in order.
    key_change = np.ones(len(body), dtype=bool)
    key_change[1:] = ((turn[1:] != turn[:-1]) | (phase[1:] != phase[:-1]) | (step[1:] != step[:-1])
                      | (layer[1:] != layer[:-1]))
    starts = np.flatnonzero(key_change)
    sizes = np.diff(np.append(starts, len(body)))
    bad_size = np.flatnonzero(sizes != k)
    if bad_size.size:
        c = int(bad_size[0])
        raise MoesimError(f"{src}: line {int(line_no[starts[c]])}: cell (turn {turn[starts[c]]}, phase "
                          f"{phase[starts[c]]}, step {step[starts[c]]}, layer {layer[starts[c]]}) has {sizes[c]} "
                          f"rows, expected n_expert_used={k}")
    expected_slot = np.tile(np.arange(k), len(starts))
    check(slot != expected_slot, "slot", slot, "0..k-1 in order within each cell")
    ex = expert.reshape(-1, k)
    dup = (np.sort(ex, axis=1)[:, 1:] == np.sort(ex, axis=1)[:, :-1]).any(axis=1)
    if dup.any():
        c = int(np.flatnonzero(dup)[0])
        raise MoesimError(f"{src}: line {int(line_no[starts[c]])}: cell lists expert "
                          f"{_first_duplicate(ex[c])} twice, expected k distinct experts")
    hit = np.where(phase == DECODE, residency > 0, nbytes == 0).reshape(-1, k)
    cells = TraceCells(
        request=turn[starts].astype(np.int32), phase=phase[starts].astype(np.uint8),
        position=step[starts].astype(np.int32), layer=layer[starts].astype(np.int16),
        experts=ex.astype(np.int16), weights=weights.reshape(-1, k).astype(np.float32),
        recorded_hit=hit.astype(bool),
    )
    order = cells.execution_order()
    out_of_order = np.flatnonzero(order != np.arange(len(order)))
    if out_of_order.size:
        c = int(out_of_order[0])
        raise MoesimError(f"{src}: line {int(line_no[starts[c]])}: rows are not in execution order (prefill "
                          f"layer-major, then decode step-major) or a cell repeats")
    seen = np.stack([cells.request, cells.phase, cells.position, cells.layer], axis=1)
    if len(np.unique(seen, axis=0)) != len(seen):
        raise MoesimError(f"{src}: a (turn, phase, step, layer) cell appears twice")
    return RouteCsvRows(header=header, cells=cells, first_line=line_no[starts])


def _parses(text: str, kind) -> bool:
    try:
        kind(text)
        return True
    except ValueError:
        return False


def _first_duplicate(values: np.ndarray) -> int:
    seen = set()
    for v in values.tolist():
        if v in seen:
            return v
        seen.add(v)
    return -1


def _read_text(src: Path) -> str:
    if not src.exists():
        raise MoesimError(f"{src}: file not found")
    if src.is_dir():
        raise MoesimError(f"{src}: is a folder, expected a file")
    try:
        return src.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MoesimError(f"{src}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise MoesimError(f"{src}: cannot be read ({exc.strerror or exc})") from None


class LlamaRouteCsvImporter:
    name = "llama-route-csv"
    description = "BigMoeOnEdge route_trace v1 CSV: routing and the engine's own cache hits"
    engine_name = "BigMoeOnEdge"

    def model_shape(self, header: RouteCsvHeader, spec: Optional[str], src: Path) -> ModelShape:
        why = (f"the engine ran with n_expert_used={header.top_k} (the CSV's top-k), overriding the model's "
               f"native top-k")
        model_type = _GGUF_ARCH_TO_MODEL_TYPE.get(header.arch, header.arch)
        if spec:
            shape = load_model_shape(spec)
            _check_shape_matches(shape, spec, header.num_layers, header.num_experts, str(src))
            return _with_trace_top_k(shape, header.top_k, why)
        for name in _bundled_candidates(model_type, header.num_experts):
            shape = load_model_shape(name)
            if shape.num_moe_layers == header.num_layers:
                return _with_trace_top_k(shape, header.top_k, why)
        if model_type == "gemma4" and header.num_layers == 30 and header.num_experts == 128:
            return gemma4_26b_a4b_shape(header.num_layers, header.num_experts, header.top_k)
        raise MoesimError(
            f"{src}: no bundled model config matches arch={header.arch} n_layer={header.num_layers} "
            f"n_expert={header.num_experts}; give one with --model-config (a bundled name: "
            f"{', '.join(sorted(bundled_model_configs()))}, or a config.json path)"
        )

    def load(self, src: Path, options: ImportOptions) -> ImportResult:
        if options.dtype:
            raise MoesimError("--dtype does not apply to llama-route-csv (the CSV records the GGUF bytes per expert)")
        rows = read_route_csv(src)
        header, cells = rows.header, rows.cells
        budget, budget_from = options.engine_cache_budget, "--engine-cache-budget"
        if budget is None:
            budget, budget_from = _metrics_budget(src), "cache_budget_MiB of the run's .metrics file"
        if budget is None:
            raise MoesimError(
                f"{src}: the engine's cache budget is not in the CSV; give it with --engine-cache-budget "
                f"(e.g. 4000MiB) so the recorded hits can be replayed"
            )
        shape = self.model_shape(header, options.model_config, src)
        details: dict[str, Any] = {
            "engine": self.engine_name,
            "gguf_model": header.model_path,
            "gguf_arch": header.arch,
            "dense_bytes_per_layer": list(header.dense_bytes),
            "non_expert_bytes": "sum of the per-layer dense_bytes of the preamble (attention, router, norms, "
                                "dense MLP); the token embedding and output head are not in the CSV",
            "recorded_hit": "decode rows: residency 1 or 2; prefill rows: expert_bytes == 0 (the engine writes "
                            "residency=0 on every prefill row but reads nothing for an expert it already holds)",
            "cache_budget_from": budget_from,
            "turn_to_request": "request = turn; position = step",
        }
        meta = TraceMeta(
            model=shape,
            dtype=gguf_dtype(header.model_path),
            expert_bytes=header.expert_bytes,
            non_expert_bytes=int(sum(header.dense_bytes)),
            source=TraceSource(kind="import", path=str(src), sha256=sha256_of_file(src), format=self.name,
                               details=details),
            recorded_engine=RecordedEngine(
                name=self.engine_name, cache_policy="global-lru-bytes", cache_budget_bytes=int(budget),
                notes="one LRU over (layer, expert) across all layers, capped by bytes (each entry its layer's "
                      "expert_bytes); a cell's k experts are looked up against the cache before the cell, then "
                      "promoted or inserted in rank order, then the LRU tail is evicted until the cache fits",
            ),
        )
        pre = cells.phase == PREFILL
        dec = ~pre
        summary = [
            f"model {shape.model_id} ({header.arch}): {header.num_layers} MoE layers x {header.num_experts} experts, "
            f"top-{header.top_k}" + (f" (config top-{shape.extra['top_k_override']['config_top_k']} overridden "
                                     f"by the trace)" if "top_k_override" in shape.extra else ""),
            f"{len(np.unique(cells.request))} request(s): {int(pre.sum())} prefill cells, {int(dec.sum())} decode "
            f"cells, {cells.experts.size} routed experts",
            f"recorded hits: decode {cells.recorded_hit[dec].mean() * 100 if dec.any() else 0:.1f}%, prefill "
            f"{cells.recorded_hit[pre].mean() * 100 if pre.any() else 0:.1f}%; engine cache budget "
            f"{budget / 2**20:g} MiB ({budget_from})",
        ]
        if "assumed" in shape.extra:
            summary.append("model shape partly assumed (no config available): see the trace's model.extra, or "
                           "give --model-config")
        return ImportResult(meta=meta, cells=cells, summary=summary)


# ------------------------------------------------------------------------------------------------
# vllm-jsonl
# ------------------------------------------------------------------------------------------------
@dataclass
class VllmRecord:
    line: int
    request: int
    layer: int
    index: int  # token_idx or token_pos
    experts: list
    probs: list
    defect: str = ""  # why the cell is dropped, "" if usable
    position: int = -1
    phase: int = DECODE


@dataclass
class VllmRepairs:
    """What the vllm-jsonl importer changed; every count is of cells (one token at one layer)."""

    form: str = ""  # "token_idx" (decode only) or "token_pos" (raw, prefill + decode)
    records: int = 0
    realigned_token_idx: int = 0  # cells moved to the decode step their execution order shows
    shifted_layers: int = 0  # (problem, layer) pairs whose token_idx fell behind
    missing_cells: int = 0  # cells absent from the dump (dropped by the hook), left as holes
    dropped_wrong_k: int = 0
    dropped_out_of_range: int = 0
    dropped_repeated_expert: int = 0
    dropped_bad_weights: int = 0
    dropped_duplicate_cell: int = 0
    dropped_unlocatable_problems: int = 0  # kept for readers of older traces' details; no longer set
    dropped_unlocatable_layers: int = 0  # (problem, layer) pairs that lost a cell at a step no line order shows
    dropped_unlocatable_cells: int = 0
    reordered_by_weight: int = 0
    layer_ids_were_decoder_layers: bool = False

    def lines(self) -> list[str]:
        out = []
        if self.realigned_token_idx:
            out.append(f"re-aligned token_idx of {self.realigned_token_idx} cells in {self.shifted_layers} "
                       f"(problem, layer) pairs that fell behind after a dropped cell")
        if self.missing_cells:
            out.append(f"{self.missing_cells} cells missing from the dump (dropped by the hook), left out")
        for name, why in (("dropped_wrong_k", "with the wrong number of experts"),
                          ("dropped_out_of_range", "with expert or layer ids out of range"),
                          ("dropped_repeated_expert", "listing an expert twice"),
                          ("dropped_bad_weights", "with weights not matching the experts, not finite or negative"),
                          ("dropped_duplicate_cell", "repeating a cell already read")):
            if getattr(self, name):
                out.append(f"dropped {getattr(self, name)} cells {why}")
        if self.dropped_unlocatable_layers:
            out.append(f"dropped {self.dropped_unlocatable_cells} cells of {self.dropped_unlocatable_layers} "
                       f"(problem, layer) pairs that lost a cell at an unknown step (their lines are not in "
                       f"execution order, so the step cannot be told); every other layer is placed by token_idx")
        if self.reordered_by_weight:
            out.append(f"reordered {self.reordered_by_weight} cells into descending weight order")
        if self.layer_ids_were_decoder_layers:
            out.append("layer numbers are decoder-layer indices; mapped to MoE layer indices")
        return out or ["no defects found"]


class VllmJsonlImporter:
    name = "vllm-jsonl"
    description = "vLLM fused-MoE hook dump, JSON lines (token_idx or token_pos form); needs --model-config"

    def parse(self, src: Path) -> tuple[list[VllmRecord], list[tuple[str, Any]], str]:
        """Records in file order, the (dataset, problem_id) of each request, and the form."""
        text = _read_text(src)
        records: list[VllmRecord] = []
        requests: dict[tuple[str, Any], int] = {}
        form = ""
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MoesimError(f"{src}: line {line_no}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise MoesimError(f"{src}: line {line_no}: expected a JSON object")
            has_idx, has_pos = "token_idx" in obj, "token_pos" in obj
            if has_idx == has_pos:
                raise MoesimError(f"{src}: line {line_no}: expected exactly one of 'token_idx' (decode-only form) "
                                  f"or 'token_pos' (raw form)")
            this_form = "token_idx" if has_idx else "token_pos"
            if form and this_form != form:
                raise MoesimError(f"{src}: line {line_no}: has '{this_form}' but earlier lines have '{form}'; "
                                  f"one file holds one form")
            form = this_form
            for key in ("problem_id", "layer", "experts", "gating_probs"):
                if key not in obj:
                    raise MoesimError(f"{src}: line {line_no}: missing field '{key}'")
            for key in ("layer", form):
                if not _is_int(obj[key]) or obj[key] < 0:
                    raise MoesimError(f"{src}: line {line_no}: field '{key}' is {json.dumps(obj[key])[:30]}, "
                                      f"expected an integer >= 0")
            pid = obj["problem_id"]
            if not (_is_int(pid) or isinstance(pid, str)):
                raise MoesimError(f"{src}: line {line_no}: field 'problem_id' is {json.dumps(pid)[:30]}, "
                                  f"expected an integer or a string")
            experts, probs = obj["experts"], obj["gating_probs"]
            if not isinstance(experts, list) or not all(_is_int(e) for e in experts):
                raise MoesimError(f"{src}: line {line_no}: field 'experts' is not a list of integers")
            if not isinstance(probs, list) or not all(_is_number(p) for p in probs):
                raise MoesimError(f"{src}: line {line_no}: field 'gating_probs' is not a list of numbers")
            key = (str(obj.get("dataset", "")), pid)
            request = requests.setdefault(key, len(requests))
            records.append(VllmRecord(line=line_no, request=request, layer=int(obj["layer"]),
                                      index=int(obj[form]), experts=experts, probs=probs))
        if not records:
            raise MoesimError(f"{src}: no records (expected JSON lines, one object per token and layer)")
        return records, list(requests), form

    def load(self, src: Path, options: ImportOptions) -> ImportResult:
        if options.engine_cache_budget is not None:
            raise MoesimError("--engine-cache-budget applies only to formats that record an engine's cache hits "
                              "(llama-route-csv)")
        if not options.model_config:
            raise MoesimError(
                f"vllm-jsonl needs --model-config (a bundled name: {', '.join(sorted(bundled_model_configs()))}, "
                f"or a config.json path): the dump does not say the model's shape"
            )
        _read_text(src)  # a missing file is reported before the model config is loaded
        dtype = options.dtype or "bfloat16"
        shape = load_model_shape(options.model_config)
        try:
            expert_bytes = shape.expert_bytes(dtype)
        except MoesimError as exc:
            raise MoesimError(f"--dtype {exc.message}") from None
        records, request_keys, form = self.parse(src)
        repairs = VllmRepairs(form=form, records=len(records))
        self._map_layers(records, shape, repairs)
        self._mark_defects(records, shape, repairs, src)
        by_request: dict[int, list[VllmRecord]] = {}
        for r in records:
            by_request.setdefault(r.request, []).append(r)
        for mine in by_request.values():
            if form == "token_idx":
                self._align_decode_only(mine, shape.num_moe_layers, repairs)
            else:
                self._align_raw(mine, shape.num_moe_layers, repairs)
        cells = self._cells(records, shape.top_k, repairs)
        if len(cells) == 0:
            raise MoesimError(f"{src}: no usable cells left after dropping defective ones ({'; '.join(repairs.lines())})")
        details = {
            "form": form,
            "repairs": dataclasses.asdict(repairs),
            "requests": [{"dataset": d, "problem_id": p} for d, p in request_keys],
            "position": ("decode step (token_idx, re-aligned); the prompt length is not in the dump"
                         if form == "token_idx" else "prefill = first forward pass, positions in pass order"),
        }
        meta = TraceMeta(
            model=shape, dtype=dtype, expert_bytes=(expert_bytes,) * shape.num_moe_layers,
            non_expert_bytes=shape.non_expert_bytes(dtype),
            source=TraceSource(kind="import", path=str(src), sha256=sha256_of_file(src), format=self.name,
                               details=details),
        )
        pre = cells.phase == PREFILL
        summary = [
            f"model {shape.model_id}: {shape.num_moe_layers} MoE layers x {shape.num_experts} experts, "
            f"top-{shape.top_k}; {form} form, {repairs.records} records",
            f"{len(np.unique(cells.request))} request(s): {int(pre.sum())} prefill cells, "
            f"{int((~pre).sum())} decode cells",
        ] + repairs.lines()
        return ImportResult(meta=meta, cells=cells, summary=summary)

    @staticmethod
    def _map_layers(records: list[VllmRecord], shape: ModelShape, repairs: VllmRepairs) -> None:
        seen = {r.layer for r in records}
        L = shape.num_moe_layers
        decoder_ids = set(shape.moe_layer_ids)
        if max(seen) >= L and seen <= decoder_ids and shape.moe_layer_ids != tuple(range(L)):
            to_moe = {d: i for i, d in enumerate(shape.moe_layer_ids)}
            for r in records:
                r.layer = to_moe[r.layer]
            repairs.layer_ids_were_decoder_layers = True

    @staticmethod
    def _mark_defects(records: list[VllmRecord], shape: ModelShape, repairs: VllmRepairs, src: Path) -> None:
        k, E, L = shape.top_k, shape.num_experts, shape.num_moe_layers
        lengths = Counter(len(r.experts) for r in records)
        common, count = lengths.most_common(1)[0]
        if common != k and count * 2 > len(records):
            raise MoesimError(f"{src}: {count} of {len(records)} cells list {common} experts, but the model config's "
                              f"top_k is {k}; is --model-config the model that was served?")
        for r in records:
            if len(r.experts) != k:
                r.defect = "wrong_k"
            elif r.layer >= L or any(e < 0 or e >= E for e in r.experts):
                r.defect = "out_of_range"
            elif len(set(r.experts)) != k:
                r.defect = "repeated_expert"
            elif len(r.probs) != k or not all(math.isfinite(p) and p >= 0 for p in r.probs):
                r.defect = "bad_weights"

    @staticmethod
    def _align_decode_only(records: list[VllmRecord], num_layers: int, repairs: VllmRepairs) -> None:
        """Decode step of each cell; token_idx = the hook's per-layer counter.

        Each line carries its layer and token_idx, so the lines' order does not decide what is imported:
        a layer whose counter never skipped (it has a cell for every step) is placed at its token_idx
        whatever the order. A layer that lost a cell (the hook drops exact 0.5/0.5 top-2 ties without
        moving its counter) has its later cells one step behind at an unknown point; only the execution
        order of the lines can show where, so when the problem's lines are in execution order (every
        record's token_idx equals its pass minus the passes before it that lack its layer) those cells are
        re-aligned, and otherwise that layer alone is dropped as ambiguous and said so.
        """
        # One cell per (layer, token_idx); of repeated ones keep the same one in any line order.
        best: dict[tuple[int, int], VllmRecord] = {}
        for r in records:
            key = (r.layer, r.index)
            if key not in best or _canonical(r) < _canonical(best[key]):
                best[key] = r
        live: list[VllmRecord] = []
        for r in records:
            if best[(r.layer, r.index)] is r:
                live.append(r)
            else:
                r.defect = r.defect or "duplicate_cell"
        passes: list[list[VllmRecord]] = []
        for r in live:
            if not passes or r.layer <= passes[-1][-1].layer:
                passes.append([])
            passes[-1].append(r)
        missing_before = [0] * num_layers
        consistent = True
        for step, group in enumerate(passes):
            for r in group:
                consistent &= r.layer >= num_layers or r.index == step - missing_before[r.layer]
            present = {r.layer for r in group}
            for layer in range(num_layers):
                missing_before[layer] += layer not in present
        missing = len(passes) * num_layers - len(live)
        if consistent and 2 * missing <= len(live):
            for step, group in enumerate(passes):
                for r in group:
                    r.position = step
            shifted = {r.layer for r in live if r.position != r.index}
            repairs.realigned_token_idx += sum(r.position != r.index for r in live)
            repairs.shifted_layers += len(shifted)
            repairs.missing_cells += missing
            return
        steps = max(r.index for r in live) + 1
        per_layer = Counter(r.layer for r in live)
        for r in live:
            if per_layer[r.layer] == steps or r.layer >= num_layers:
                r.position = r.index
            else:
                r.defect = "unlocatable"
        short = [layer for layer in range(num_layers) if 0 < per_layer.get(layer, 0) < steps]
        if short:
            repairs.dropped_unlocatable_layers += len(short)
            repairs.dropped_unlocatable_cells += sum(per_layer[layer] for layer in short)
        repairs.missing_cells += sum(steps - per_layer.get(layer, 0) for layer in range(num_layers))

    @staticmethod
    def _align_raw(records: list[VllmRecord], num_layers: int, repairs: VllmRepairs) -> None:
        """A pass ends where the layer index stops increasing; the first pass is the prefill."""
        passes: list[list[VllmRecord]] = []
        for r in records:
            prev = passes[-1][-1] if passes else None
            if prev is not None and r.layer == prev.layer and r.index == prev.index:
                r.defect = r.defect or "duplicate_cell"  # a repeated line, not a new pass
                continue
            if prev is None or r.layer < prev.layer or (r.layer == prev.layer and r.index < prev.index):
                passes.append([])
            passes[-1].append(r)
        cursor = 0
        for j, group in enumerate(passes):
            token_pos = sorted({r.index for r in group})
            rank = {p: i for i, p in enumerate(token_pos)}
            for r in group:
                r.position = cursor + rank[r.index]
                r.phase = PREFILL if j == 0 else DECODE
            cursor += len(token_pos)
            repairs.missing_cells += len(token_pos) * num_layers - len(group)

    @staticmethod
    def _cells(records: list[VllmRecord], k: int, repairs: VllmRepairs) -> TraceCells:
        kept: list[VllmRecord] = []
        seen: set[tuple[int, int, int, int]] = set()
        for r in records:
            if r.defect == "unlocatable":
                continue
            if r.defect:
                name = f"dropped_{r.defect}"
                setattr(repairs, name, getattr(repairs, name) + 1)
                continue
            key = (r.request, r.phase, r.position, r.layer)
            if key in seen:
                repairs.dropped_duplicate_cell += 1
                continue
            seen.add(key)
            kept.append(r)
        n = len(kept)
        experts = np.zeros((n, k), dtype=np.int16)
        weights = np.zeros((n, k), dtype=np.float32)
        for i, r in enumerate(kept):
            probs = np.asarray(r.probs, dtype=np.float64)
            order = np.argsort(-probs, kind="stable")
            if not np.array_equal(order, np.arange(k)):
                repairs.reordered_by_weight += 1
            experts[i] = np.asarray(r.experts)[order]
            weights[i] = probs[order]
        cells = TraceCells(
            request=np.array([r.request for r in kept], dtype=np.int32),
            phase=np.array([r.phase for r in kept], dtype=np.uint8),
            position=np.array([r.position for r in kept], dtype=np.int32),
            layer=np.array([r.layer for r in kept], dtype=np.int16),
            experts=experts, weights=weights,
        )
        return cells.take(cells.execution_order()) if n else cells


def _canonical(r: VllmRecord) -> tuple:
    """An order for repeated cells that does not depend on where they sit in the file."""
    return (json.dumps(r.experts), json.dumps(r.probs))


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# ------------------------------------------------------------------------------------------------
# Registry and command
# ------------------------------------------------------------------------------------------------
IMPORTERS: dict[str, Importer] = {
    LlamaRouteCsvImporter.name: LlamaRouteCsvImporter(),
    VllmJsonlImporter.name: VllmJsonlImporter(),
}


def get_importer(fmt: str) -> Importer:
    if fmt not in IMPORTERS:
        raise MoesimError(f"--format '{fmt}': unknown importer format, expected one of {', '.join(IMPORTERS)}")
    return IMPORTERS[fmt]


def import_trace(fmt: str, src: str | Path, options: ImportOptions = ImportOptions()) -> ImportResult:
    """Read ``src`` with the importer ``fmt`` (library entry point; writes nothing)."""
    note_input(src)
    return get_importer(fmt).load(Path(src), options)


def default_out_path(src: Path) -> Path:
    """``qwen.route.csv`` -> ``./qwen.parquet``; ``dump.jsonl`` -> ``./dump.parquet``."""
    name = src.name
    for suffix in (".route.csv", ".jsonl", ".csv", ".json"):
        if name.endswith(suffix):
            return Path(name[: -len(suffix)] + ".parquet")
    return Path(src.stem + ".parquet")


def write_imported(result: ImportResult, out: str | Path) -> Path:
    """Write the trace atomically: nothing appears at ``out`` unless the whole trace was written."""
    with atomic_path(out) as tmp:
        write_trace(tmp, result.meta, result.cells)
    return Path(out)


_HELP = "Convert another engine's routing dump SRC into a moesim trace.\n\n\b\nFormats:\n" + "\n".join(
    f"  {name:<16} {importer.description}" for name, importer in IMPORTERS.items())


@click.command(name="import", help=_HELP)
@click.option("--format", "fmt", default=None, metavar="FORMAT", help=f"One of: {', '.join(IMPORTERS)}.")
@click.argument("src", metavar="SRC")
@out_option("file", "the trace to write (default: ./<SRC name>.parquet).")
@click.option("--model-config", default=None, metavar="NAME_OR_PATH",
              help="Model config: a bundled name or a config.json path. Needed by vllm-jsonl; for "
                   "llama-route-csv it replaces the bundled config matched from the CSV.")
@click.option("--engine-cache-budget", default=None, metavar="SIZE",
              help="llama-route-csv: the engine's expert-cache budget (e.g. 4000MiB); default: the "
                   "cache_budget_MiB of the run's .metrics file beside the CSV.")
@click.option("--dtype", default=None, metavar="DTYPE",
              help="vllm-jsonl: dtype the experts were served at, for expert sizes (default bfloat16).")
def import_command(fmt: Optional[str], src: str, out: Optional[str], model_config: Optional[str],
                   engine_cache_budget: Optional[str], dtype: Optional[str]) -> None:
    if fmt is None:
        raise MoesimError(f"--format is required: one of {', '.join(IMPORTERS)}")
    importer = get_importer(fmt)
    budget = parse_bytes(engine_cache_budget, what="--engine-cache-budget") if engine_cache_budget else None
    if budget is not None and budget <= 0:
        raise MoesimError(f"--engine-cache-budget {engine_cache_budget}: expected a size > 0")
    options = ImportOptions(model_config=model_config, engine_cache_budget=budget, dtype=dtype)
    src_path = Path(src)
    result = importer.load(src_path, options)
    out_path = Path(out) if out else default_out_path(src_path)
    write_imported(result, out_path)
    click.echo(f"{importer.name}: {src_path}")
    for line in result.summary:
        click.echo(f"  {line}")
    click.echo(f"wrote {out_path}: {len(result.cells)} rows")
