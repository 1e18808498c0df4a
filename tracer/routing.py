"""A routing model: the structure of MoE routing that matters for expert caching, as a versioned JSON file.

One :class:`PhaseModel` per phase (prefill, decode) holds, for every MoE layer:

- **popularity** (``class_popularity``): the distribution a *fresh* expert is drawn from. It is a mixture
  over ``C`` token classes shared by all layers of a token (``class_prior``): a token's class moves the
  popularity of every layer at once, which is the model's **cross-layer correlation** (expert at layer l
  -> expert at layer l+1). ``C = 1`` is plain per-layer popularity.
- **drift** across requests: a fresh expert is drawn from a Polya urn, with weight ``drift[l] * p_l[e]``
  plus the times e was already used at this layer in the request, times the token class's tilt
  ``class_popularity[c, l, e] / p_l[e]``. Without classes, integrated out, that is a per-request
  popularity ``Dirichlet(drift[l] * p_l)``: each request drifts from the layer popularity toward its own
  working set (small ``drift``: strong drift, a small working set). ``None``: every token draws from
  the layer popularity alone.
- **temporal locality** (``copy``): the k experts of a cell are chosen in rank order; rank j *copies* the
  expert at depth d of the layer's recency stack (depth 0 = the most recently used expert, before this
  cell; the previous token's rank k-1) with probability ``copy[l, j, d]``, and otherwise draws a fresh
  expert. Depth d is exactly the LRU stack distance of ``tracer/stats.py``, so the copy probabilities
  control the reuse of every lag and the LRU curve at every capacity, not only reuse at t-1. Depths are
  stored in buckets (``depth_edges``); inside a bucket the depth is drawn in proportion to the uses, so far
  in the request, of the expert there (+0.5), so a request keeps returning to its own working set.
- **routing weights** (``weights``): the sum of a cell's k weights ~ Normal(mean, std) (clipped > 0),
  and their shares ~ Dirichlet(alpha) sorted high to low, by rank.

Every part can be switched off for synthesis (:data:`PARTS`); turning off all of them gives uniform
random routing, turning off all but popularity gives the popularity-only baseline.

The recency stack is per (request, layer): a request starts from a stack in popularity order, so
requests are independent given their drift. ``tracer/routing_fit.py`` fits a model to traces,
``tracer/synth.py`` samples traces from one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import numpy as np

from moesim.atomic import write_text_atomic
from moesim.errors import MoesimError
from moesim.modelspec import ModelShape

ROUTING_SCHEMA = "moesim.routing"
ROUTING_VERSION = 1
PARTS = ("popularity", "drift", "locality", "cross-layer", "weights")
PHASE_NAMES = ("prefill", "decode")


@dataclass(frozen=True)
class WeightModel:
    """Routing weights of a cell, per layer: total ~ Normal(sum_mean, sum_std), shares ~ sorted Dirichlet."""

    sum_mean: np.ndarray  # float [L]
    sum_std: np.ndarray  # float [L]
    share_alpha: np.ndarray  # float [L, k] Dirichlet concentration of the shares, rank order (largest first)


@dataclass(frozen=True)
class PhaseModel:
    class_prior: np.ndarray  # float [C]
    class_popularity: np.ndarray  # float [C, L, E], each [c, l] sums to 1
    depth_edges: np.ndarray  # int [B+1], bucket b holds depths depth_edges[b] .. depth_edges[b+1]-1
    copy: np.ndarray  # float [L, k, B] probability that rank j copies from depth bucket b
    weights: WeightModel
    drift: Optional[np.ndarray] = None  # float [L] Polya-urn (Dirichlet) concentration, or None (no drift)

    @property
    def num_classes(self) -> int:
        return int(self.class_prior.shape[0])

    def popularity(self) -> np.ndarray:
        """Marginal popularity [L, E] (classes mixed by their prior)."""
        return np.einsum("c,cle->le", self.class_prior, self.class_popularity)

    def copy_per_depth(self) -> np.ndarray:
        """copy[l, j, d] for every depth 0..E-1 (bucket mass spread evenly; the generator then redraws the depth
        inside the bucket by the uses of the experts there)."""
        edges = self.depth_edges
        width = np.diff(edges).astype(np.float64)
        per = np.repeat(self.copy / width, np.diff(edges), axis=2)
        return per


@dataclass(frozen=True)
class RoutingModel:
    name: str
    model: ModelShape  # the model shape the routing belongs to (layers, experts, top-k as routed)
    dtype: str  # the dtype synthetic traces are labelled with, with expert_bytes / non_expert_bytes
    expert_bytes: tuple[int, ...]
    non_expert_bytes: int
    decode: PhaseModel
    prefill: Optional[PhaseModel]  # None: prefill routes like decode
    fitted_to: dict[str, Any]  # what the parameters were fitted to, and how
    created: str = ""
    version: int = ROUTING_VERSION

    @property
    def num_layers(self) -> int:
        return self.model.num_moe_layers

    @property
    def num_experts(self) -> int:
        return self.model.num_experts

    @property
    def top_k(self) -> int:
        return self.model.top_k

    def phase(self, name: str) -> PhaseModel:
        if name == "prefill" and self.prefill is not None:
            return self.prefill
        return self.decode


# ------------------------------------------------------------------------------------------------
# JSON
# ------------------------------------------------------------------------------------------------
def _round(a: np.ndarray, digits: int = 7) -> list:
    return np.round(np.asarray(a, dtype=np.float64), digits).tolist()


def _phase_to_dict(p: PhaseModel) -> dict[str, Any]:
    return {
        "class_prior": _round(p.class_prior),
        "class_popularity": _round(p.class_popularity),
        "drift": None if p.drift is None else _round(p.drift, 4),
        "depth_edges": [int(x) for x in p.depth_edges],
        "copy": _round(p.copy),
        "weights": {"sum_mean": _round(p.weights.sum_mean, 6), "sum_std": _round(p.weights.sum_std, 6),
                    "share_alpha": _round(p.weights.share_alpha, 5)},
    }


def routing_to_json(m: RoutingModel) -> str:
    d = {
        "schema": ROUTING_SCHEMA,
        "version": m.version,
        "name": m.name,
        "created": m.created,
        "model": m.model.to_dict(),
        "dtype": m.dtype,
        "expert_bytes": list(m.expert_bytes),
        "non_expert_bytes": int(m.non_expert_bytes),
        "fitted_to": m.fitted_to,
        "phases": {"decode": _phase_to_dict(m.decode),
                   "prefill": None if m.prefill is None else _phase_to_dict(m.prefill)},
    }
    return json.dumps(d, indent=1, sort_keys=False) + "\n"


def _array(d: dict, key: str, shape: tuple[int, ...], where: str, dtype=np.float64) -> np.ndarray:
    if key not in d:
        raise MoesimError(f"{where}: missing field '{key}'")
    try:
        a = np.asarray(d[key], dtype=dtype)
    except (TypeError, ValueError):
        raise MoesimError(f"{where}: field '{key}' is not a numeric array") from None
    if a.shape != shape:
        raise MoesimError(f"{where}: field '{key}' has shape {list(a.shape)}, expected {list(shape)}")
    if not np.all(np.isfinite(a)) or (a < 0).any():
        raise MoesimError(f"{where}: field '{key}' has negative or non-finite values")
    return a


def _phase_from_dict(d: Any, L: int, E: int, k: int, where: str) -> PhaseModel:
    if not isinstance(d, dict):
        raise MoesimError(f"{where}: expected an object")
    prior = np.asarray(d.get("class_prior", []), dtype=np.float64)
    C = int(prior.shape[0]) if prior.ndim == 1 else 0
    if C < 1:
        raise MoesimError(f"{where}: field 'class_prior' must be a non-empty list")
    prior = _array(d, "class_prior", (C,), where)
    pop = _array(d, "class_popularity", (C, L, E), where)
    edges = np.asarray(d.get("depth_edges", []), dtype=np.int64)
    if edges.ndim != 1 or edges.size < 2 or edges[0] != 0 or edges[-1] != E or (np.diff(edges) <= 0).any():
        raise MoesimError(f"{where}: field 'depth_edges' must rise from 0 to num_experts={E}")
    copy = _array(d, "copy", (L, k, edges.size - 1), where)
    if (copy.sum(axis=2) > 1 + 1e-6).any():
        raise MoesimError(f"{where}: field 'copy' sums to more than 1 for some layer and rank")
    if not np.allclose(pop.sum(axis=2), 1.0, atol=1e-4):
        raise MoesimError(f"{where}: field 'class_popularity' rows must each sum to 1")
    w = d.get("weights")
    if not isinstance(w, dict):
        raise MoesimError(f"{where}: missing field 'weights'")
    weights = WeightModel(sum_mean=_array(w, "sum_mean", (L,), f"{where}.weights"),
                          sum_std=_array(w, "sum_std", (L,), f"{where}.weights"),
                          share_alpha=_array(w, "share_alpha", (L, k), f"{where}.weights"))
    drift = None if d.get("drift") is None else _array(d, "drift", (L,), where)
    return PhaseModel(class_prior=prior / prior.sum(), class_popularity=pop, depth_edges=edges, copy=copy,
                      weights=weights, drift=drift)


def routing_from_json(text: str, where: str) -> RoutingModel:
    try:
        d = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MoesimError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(d, dict) or d.get("schema") != ROUTING_SCHEMA:
        raise MoesimError(f"{where}: not a moesim routing file (field 'schema' is not '{ROUTING_SCHEMA}')")
    if d.get("version") != ROUTING_VERSION:
        raise MoesimError(f"{where}: routing file version {d.get('version')!r}, this moesim reads version "
                          f"{ROUTING_VERSION}; refit it with `moesim trace fit`")
    for key in ("name", "model", "dtype", "expert_bytes", "non_expert_bytes", "phases", "fitted_to"):
        if key not in d:
            raise MoesimError(f"{where}: missing field '{key}'")
    model = ModelShape.from_dict(d["model"], where=f"{where}: field 'model'")
    L, E, k = model.num_moe_layers, model.num_experts, model.top_k
    if len(d["expert_bytes"]) != L:
        raise MoesimError(f"{where}: field 'expert_bytes' has {len(d['expert_bytes'])} entries, expected {L}")
    phases = d["phases"]
    if not isinstance(phases, dict) or "decode" not in phases:
        raise MoesimError(f"{where}: field 'phases' must hold 'decode' (and optionally 'prefill')")
    decode = _phase_from_dict(phases["decode"], L, E, k, f"{where}: phases.decode")
    prefill = None
    if phases.get("prefill") is not None:
        prefill = _phase_from_dict(phases["prefill"], L, E, k, f"{where}: phases.prefill")
    return RoutingModel(name=str(d["name"]), model=model, dtype=str(d["dtype"]),
                        expert_bytes=tuple(int(x) for x in d["expert_bytes"]),
                        non_expert_bytes=int(d["non_expert_bytes"]), decode=decode, prefill=prefill,
                        fitted_to=d["fitted_to"], created=str(d.get("created", "")), version=int(d["version"]))


def write_routing(path: str | os.PathLike, m: RoutingModel) -> Path:
    return write_text_atomic(path, routing_to_json(m))


# ------------------------------------------------------------------------------------------------
# Bundled routing models
# ------------------------------------------------------------------------------------------------
def bundled_routing() -> dict[str, Path]:
    """Bundled routing models by name (file stem), from ``traces/routing/``."""
    root = resources.files("moesim.traces").joinpath("routing")
    if not root.is_dir():
        return {}
    return {p.name[: -len(".json")]: Path(str(p)) for p in root.iterdir() if p.name.endswith(".json")}


def resolve_routing(name_or_path: str) -> Path:
    bundled = bundled_routing()
    if name_or_path in bundled:
        return bundled[name_or_path]
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        raise MoesimError(f"--routing {name_or_path}: is a folder, expected a routing .json file")
    raise MoesimError(f"--routing {name_or_path}: not a file and not a bundled routing model "
                      f"({', '.join(sorted(bundled)) or 'none bundled'})")


def read_routing(name_or_path: str | os.PathLike) -> RoutingModel:
    path = resolve_routing(str(name_or_path))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MoesimError(f"{path}: cannot read the routing file ({exc})") from None
    return routing_from_json(text, where=str(path))


def default_depth_edges(num_experts: int, top_k: int) -> np.ndarray:
    """Each depth up to 2k on its own (where reuse of the last tokens lives), then doubling buckets."""
    edges = list(range(0, min(2 * top_k, num_experts) + 1))
    while edges[-1] < num_experts:
        edges.append(min(num_experts, 2 * edges[-1]))
    return np.asarray(edges, dtype=np.int64)

