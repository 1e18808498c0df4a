"""Where a catalogue point's routing comes from: a named real trace, or a named routing model.

``mixtral-synth``  Mixtral-8x7B routing generated from published statistics (no Mixtral trace exists here):
                   per-layer expert popularity from the real 32 x 8 activation frequencies of
                   Mixtral-8x7B-Instruct (``mixtral_expert_frequencies.json``), and token-to-token reuse
                   matched to the Mixtral paper's Table 5 (arXiv 2401.04088): the share of consecutive tokens
                   whose two experts overlap in at least one is 48.0 / 63.7 / 50.9 % at layers 0 / 15 / 31
                   (mean over the eight Pile subsets; linear in between). With probability ``r_l`` a token's
                   first expert is one of the previous token's two, else it is drawn by popularity; ``r_l`` is
                   solved so the overlap matches (calibrated to routing statistics, not to any timing).
``iid-uniform``    every token picks top-k distinct experts uniformly at random: a stated stand-in for models
                   whose routing is not available here (DeepSeek-V2-Lite).
any bundled trace  real routing (``moesim.traces``), replayed as recorded.

Generated traces are deterministic (seeded by the point's request index) and are marked synthetic.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from moesim.errors import MoesimError
from moesim.modelspec import load_model_shape
from moesim.tracer import DECODE, PREFILL, Trace, TraceCells, TraceMeta, TraceSource

HERE = Path(__file__).resolve().parent
MODELS = ("mixtral-synth", "iid-uniform")
# Mixtral paper Table 5, "first or second choice" repetition, mean over the 8 Pile subsets, at layers 0/15/31
TABLE5_LAYERS = (0, 15, 31)
TABLE5_OVERLAP = (0.4798, 0.6369, 0.5091)


def is_synthetic(routing: str) -> bool:
    return routing in MODELS


@lru_cache(maxsize=1)
def mixtral_frequencies() -> np.ndarray:
    data = json.loads((HERE / "mixtral_expert_frequencies.json").read_text())
    f = np.asarray(data["frequencies"], dtype=np.float64)
    return f / f.sum(axis=1, keepdims=True)


def _random_overlap(p: np.ndarray, rng: np.random.Generator, n: int = 4000) -> float:
    """P(two independent popularity-drawn top-2 sets share an expert), estimated by sampling."""
    def draw():
        a = rng.choice(len(p), p=p)
        q = p.copy()
        q[a] = 0
        return a, rng.choice(len(p), p=q / q.sum())
    hits = 0
    for _ in range(n):
        x, y = draw(), draw()
        hits += bool(set(x) & set(y))
    return hits / n


@lru_cache(maxsize=1)
def mixtral_reuse() -> np.ndarray:
    """Per layer, the probability that a token's first expert repeats one of the previous token's."""
    f = mixtral_frequencies()
    L = f.shape[0]
    target = np.interp(np.arange(L), TABLE5_LAYERS, TABLE5_OVERLAP)
    rng = np.random.default_rng(12345)
    r = np.zeros(L)
    for layer in range(L):
        q = _random_overlap(f[layer], rng, 1500)
        r[layer] = max(0.0, (target[layer] - q) / (1.0 - q))
    return r


def _draw_topk(rng, p, k, first=None):
    chosen = [] if first is None else [first]
    q = p.copy()
    for e in chosen:
        q[e] = 0
    while len(chosen) < k:
        e = int(rng.choice(len(q), p=q / q.sum()))
        chosen.append(e)
        q[e] = 0
    return chosen


def synthetic_trace(routing: str, model: str, prompts: list[int], outputs: list[int], seed: int = 0) -> Trace:
    """A trace of ``len(prompts)`` requests (prompt, output lengths) under routing model ``routing``."""
    if routing not in MODELS:
        raise MoesimError(f"routing '{routing}': expected a bundled trace or one of {', '.join(MODELS)}")
    shape = load_model_shape(model)
    L, E, k = shape.num_moe_layers, shape.num_experts, shape.top_k
    if routing == "mixtral-synth":
        if (L, E, k) != (32, 8, 2):
            raise MoesimError(f"routing mixtral-synth is Mixtral-8x7B's (32 x 8, top-2), not {model}'s")
        pop = mixtral_frequencies()
        reuse = mixtral_reuse()
    else:
        pop = np.full((L, E), 1.0 / E)
        reuse = np.zeros(L)
    req, phase, pos, lay, exs = [], [], [], [], []
    for r, (P, O) in enumerate(zip(prompts, outputs)):
        rng = np.random.default_rng(seed * 1000 + r)
        prev = [None] * L
        for t in range(P + O):
            ph = PREFILL if t < P else DECODE
            for layer in range(L):
                first = None
                if prev[layer] is not None and rng.random() < reuse[layer]:
                    first = prev[layer][int(rng.integers(len(prev[layer])))]
                chosen = _draw_topk(rng, pop[layer], k, first)
                prev[layer] = chosen
                req.append(r)
                phase.append(ph)
                pos.append(t)
                lay.append(layer)
                exs.append(chosen)
    n = len(req)
    w = np.tile(np.linspace(1.0, 0.5, k) / np.linspace(1.0, 0.5, k).sum(), (n, 1)).astype(np.float32)
    cells = TraceCells(request=np.asarray(req, np.int32), phase=np.asarray(phase, np.uint8),
                       position=np.asarray(pos, np.int32), layer=np.asarray(lay, np.int16),
                       experts=np.asarray(exs, np.int16), weights=w)
    meta = TraceMeta(model=shape, dtype="bfloat16", expert_bytes=tuple([shape.expert_bytes()] * L),
                     non_expert_bytes=shape.non_expert_bytes(),
                     source=TraceSource(kind="synthetic", path="", sha256="",
                                        details={"routing": routing, "seed": seed}))
    return Trace(meta, cells)
