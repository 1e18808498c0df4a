"""Where a catalogue point's routing comes from: a named real trace, or a named routing model.

- A bundled trace (``moesim.traces``, e.g. ``qwen3-30b-a3b-bigmoeonedge``): real routing, replayed as recorded.
- A bundled routing model of ``moesim trace synth`` (``traces/routing/*.json``, e.g. ``mixtral-8x7b-published``:
  Mixtral-8x7B routing fitted to published statistics, since no Mixtral trace exists here and nothing here
  can run Mixtral): a synthetic trace of the point's prompt and output lengths (:mod:`moesim.tracer.synth`).
- ``deepseek-v2-lite-published``: DeepSeek-V2-Lite routing built from the one published statistic of its
  routing that says how a cache behaves (published-measurements.md Part B, B6: a per-layer LRU of 25% of
  the experts hits 47.7% in decode; HybriMoE, arXiv 2504.05897 Fig. 9 text): uniform popularity, and
  temporal locality (a token repeats the previous token's experts) with the one probability that gives B6's
  hit rate. Not used: B14's "std. dev. of expert activation frequency" (2.34; arXiv 2505.16056 Table 2)
  states no unit, and read as percent of activations (uniform 1.5625) it alone would give LRU(25%) 52%,
  above B6, while OLMoE's 6.79 could not be a share's std; B13's segment-routing score is no cache
  statistic. No cross-layer or per-request statistic is published: the model has neither.
- ``iid-uniform``: every token picks top-k distinct experts uniformly at random, a stated stand-in for
  models whose routing is available in no form here (``moesim trace synth --routing uniform``;
  :func:`moesim.tracer.routing.uniform_routing`). ``iid-uniform-topK`` picks K experts per token instead of the
  model's own top-k, for a system run with fewer experts per token than the model was trained with
  (KTransformers' "6 experts" runs of DeepSeek-V3, which routes 8).

Synthetic traces are deterministic (fixed seed) and are marked synthetic in the report.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from moesim.errors import MoesimError
from moesim.modelspec import load_model_shape
from moesim.tracer import Trace

IID = "iid-uniform"
DSL = "deepseek-v2-lite-published"
SEED = 0
DSL_LRU25_HIT = 0.477  # B6: per-layer LRU hit rate with 25% of the experts cached, decode
# probability that a token repeats the previous token's experts, set so the model's per-layer LRU(16 of 64)
# decode hit rate is DSL_LRU25_HIT (tests/test_reproduce.py recomputes it from a synthetic trace)
DSL_REPEAT = 0.297
DSL_CAPACITY = 16  # 25% of 64 routed experts


def _routing_models() -> dict:
    from moesim.tracer.routing import bundled_routing

    return bundled_routing()


def iid_top_k(routing: str) -> int | None:
    """K of an ``iid-uniform-topK`` name (None for any other name)."""
    prefix = f"{IID}-top"
    digits = routing[len(prefix):] if routing.startswith(prefix) else ""
    return int(digits) if digits.isdigit() and int(digits) > 0 else None


def is_synthetic(routing: str) -> bool:
    """A bundled trace's name means its real routing, even where a routing model shares the name."""
    from moesim.traces import bundled_traces

    if routing in bundled_traces():
        return False
    return routing in (IID, DSL) or iid_top_k(routing) is not None or routing in _routing_models()


def synthetic_trace(routing: str, model: str, prompts: list[int], outputs: list[int], seed: int = SEED) -> Trace:
    """A trace of ``len(prompts)`` requests (prompt, output lengths) from routing model ``routing``."""
    from moesim.tracer.routing import PARTS, read_routing, uniform_routing
    from moesim.tracer.synth import synthetic_trace as synth

    if routing == IID or iid_top_k(routing) is not None:
        shape = load_model_shape(model)
        k = iid_top_k(routing) or shape.top_k
        if k > shape.num_experts:
            raise MoesimError(f"routing '{routing}': {k} experts per token, more than model {model}'s "
                              f"{shape.num_experts}")
        return synth(uniform_routing(replace(shape, top_k=k)), np.asarray(prompts), np.asarray(outputs), seed=seed,
                     disabled=PARTS)
    if routing == DSL:
        return synth(deepseek_v2_lite_routing(model), np.asarray(prompts), np.asarray(outputs), seed=seed)
    if routing not in _routing_models():
        raise MoesimError(f"routing '{routing}': expected a bundled trace, a bundled routing model "
                          f"({', '.join(_routing_models())}), {DSL}, {IID} or {IID}-topK")

    rm = read_routing(routing)
    shape = load_model_shape(model)
    if (shape.num_moe_layers, shape.num_experts, shape.top_k) != (rm.num_layers, rm.num_experts, rm.top_k):
        raise MoesimError(f"routing '{routing}' is for {rm.num_layers} x {rm.num_experts} top-{rm.top_k}, "
                          f"not model {model}")
    return synth(rm, np.asarray(prompts), np.asarray(outputs), seed=seed)


def deepseek_v2_lite_routing(model: str = "deepseek-v2-lite", repeat: float = DSL_REPEAT):
    """The ``deepseek-v2-lite-published`` routing model (see the module docstring)."""
    from moesim.tracer.routing import PhaseModel, RoutingModel, WeightModel

    shape = load_model_shape(model)
    L, E, k = shape.num_moe_layers, shape.num_experts, shape.top_k
    if (E, k) != (64, 6):
        raise MoesimError(f"routing '{DSL}' is for 64 routed experts, top-6 (DeepSeek-V2-Lite), not model {model}")
    popularity = np.full((L, E), 1.0 / E)
    phase = PhaseModel(
        class_prior=np.ones(1), class_popularity=popularity[None], source=np.array([repeat, 0.0]), far_lag=2,
        fidelity=np.ones((L, k)), copy_rank=np.eye(k),
        weights=WeightModel(sum_mean=np.ones(L), sum_std=np.zeros(L), share_alpha=np.ones((L, k))))
    return RoutingModel(
        name=DSL, model=shape, dtype="bfloat16", expert_bytes=tuple([shape.expert_bytes()] * L),
        non_expert_bytes=shape.non_expert_bytes(), decode=phase, prefill=None,
        fitted_to={"popularity": "uniform (no published per-expert popularity)",
                   "locality": f"B6 per-layer LRU hit {DSL_LRU25_HIT} at {DSL_CAPACITY} of {E} experts, decode"})
