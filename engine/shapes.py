"""Which model the engine runs, and the trace fitted to it, so the engine and the simulator replay the
same routing on the same shape.

Model: a checkpoint's config (``--model``), a model config (``--model-config``: bundled name, config.json
or folder), or by default the trace's own model (its metadata's :class:`ModelShape`, rebuilt as a
transformers config). ``--layers N`` keeps the first N decoder layers (embeddings, lm_head and the
layers' attention stay full size). When the trace routes fewer experts per token than the model's
top-k (the bundled traces were run at top-6 / top-2), the model runs at the trace's top-k.

Trace: when the model differs from the trace's model, the trace is remapped and the report says so:

* layers: MoE layer ``l`` of the model replays trace layer ``l`` (the first L' layers) when the trace
  has at least L' layers, else trace layer ``l mod L``;
* experts: ``e -> e mod E'`` in rank order, keeping the first k' distinct ones (a token whose experts
  collide falls back to the smallest unused ids); the next-layer guess is remapped the same way and
  dropped where the next layer is not the trace's next layer;
* requests and decode tokens can be cut (``--requests``, ``--decode-tokens``) to keep runs short.

The fitted trace is an ordinary moesim trace (written beside the report), whose metadata gives the
engine's exact expert bytes, so ``moesim simulate`` on it reproduces the prediction.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from moesim.errors import MoesimError
from moesim.modelspec import ModelShape, load_hf_config, shape_from_config
from moesim.tracer import DECODE, Trace, TraceCells, TraceMeta, TraceSource

_TOP_K_KEYS = ("num_experts_per_tok", "top_k_experts", "moe_topk", "moe_k")


@dataclass
class EngineModelSpec:
    """The model the engine runs: a transformers config (truncated), its shape, and where it came from."""

    config: Any
    shape: ModelShape
    source: str  # "trace", a bundled name, a config path, or a checkpoint folder
    checkpoint: Optional[str]
    notes: tuple[str, ...]


def _text(config):
    return getattr(config, "text_config", None) or config


def resolve_model(trace: Trace, model_config: Optional[str], checkpoint: Optional[str],
                  layers: Optional[int]) -> EngineModelSpec:
    from moesim.engine.model import checkpoint_path, expert_layout_error

    notes: list[str] = []
    if checkpoint is not None:
        path = checkpoint_path(checkpoint)
        config = load_hf_config(path)
        source = str(path)
    elif model_config is not None:
        config = load_hf_config(model_config)
        source = model_config
    else:
        if trace.path is None:
            raise MoesimError("--model-config: the trace has no file, so its model cannot be rebuilt; give a model config")
        from moesim.calib.layers import hf_config_for

        config = hf_config_for(str(trace.path), trace.meta.model)
        source = "trace"
    config = copy.deepcopy(config)
    text = _text(config)
    total = int(text.num_hidden_layers)
    if layers is not None:
        if layers < 1 or layers > total:
            raise MoesimError(f"--layers {layers}: expected 1..{total} (the model has {total} decoder layers)")
        if layers < total:
            text.num_hidden_layers = layers
            if getattr(text, "layer_types", None):
                text.layer_types = list(text.layer_types)[:layers]
            notes.append(f"runs the first {layers} of the model's {total} decoder layers")
    trace_k = trace.meta.top_k
    for key in _TOP_K_KEYS:
        k = getattr(text, key, None)
        if k:
            if trace_k < int(k):
                setattr(text, key, trace_k)
                notes.append(f"runs top-{trace_k} (the trace's routing) instead of the model's top-{k}")
            break
    why = expert_layout_error(config)
    if why is not None:
        raise MoesimError(f"model '{source}' ({getattr(config, 'model_type', '?')}): the engine cannot run it: {why}")
    name = Path(source).name if source != "trace" else trace.meta.model.model_id
    shape = shape_from_config(config, model_id=name)
    if shape.num_moe_layers == 0:
        raise MoesimError(f"--layers {layers}: the first layers of '{source}' have no MoE layer")
    return EngineModelSpec(config, shape, source, checkpoint, tuple(notes))


@dataclass(frozen=True)
class TraceFit:
    """How a trace was fitted to the engine's model (recorded in the report and the fitted trace)."""

    source: str
    source_layers: int
    source_experts: int
    source_top_k: int
    layers: int
    experts: int
    top_k: int
    layer_map: str
    expert_map: str
    requests: int
    prompt_tokens: tuple[int, ...]
    decode_tokens: tuple[int, ...]
    collided_rows: int  # rows where e mod E' merged experts
    filled_slots: int  # expert slots filled with unused ids after a collision

    @property
    def remapped(self) -> bool:
        return self.layer_map != "identity" or self.expert_map != "identity"

    def describe(self) -> str:
        parts = [f"trace {self.source} ({self.source_layers} layers x {self.source_experts} experts, top-"
                 f"{self.source_top_k}) -> model ({self.layers} x {self.experts}, top-{self.top_k})"]
        if self.layer_map != "identity":
            parts.append(f"layers: {self.layer_map}")
        if self.expert_map != "identity":
            parts.append(f"experts: {self.expert_map} ({self.collided_rows} rows had colliding experts, "
                         f"{self.filled_slots} slots filled)")
        parts.append(f"{self.requests} request(s), prompt tokens {list(self.prompt_tokens)}, decode tokens "
                     f"{list(self.decode_tokens)}")
        return "; ".join(parts)


def _request_order(request: np.ndarray) -> list[int]:
    _, first = np.unique(request, return_index=True)
    return [int(request[i]) for i in sorted(first)]


def _map_experts(rows: np.ndarray, E2: int, k2: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """[N, k] expert ids -> [N, k2] in 0..E2-1: mod E2 in rank order, first k2 distinct; (ids, source rank, collided, filled).

    Negative ids (absent guesses) stay absent."""
    n, k = rows.shape
    out = np.full((n, k2), -1, dtype=np.int64)
    rank = np.full((n, k2), -1, dtype=np.int64)
    collided = filled = 0
    for i in range(n):
        seen: list[int] = []
        src: list[int] = []
        merged = False
        for s in range(k):
            e = int(rows[i, s])
            if e < 0:
                continue
            m = e % E2
            if m in seen:
                merged = True
                continue
            if len(seen) < k2:
                seen.append(m)
                src.append(s)
        if merged:
            collided += 1
        if seen and len(seen) < k2:
            spare = (x for x in range(E2) if x not in seen)
            while len(seen) < k2:
                seen.append(next(spare))
                src.append(-1)
                filled += 1
        out[i, : len(seen)] = seen
        rank[i, : len(src)] = src
    return out, rank, collided, filled


def fit_trace(trace: Trace, shape: ModelShape, expert_bytes: int, dtype: str, non_expert_bytes: int,
              requests: Optional[int] = None, decode_tokens: Optional[int] = None,
              source_name: str = "") -> tuple[Trace, TraceFit]:
    """The trace's routing on ``shape`` (see the module docstring), as an in-memory trace."""
    meta = trace.meta
    c = trace.cells
    L, E, k = meta.num_layers, meta.num_experts, meta.top_k
    L2, E2, k2 = shape.num_moe_layers, shape.num_experts, shape.top_k
    if requests is not None and requests < 1:
        raise MoesimError(f"--requests {requests}: expected a positive integer")
    if decode_tokens is not None and decode_tokens < 0:
        raise MoesimError(f"--decode-tokens {decode_tokens}: expected a non-negative integer")
    order = _request_order(c.request)
    keep_req = order[:requests] if requests is not None else order
    mask = np.isin(c.request, np.asarray(keep_req))
    if decode_tokens is not None:
        for r in keep_req:
            dec = (c.request == r) & (c.phase == DECODE)
            positions = np.unique(c.position[dec])
            drop = positions[decode_tokens:]
            if drop.size:
                mask &= ~(dec & np.isin(c.position, drop))
    idx = np.flatnonzero(mask)
    if L >= L2:
        idx = idx[c.layer[idx] < L2]
        new_layer = c.layer[idx].astype(np.int64)
        layer_map = "identity" if L == L2 else f"the trace's first {L2} of {L} MoE layers"
        keep_guess = new_layer < L2 - 1
    else:
        parts, layers_out = [], []
        for l2 in range(L2):
            sel = idx[c.layer[idx] == l2 % L]
            parts.append(sel)
            layers_out.append(np.full(sel.size, l2, dtype=np.int64))
        idx = np.concatenate(parts)
        new_layer = np.concatenate(layers_out)
        layer_map = f"model layer l replays trace layer l mod {L}"
        keep_guess = (new_layer < L2 - 1) & ((new_layer % L) + 1 == (new_layer + 1) % L)
    if idx.size == 0:
        raise MoesimError(f"{source_name or trace.path}: no trace rows left after fitting to the model")
    experts_in = c.experts[idx].astype(np.int64)
    weights_in = c.weights[idx].astype(np.float32)
    if E == E2 and k2 == k:
        experts, rank, collided, filled = experts_in, np.tile(np.arange(k), (idx.size, 1)), 0, 0
        expert_map = "identity"
    else:
        experts, rank, collided, filled = _map_experts(experts_in, E2, k2)
        expert_map = ("identity ids, first %d of %d per token" % (k2, k)) if E == E2 else \
            f"e -> e mod {E2}, first {k2} distinct of the trace's {k} per token"
    weights = np.where(rank >= 0, np.take_along_axis(weights_in, np.maximum(rank, 0), axis=1), 0.0).astype(np.float32)
    guess = None
    if c.next_layer_guess is not None:
        g_in = c.next_layer_guess[idx].astype(np.int64)
        if E == E2 and k2 == k:
            g = g_in.copy()
        else:
            g, _, _, _ = _map_experts(g_in, E2, k2)
            g[(g_in < 0).all(axis=1)] = -1
        g[~keep_guess] = -1
        guess = g.astype(np.int16)
    cells = TraceCells(
        request=c.request[idx].astype(np.int32), phase=c.phase[idx].copy(), position=c.position[idx].copy(),
        layer=new_layer.astype(np.int16), experts=experts.astype(np.int16), weights=weights,
        next_layer_guess=guess, token_id=None if c.token_id is None else c.token_id[idx].copy(),
    )
    cells = cells.take(cells.execution_order())
    prompt, decode = [], []
    for r in keep_req:
        sel = cells.request == r
        prompt.append(int(np.unique(cells.position[sel & (cells.phase != DECODE)]).size))
        decode.append(int(np.unique(cells.position[sel & (cells.phase == DECODE)]).size))
    fit = TraceFit(
        source=source_name or (trace.path.name if trace.path else "trace"), source_layers=L, source_experts=E,
        source_top_k=k, layers=L2, experts=E2, top_k=k2, layer_map=layer_map, expert_map=expert_map,
        requests=len(keep_req), prompt_tokens=tuple(prompt), decode_tokens=tuple(decode),
        collided_rows=int(collided), filled_slots=int(filled),
    )
    src = meta.source
    new_meta = TraceMeta(
        model=shape, dtype=dtype, expert_bytes=tuple([int(expert_bytes)] * L2), non_expert_bytes=int(non_expert_bytes),
        source=TraceSource(kind="import", path=src.path or str(trace.path or ""), sha256=src.sha256,
                           format="moesim-validate-fit", details=dataclasses.asdict(fit)),
    )
    return Trace(meta=new_meta, cells=cells, path=None), fit
