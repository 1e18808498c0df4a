"""Gating changes applied to a loaded model's routers: a top-k override and AdapMoE adaptive gating.

AdapMoE (Zhong et al., ICCAD'24; PKU-SEC-Lab/AdapMoE) drops a token's second expert when its normalized
top-2 weight is below a threshold and renormalizes, so the first expert gets weight 1. Its released code
sets the threshold two ways, both offered here:

* naive (``benchmarks/run_acc_benchmark.py`` without ``--hessian``): the same threshold ``t`` in every layer;
* sensitivity-scaled (``run.py --adapgate``, and the benchmark with ``--hessian``): layer ``l`` uses
  ``sqrt(t / s_l)`` with per-layer sensitivities ``s_l`` hard-coded for Mixtral-8x7B (32 layers) and
  Mixtral-8x22B (56 layers), bundled below. Other models need their own values in a JSON file, or
  ``adapmoe-loglinear``: Mixtral-8x7B's profile stretched over the model's depth (log-linear from its
  first to its last layer's value), the approximation moesim's simulator uses (``simulator/gating.py``);
  it is moesim's, not AdapMoE's.

The released runtime applies it only to one-token decode steps; its accuracy benchmark applies it to every
token, which is what a teacher-forced perplexity run does here. Both are per-token decisions, so a
token's gating is the same either way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from moesim.errors import MoesimError
from moesim.quality.moe import MoELayer

# Per-layer sensitivities from PKU-SEC-Lab/AdapMoE benchmarks/run_acc_benchmark.py (``weight``).
ADAPMOE_SENSITIVITIES: dict[str, tuple[float, ...]] = {
    "mixtral-8x7b": (
        46.69189453125, 17.303466796875, 13.0157470703125, 7.640838623046875, 4.169464111328125,
        2.2296905517578125, 1.2559890747070312, 0.8444786071777344, 0.6837844848632812, 0.5602836608886719,
        0.5125999450683594, 0.4780292510986328, 0.44536590576171875, 0.4355907440185547, 0.38361549377441406,
        0.30994415283203125, 0.23305416107177734, 0.1760721206665039, 0.13840198516845703, 0.1137852668762207,
        0.10472536087036133, 0.09542703628540039, 0.08624792098999023, 0.07712841033935547,
        0.06937980651855469, 0.06109476089477539, 0.0502467155456543, 0.042557716369628906,
        0.03349781036376953, 0.025272369384765625, 0.020682811737060547, 0.02294778823852539,
    ),
    "mixtral-8x22b": (
        61.74471229314804, 30.827676877379417, 22.530393674969673, 18.11552420258522, 15.121695585548878,
        12.262344360351562, 7.301234174519777, 4.385834559798241, 3.1670755706727505, 2.321721287444234,
        1.8764339620247483, 1.5008790651336312, 1.2718226062133908, 1.1100198607891798, 0.9757113293744624,
        0.8827666169963777, 0.8224676712416112, 0.7467870600521564, 0.6462281453423202, 0.6080560269765556,
        0.5719724576920271, 0.501688162330538, 0.48486964078620076, 0.4674123483709991, 0.4506474651861936,
        0.4441085911821574, 0.4265871539246291, 0.4034294106531888, 0.3986935189459473, 0.3823837323579937,
        0.3598774201236665, 0.34665799466893077, 0.33294674358330667, 0.32827918766997755,
        0.31803123420104384, 0.3047495265491307, 0.2975378301925957, 0.28540310449898243,
        0.27299695648252964, 0.25855901185423136, 0.24315925838891417, 0.2291009877808392,
        0.21316581114660949, 0.19911023264285177, 0.1838320167735219, 0.17445572302676737,
        0.1652784994803369, 0.15212985454127192, 0.14296766312327236, 0.12592993152793497,
        0.10483352525625378, 0.085503859736491, 0.07232583448057994, 0.06392712384695187,
        0.05674008571077138, 0.08505595178576186,
    ),
}


LOGLINEAR = "adapmoe-loglinear"


@dataclass(frozen=True)
class Sensitivities:
    """Per-MoE-layer sensitivities for AdapMoE's scaled thresholds; ``name`` is what the table records."""

    name: str  # a bundled name, "adapmoe-loglinear", or "file:<sha256 prefix>"
    values: tuple[float, ...]  # per layer; for adapmoe-loglinear the two end points to stretch

    def for_layers(self, num_layers: int) -> tuple[float, ...]:
        if self.name == LOGLINEAR:
            first, last = math.log(self.values[0]), math.log(self.values[-1])
            if num_layers == 1:
                return (self.values[0],)
            return tuple(math.exp(first + (last - first) * i / (num_layers - 1)) for i in range(num_layers))
        if len(self.values) != num_layers:
            raise MoesimError(
                f"--gating-sensitivity {self.name}: has {len(self.values)} layers, the model has "
                f"{num_layers} MoE layers"
            )
        return self.values


def load_sensitivities(spec: str) -> Sensitivities | None:
    """'' or 'none' -> None (naive thresholds); a bundled name; adapmoe-loglinear; or a JSON list file."""
    if spec in ("", "none"):
        return None
    if spec in ADAPMOE_SENSITIVITIES:
        return Sensitivities(spec, ADAPMOE_SENSITIVITIES[spec])
    if spec == LOGLINEAR:
        profile = ADAPMOE_SENSITIVITIES["mixtral-8x7b"]
        return Sensitivities(LOGLINEAR, (profile[0], profile[-1]))
    path = Path(spec)
    if not path.is_file():
        names = ", ".join(["none", *ADAPMOE_SENSITIVITIES, LOGLINEAR])
        raise MoesimError(f"--gating-sensitivity {spec}: not a file and not one of {names}")
    raw = path.read_bytes()
    try:
        values = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MoesimError(f"{path}: expected a JSON list of per-layer sensitivities") from None
    if not isinstance(values, list) or not values or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values
    ):
        raise MoesimError(f"{path}: expected a JSON list of positive per-layer sensitivities")
    return Sensitivities(f"file:{hashlib.sha256(raw).hexdigest()[:16]}", tuple(float(v) for v in values))


@dataclass(frozen=True)
class GatingSetting:
    """How routing is changed; the default changes nothing."""

    top_k: int | None = None  # None: the model's own top-k
    threshold: float = 0.0  # AdapMoE threshold t; 0 turns adaptive gating off
    sensitivities: Sensitivities | None = None  # None: naive (t used as is in every layer)

    @property
    def sensitivity_name(self) -> str:
        return self.sensitivities.name if (self.sensitivities and self.threshold > 0) else ""

    def layer_thresholds(self, num_layers: int) -> list[float]:
        if self.threshold <= 0:
            return [0.0] * num_layers
        if self.sensitivities is None:
            return [self.threshold] * num_layers
        return [math.sqrt(self.threshold / s) for s in self.sensitivities.for_layers(num_layers)]


class ExpertUsage:
    """Counts the experts each token actually uses (non-zero weight) per MoE layer, after gating."""

    def __init__(self, num_layers: int):
        self.token_rows = [0] * num_layers
        self.expert_uses = [0] * num_layers

    def add(self, layer: int, scores: torch.Tensor) -> None:
        self.token_rows[layer] += int(scores.shape[0])
        self.expert_uses[layer] += int((scores > 0).sum())

    @property
    def experts_per_token(self) -> float:
        rows = sum(self.token_rows)
        return sum(self.expert_uses) / rows if rows else 0.0

    def per_layer(self) -> list[float]:
        return [u / r if r else 0.0 for u, r in zip(self.expert_uses, self.token_rows)]


def _adaptive_drop(scores: torch.Tensor, threshold: float, renormalize: bool) -> torch.Tensor:
    normalized = scores / scores.sum(dim=-1, keepdim=True)
    drop = normalized[:, 1] < threshold
    if not bool(drop.any()):
        return scores
    scores = scores.clone()
    scores[:, 1] = torch.where(drop, torch.zeros_like(scores[:, 1]), scores[:, 1])
    if renormalize:
        scores = scores / scores.sum(dim=-1, keepdim=True)
    return scores


@contextlib.contextmanager
def applied_gating(
    layers: list[MoELayer], setting: GatingSetting, usage: ExpertUsage | None = None, observers=()
) -> Iterator[None]:
    """Apply ``setting`` to the routers while inside; ``usage`` counts experts used, ``observers`` get
    ``(moe_index, router_logits, scores, indices)`` after gating (for routing statistics)."""
    thresholds = setting.layer_thresholds(len(layers))
    saved_top_k = []
    handles = []
    try:
        for layer, threshold in zip(layers, thresholds):
            num_experts = layer.num_experts
            top_k = setting.top_k if setting.top_k is not None else layer.top_k
            if not 1 <= top_k <= num_experts:
                raise MoesimError(f"--top-k {top_k}: expected 1..{num_experts} (experts per layer)")
            if threshold > 0 and top_k != 2:
                raise MoesimError(
                    f"--adaptive-gating: AdapMoE drops the second of two experts; needs top-k 2, got {top_k}"
                )
            saved_top_k.append((layer, layer.router.top_k, getattr(layer.block, "top_k", None)))
            layer.router.top_k = top_k
            if hasattr(layer.block, "top_k"):
                layer.block.top_k = top_k
            # Routers that return raw top-k probabilities (norm_topk_prob False) keep them unnormalized.
            renormalize = bool(getattr(layer.router, "norm_topk_prob", True))
            handles.append(layer.router.register_forward_hook(
                _make_hook(layer.moe_index, threshold, renormalize, usage, tuple(observers))
            ))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for layer, router_top_k, block_top_k in saved_top_k:
            layer.router.top_k = router_top_k
            if block_top_k is not None:
                layer.block.top_k = block_top_k


def _make_hook(moe_index: int, threshold: float, renormalize: bool, usage: ExpertUsage | None, observers):
    def hook(module, args, output):
        if not (isinstance(output, tuple) and len(output) == 3):
            raise MoesimError(
                f"MoE layer {moe_index}: router {type(module).__name__} does not return "
                "(router_logits, router_scores, router_indices); gating changes need a transformers TopKRouter"
            )
        logits, scores, indices = output
        if threshold > 0:
            scores = _adaptive_drop(scores, threshold, renormalize)
        if usage is not None:
            usage.add(moe_index, scores)
        for observe in observers:
            observe(moe_index, logits, scores, indices)
        return logits, scores, indices

    return hook
