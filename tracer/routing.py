"""A routing model: the structure of MoE routing that matters for expert caching, as a versioned JSON file.

One :class:`PhaseModel` per phase (prefill, decode) holds, for every MoE layer:

- **popularity** (``class_popularity``): the distribution a *fresh* expert is drawn from. It is a mixture
  over ``C`` token classes shared by all layers of a token (``class_prior``): a token's class moves the
  popularity of every layer at once, which is the model's **cross-layer correlation** (expert at layer l
  -> expert at layer l+1). ``C = 1`` is plain per-layer popularity.
- **drift** across requests: a fresh expert is drawn from a Polya urn, with weight ``drift[l] * p_l[e]``
  plus the request's fresh-draw counts of e at this layer, times the token class's tilt
  ``class_popularity[c, l, e] / p_l[e]``. Without classes, integrated out, that is a per-request
  popularity ``Dirichlet(drift[l] * p_l)``: each request drifts from the layer popularity toward its own
  working set (small ``drift``: strong drift, a small working set). ``None``: every token draws from
  the layer popularity alone. A fresh draw skips the experts already in its cell, so it counts as its
  expected shares (each skipped expert its share of the urn, the drawn one the rest: version 7): counted as
  the drawn expert alone, the urn filled with the less popular experts and a long request's reuse sank.
- **temporal locality** (``source``, ``fidelity``, ``copy_rank``): real routing repeats because tokens
  recur (the same or a similar token routes alike at every layer) and because neighbouring tokens share
  context. Each token picks one *source*, an earlier token of its request: the token ``d`` positions back
  with probability ``source[d-1]`` (d = 1..K), a token drawn uniformly from ``K+1 .. far_lag`` back with
  probability ``source[K]`` (recall of an older token), or none. One source serves every layer of the token
  (a share ``source_sharing`` of the layers follows it; each other layer picks a source of its own from the
  same probabilities), so its repeats are correlated across layers as a recurring token's are. At layer l,
  rank j then copies an expert of the source's cell with probability ``fidelity[l, j]`` (which of the
  source's ranks: ``copy_rank[j]``), and otherwise draws a fresh expert. Reuse at lag d is then
  ``source[d-1]`` times the fidelity on top of what popularity and drift give, so reuse at every lag (a
  lag-2 rhythm as much as a lag-1 one), the time between reuses and with it the per-layer and the global
  LRU curve all follow from the same few numbers.
- **phase boundary** (``carry``): how much of the prompt a decode token routes like. A decode token's source
  that lies in the prompt is kept with probability ``carry`` (else the cell draws fresh), and the urn enters
  decode with ``carry`` times its prompt counts. A model whose output routes like its prompt has ``carry``
  near 1; one whose decode routing differs from its prefill routing (the demo model: 90% of decode on two
  experts per layer, prefill spread) near 0, else copies and urn counts of prompt tokens would spread decode
  over the prompt's experts. The first phase of a request has nothing to carry.
- **phase edges** (``edge_popularity``, ``edge_copy``, optional): the positions next to the phase boundary
  route unlike the rest of their phase: a prompt ends on a chat template's tokens, and an answer opens with a
  few set tokens. The demo model on GSM8K: the prompt's last two positions and decode's first six lie 0.17-0.35
  (total variation) from their phase's expert shares, a mid-decode position 0.05
  (``benchmarks/routing_fidelity.py``). A phase's edge is B positions at the boundary: the prefill's last B,
  decode's first B. At edge position b every rank copies an expert of the cell just before it (the position
  before, in either phase) with probability ``edge_copy[b]``, and otherwise draws fresh from
  ``edge_popularity[b]`` (no urn, no token class). An edge position is a source for no token but the edge
  position after it, so the rest of the phase does not continue the template's experts, and its draws do not
  enter the urn. Where decode has an edge, the reuse across the boundary is the edges': its ``carry`` is 0.
  None: no edges (files before version 6, and fits to fewer than 8 requests with a prompt). Switched off with
  the phase boundary.
- **rank structure of a repeat** (``avoid``, optional): at layer l, a token with a source draws its fresh
  experts from outside the source's cell with probability ``avoid[l]``. Copying the source's first choice
  raises the first-choice repetition and, with it, the chance that the two cells share any expert; Mixtral's
  published repetition at layer 31 (first choice 22.7% where popularity alone gives 14-15%, "first or
  second" 50.9% where popularity alone gives 50-54%; ``benchmarks/routing_fidelity.py --only mixtral``)
  needs the rest of the cell to move away. ``None``: no avoidance (every model fitted to a trace here).
- **request groups** (``groups``, optional): requests of one workload need not route alike. MoE-Infinity
  reports 10-30 activation-pattern groups per dataset; the demo model on GSM8K has three locality regimes
  (most requests repeat one token, decode on 2 experts per layer and 99% lag-1 reuse; some spread over 6 at
  44%; a few in between, which the fit puts with the repeating ones), and one set of parameters fitted to
  all of them gives every request their average.
  Each :class:`RequestGroup` holds its own phase models and its share of the requests; a synthetic
  request is drawn into a group (counts as close to the shares as the request count allows) and routed by
  that group's models. The top-level ``decode`` / ``prefill`` are the fit to all requests together, used
  when groups are switched off and by files without groups.
- **routing weights** (``weights``): the sum of a cell's k weights ~ Normal(mean, std) (clipped > 0),
  and their shares ~ Dirichlet(alpha) sorted high to low, by rank.

Every part can be switched off for synthesis (:data:`PARTS`); turning off all of them gives uniform
random routing, turning off all but popularity gives the popularity-only baseline.

Requests are independent given their drift. ``tracer/routing_fit.py`` fits a model to traces,
``tracer/synth.py`` samples traces from one.
"""

from __future__ import annotations

import dataclasses
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
from moesim.tracer.format import check_byte_counts

ROUTING_SCHEMA = "moesim.routing"
# 7: the urn counts a fresh draw by its expected shares (same fields; drift fitted under the new counting);
# 6: phase edges; 5: request groups; 4: the rank structure of a repeat (avoid); 3: the phase boundary (carry)
ROUTING_VERSION = 7
# older files are newer ones without the later optional parts; a file before 7 has its drift fitted to the
# old urn, which flattened a request's routing as it went: it synthesizes a little more reuse now
READABLE_VERSIONS = (3, 4, 5, 6, 7)
PARTS = ("popularity", "drift", "locality", "cross-layer", "phase-boundary", "request-groups", "weights")
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
    source: np.ndarray  # float [K+1]: a token's source is d = 1..K back, or (last) uniform in K+1..far_lag back
    far_lag: int  # the oldest token a recall reaches back to
    fidelity: np.ndarray  # float [L, k]: rank j at layer l copies from the source's cell with this probability
    copy_rank: np.ndarray  # float [k, k]: row j, which rank of the source's cell rank j copies (rows sum to 1)
    weights: WeightModel
    drift: Optional[np.ndarray] = None  # float [L] Polya-urn (Dirichlet) concentration, or None (no drift)
    source_sharing: float = 1.0  # share of layers that follow the token's source (the rest pick their own)
    carry: float = 1.0  # chance a source in the previous phase is kept; share of the urn counts carried over
    avoid: Optional[np.ndarray] = None  # float [L]: chance that fresh draws keep out of the source's cell
    edge_popularity: Optional[np.ndarray] = None  # float [B, L, E]: fresh-draw weights at the B edge positions
    edge_copy: Optional[np.ndarray] = None  # float [B]: chance a rank at edge position b copies the cell before

    @property
    def num_classes(self) -> int:
        return int(self.class_prior.shape[0])

    @property
    def edge_positions(self) -> int:
        return 0 if self.edge_popularity is None else int(self.edge_popularity.shape[0])

    @property
    def lags(self) -> int:
        return int(self.source.shape[0]) - 1

    def popularity(self) -> np.ndarray:
        """A fresh draw's weights [L, E], classes mixed by their prior (draws are without replacement within a
        cell, so a top-k cell's expert shares are flatter than these: ``routing_fit.draw_weights``)."""
        return np.einsum("c,cle->le", self.class_prior, self.class_popularity)


def edge_positions(phases) -> tuple[int, int]:
    """(the prompt's edge positions, decode's) of a RoutingModel or a RequestGroup."""
    return phases.phase("prefill").edge_positions, phases.phase("decode").edge_positions


def phase_of(decode: PhaseModel, prefill: Optional[PhaseModel], name: str) -> PhaseModel:
    """The phase model that routes phase ``name``: prefill routes like decode where it has none of its own,
    but without decode's edge (decode's first positions are not the prompt's last)."""
    if name == "prefill" and prefill is not None:
        return prefill
    if name == "prefill" and decode.edge_popularity is not None:
        return dataclasses.replace(decode, edge_popularity=None, edge_copy=None)
    return decode


@dataclass(frozen=True)
class RequestGroup:
    """Requests that route alike: their share of a workload's requests and their own phase models."""

    share: float
    decode: PhaseModel
    prefill: Optional[PhaseModel]  # None: prefill routes like this group's decode
    fitted_requests: int  # how many of the fitting requests fell in this group

    def phase(self, name: str) -> PhaseModel:
        return phase_of(self.decode, self.prefill, name)


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
    groups: tuple[RequestGroup, ...] = ()  # empty: every request routes by decode / prefill

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
        return phase_of(self.decode, self.prefill, name)


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
        "source": _round(p.source),
        "far_lag": int(p.far_lag),
        "source_sharing": round(float(p.source_sharing), 6),
        "carry": round(float(p.carry), 6),
        "avoid": None if p.avoid is None else _round(p.avoid, 6),
        "edge_popularity": None if p.edge_popularity is None else _round(p.edge_popularity),
        "edge_copy": None if p.edge_copy is None else _round(p.edge_copy, 6),
        "fidelity": _round(p.fidelity),
        "copy_rank": _round(p.copy_rank),
        "weights": {"sum_mean": _round(p.weights.sum_mean, 6), "sum_std": _round(p.weights.sum_std, 6),
                    "share_alpha": _round(p.weights.share_alpha, 5)},
    }


def _phases_to_dict(decode: PhaseModel, prefill: Optional[PhaseModel]) -> dict[str, Any]:
    return {"decode": _phase_to_dict(decode), "prefill": None if prefill is None else _phase_to_dict(prefill)}


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
        "phases": _phases_to_dict(m.decode, m.prefill),
        "request_groups": [{"share": round(float(g.share), 7), "fitted_requests": int(g.fitted_requests),
                            "phases": _phases_to_dict(g.decode, g.prefill)} for g in m.groups] or None,
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
    src = np.asarray(d.get("source", []), dtype=np.float64)
    if src.ndim != 1 or src.size < 2:
        raise MoesimError(f"{where}: field 'source' must list the source probability of lags 1..K and a far one")
    src = _array(d, "source", (src.size,), where)
    if src.sum() > 1 + 1e-6:
        raise MoesimError(f"{where}: field 'source' sums to more than 1")
    far_lag = d.get("far_lag")
    if not isinstance(far_lag, int) or isinstance(far_lag, bool) or far_lag < src.size:
        raise MoesimError(f"{where}: field 'far_lag' must be an integer of at least {src.size} (K + 1)")
    shared = d.get("source_sharing")
    if isinstance(shared, bool) or not isinstance(shared, (int, float)) or not 0 <= shared <= 1:
        raise MoesimError(f"{where}: field 'source_sharing' must be a number in [0, 1]")
    carry = d.get("carry")
    if isinstance(carry, bool) or not isinstance(carry, (int, float)) or not 0 <= carry <= 1:
        raise MoesimError(f"{where}: field 'carry' must be a number in [0, 1]")
    fidelity = _array(d, "fidelity", (L, k), where)
    if (fidelity > 1 + 1e-9).any():
        raise MoesimError(f"{where}: field 'fidelity' has probabilities above 1")
    copy_rank = _array(d, "copy_rank", (k, k), where)
    if not np.allclose(copy_rank.sum(axis=1), 1.0, atol=1e-4):
        raise MoesimError(f"{where}: field 'copy_rank' rows must each sum to 1")
    if not np.allclose(pop.sum(axis=2), 1.0, atol=1e-4):
        raise MoesimError(f"{where}: field 'class_popularity' rows must each sum to 1")
    w = d.get("weights")
    if not isinstance(w, dict):
        raise MoesimError(f"{where}: missing field 'weights'")
    weights = WeightModel(sum_mean=_array(w, "sum_mean", (L,), f"{where}.weights"),
                          sum_std=_array(w, "sum_std", (L,), f"{where}.weights"),
                          share_alpha=_array(w, "share_alpha", (L, k), f"{where}.weights"))
    drift = None if d.get("drift") is None else _array(d, "drift", (L,), where)
    avoid = None if d.get("avoid") is None else _array(d, "avoid", (L,), where)
    if avoid is not None and (avoid > 1 + 1e-9).any():
        raise MoesimError(f"{where}: field 'avoid' has probabilities above 1")
    edge_popularity, edge_copy = _edges_from_dict(d, L, E, where)
    return PhaseModel(class_prior=prior / prior.sum(), class_popularity=pop, source=src, far_lag=far_lag,
                      fidelity=fidelity, copy_rank=copy_rank, weights=weights, drift=drift,
                      source_sharing=float(shared), carry=float(carry), avoid=avoid,
                      edge_popularity=edge_popularity, edge_copy=edge_copy)


def _edges_from_dict(d: dict, L: int, E: int, where: str):
    """(edge_popularity, edge_copy), both None where the file has no phase edges."""
    if (d.get("edge_popularity") is None) != (d.get("edge_copy") is None):
        raise MoesimError(f"{where}: fields 'edge_popularity' and 'edge_copy' come together (both or neither)")
    if d.get("edge_copy") is None:
        return None, None
    copy = np.asarray(d["edge_copy"], dtype=object)
    B = int(copy.shape[0]) if copy.ndim == 1 else 0
    if B < 1:
        raise MoesimError(f"{where}: field 'edge_copy' must be a non-empty list")
    copy = _array(d, "edge_copy", (B,), where)
    if (copy > 1 + 1e-9).any():
        raise MoesimError(f"{where}: field 'edge_copy' has probabilities above 1")
    pop = _array(d, "edge_popularity", (B, L, E), where)
    if not np.allclose(pop.sum(axis=2), 1.0, atol=1e-4):
        raise MoesimError(f"{where}: field 'edge_popularity' rows must each sum to 1")
    return pop, copy


def routing_from_json(text: str, where: str) -> RoutingModel:
    try:
        d = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MoesimError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(d, dict) or d.get("schema") != ROUTING_SCHEMA:
        raise MoesimError(f"{where}: not a moesim routing file (field 'schema' is not '{ROUTING_SCHEMA}')")
    if d.get("version") not in READABLE_VERSIONS:
        raise MoesimError(f"{where}: routing file version {d.get('version')!r}, this moesim reads versions "
                          f"{', '.join(map(str, READABLE_VERSIONS))}; refit it with `moesim trace fit`")
    for key in ("name", "model", "dtype", "expert_bytes", "non_expert_bytes", "phases", "fitted_to"):
        if key not in d:
            raise MoesimError(f"{where}: missing field '{key}'")
    model = ModelShape.from_dict(d["model"], where=f"{where}: field 'model'")
    L, E, k = model.num_moe_layers, model.num_experts, model.top_k
    check_byte_counts(d["expert_bytes"], d["non_expert_bytes"], L, f"{where}:")
    decode, prefill = _phases_from_dict(d["phases"], L, E, k, f"{where}: phases")
    return RoutingModel(name=str(d["name"]), model=model, dtype=str(d["dtype"]),
                        expert_bytes=tuple(int(x) for x in d["expert_bytes"]),
                        non_expert_bytes=int(d["non_expert_bytes"]), decode=decode, prefill=prefill,
                        fitted_to=d["fitted_to"], created=str(d.get("created", "")), version=int(d["version"]),
                        groups=_groups_from_dict(d.get("request_groups"), L, E, k, where))


def _phases_from_dict(phases: Any, L: int, E: int, k: int, where: str):
    if not isinstance(phases, dict) or "decode" not in phases:
        raise MoesimError(f"{where}: expected an object holding 'decode' (and optionally 'prefill')")
    decode = _phase_from_dict(phases["decode"], L, E, k, f"{where}.decode")
    prefill = None
    if phases.get("prefill") is not None:
        prefill = _phase_from_dict(phases["prefill"], L, E, k, f"{where}.prefill")
    return decode, prefill


def _groups_from_dict(groups: Any, L: int, E: int, k: int, where: str) -> tuple[RequestGroup, ...]:
    if groups is None:
        return ()
    if not isinstance(groups, list) or not groups:
        raise MoesimError(f"{where}: field 'request_groups' must be a non-empty list or null")
    out = []
    for i, g in enumerate(groups):
        at = f"{where}: request_groups[{i}]"
        if not isinstance(g, dict):
            raise MoesimError(f"{at}: expected an object")
        share, fitted = g.get("share"), g.get("fitted_requests")
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise MoesimError(f"{at}: field 'share' must be a number in (0, 1]")
        if isinstance(fitted, bool) or not isinstance(fitted, int) or fitted < 0:
            raise MoesimError(f"{at}: field 'fitted_requests' must be a non-negative integer")
        decode, prefill = _phases_from_dict(g.get("phases"), L, E, k, f"{at}.phases")
        out.append(RequestGroup(share=float(share), decode=decode, prefill=prefill, fitted_requests=fitted))
    total = sum(g.share for g in out)
    if abs(total - 1.0) > 1e-4:
        raise MoesimError(f"{where}: the request groups' shares sum to {total:.6f}, expected 1")
    return tuple(out)


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


UNIFORM = "uniform"  # the routing name of :func:`uniform_routing`, for any model config


def uniform_routing(shape: ModelShape) -> RoutingModel:
    """Routing with no structure, for a model nobody has traced: each cell's k experts drawn uniformly without
    replacement, equal weights; no popularity, locality, drift or cross-layer correlation. Only the number of
    experts per token is real. Right for placements that do not care which experts a token picks (whole layers
    on the CPU: llama.cpp's ``--cpu-moe``, KTransformers), a lower bound on the reuse a cache would see."""
    L, E, k = shape.num_moe_layers, shape.num_experts, shape.top_k
    phase = PhaseModel(
        class_prior=np.ones(1), class_popularity=np.full((1, L, E), 1.0 / E), source=np.array([0.0, 1.0]),
        far_lag=1, fidelity=np.zeros((L, k)), copy_rank=np.eye(k),
        weights=WeightModel(sum_mean=np.ones(L), sum_std=np.zeros(L), share_alpha=np.ones((L, k))))
    return RoutingModel(name=UNIFORM, model=shape, dtype="bfloat16",
                        expert_bytes=tuple([shape.expert_bytes()] * L), non_expert_bytes=shape.non_expert_bytes(),
                        decode=phase, prefill=None,
                        fitted_to={"kind": UNIFORM, "note": "fitted to nothing: uniform top-k without replacement"})


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
    from moesim.atomic import note_input

    path = resolve_routing(str(name_or_path))
    note_input(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MoesimError(f"{path}: cannot read the routing file ({exc})") from None
    return routing_from_json(text, where=str(path))
