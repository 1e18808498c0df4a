"""MoE-Infinity's 2024 prefetch as released (TorchMoE/MoE-Infinity, the code of the 2024-04 README's table).

Read from the code (commit and path each):

- ``moe_infinity/models/mixtral.py`` @06d15ba ``SyncMixtralSparseMoeBlock.forward``: at *every* MoE layer of
  every forward (prefill and decode), for each sequence, ``expert_predictor.predict`` then
  ``expert_prefetcher.prefetch_experts`` before the layer's experts are dispatched.
- ``moe_infinity/memory/expert_tracer.py`` @1f117f7: the request's expert activation matrix (EAM) counts every
  token's experts at every layer (``update_entry``, prefill included); ``find_most_similar`` matches it, row-
  normalised, against a collection of past requests' EAMs by cosine similarity averaged over the layers
  after the current one, and returns the best entry (an all-zero collection matches a zero matrix).
- ``moe_infinity/memory/expert_predictor.py`` @1f117f7 ``predict``: layers before the current one are zeroed;
  every later-or-current layer's score is ``(count + 1e-8) x (1 - (l' - l)/(L + 1))``, so every expert of
  layers ``l..L-1`` scores above zero.
- ``moe_infinity/memory/expert_prefetcher.py`` @1f117f7 ``prefetch_experts``: every expert with a score above
  zero is enqueued (``enqueue_prefetch``), best first: ``8 x (32 - l)`` calls at layer ``l`` of Mixtral,
  4,224 per token.
- ``core/prefetch/task_scheduler.cpp`` @87eacf7: a demand fetch drops queued tasks of earlier layers and the
  one fetch thread serves queued demand tasks before prefetch tasks; ``archer_prefetch_handle.cpp``
  ``EnqueuePrefetch`` skips an expert already on the GPU.

- ``moe_infinity/memory/expert_prefetcher.py`` @1f117f7: before enqueueing, ``replace_cache_candidates``
  makes every scored expert a cache candidate and clears the queued prefetches (``ReplaceCacheCandidates``,
  ``core/prefetch/task_scheduler.h``); ``RemoveCachedSparseNode`` (@87eacf7) never evicts a candidate.
  ``PrefetchSpec.replaces_queue`` and ``evicts_earlier_layers_only`` model both (the decision core and the
  engine act on them; :func:`moesim.simulator.presets.moe_infinity_2024` says what they change).

So the prefetcher returns, at each layer call, the non-resident experts of layers ``l..L-1`` in that score
order (the current layer's unrouted experts included, as the code enqueues them too). How many of them are
copied before the next layer's call replaces the queue is the fetch thread's race with the layer's compute,
which no source measures: ``PrefetchSpec.limit`` caps the experts issued per call (the preset states it).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from moesim.simulator.prefetch import PREFETCHERS, Prefetcher, PrefetchSpec
from moesim.simulator.workload import Workload
from moesim.tracer import DECODE, PREFILL

SCORE_FLOOR = 1e-8  # expert_predictor.py adds it to every score: nothing scores zero


@PREFETCHERS.register("eam-all")
class EAMEveryLayerPrefetch(Prefetcher):
    """MoE-Infinity 2024's per-layer predict-and-enqueue-everything (see the module docstring)."""

    name = "eam-all"
    phases = (PREFILL, DECODE)
    wants_observe = True
    default_limit = 1

    def __init__(self, spec: PrefetchSpec, workload: Workload):
        super().__init__(spec, workload)
        L, E = workload.num_layers, workload.num_experts
        self.L, self.E = L, E
        self._collection: list[np.ndarray] = []  # past requests' EAMs (counts)
        self._access: list[int] = []
        self._current = np.zeros((L, E))
        self._decay = 1.0 - np.arange(L)[:, None] / (L + 1.0)  # by distance l' - l

    def begin_batch(self, requests):
        self._current = np.zeros((self.L, self.E))

    def end_batch(self, requests):
        eam = self._current
        if not eam.any():
            return
        if len(self._collection) >= self.spec.eam_capacity:
            victim = int(np.argmin(self._access))  # expert_tracer.finish_entry: the least accessed entry
            self._collection[victim], self._access[victim] = eam, 1
        else:
            self._collection.append(eam)
            self._access.append(1)

    def observe(self, step, layer, work):
        row = self._current[layer]
        for e, t in zip(work.experts, work.tokens):
            row[e] += t

    def _match(self, layer: int) -> np.ndarray:
        """expert_tracer.find_most_similar: the collection entry most similar over layers after ``layer``."""
        if not self._collection:
            return np.zeros((self.L, self.E))
        coll = np.stack(self._collection)[:, layer + 1:, :]
        coll = coll / np.maximum(coll.sum(axis=2, keepdims=True), 1e-30)
        cur = self._current[layer + 1:]
        sums = cur.sum(axis=1, keepdims=True)
        cur = np.divide(cur, sums, out=np.zeros_like(cur), where=sums > 0)
        if coll.shape[1] == 0:
            best = 0
        else:
            num = (coll * cur[None]).sum(axis=2)
            den = np.maximum(np.linalg.norm(coll, axis=2) * np.linalg.norm(cur, axis=1)[None], 1e-6)
            best = int(np.argmax((num / den).mean(axis=1)))
        self._access[best] += 1
        return self._collection[best]

    def predict(self, ctx) -> Sequence[tuple[int, int]]:
        l = ctx.layer
        # the layer's own routing is counted before the match, as update_entry runs inside predict
        row = self._current[l]
        for e, t in zip(ctx.work.experts, ctx.work.tokens):
            row[e] += t
        scores = (self._match(l)[l:] + SCORE_FLOOR) * self._decay[: self.L - l]
        flat = scores.reshape(-1)
        order = np.lexsort((np.arange(flat.size), -flat))  # best first; ties in the enqueue loop's order
        out = []
        resident, E = ctx.resident, self.E
        for idx in order.tolist():
            layer, e = l + idx // E, idx % E
            if not resident(layer, e):
                out.append((layer, e))
                if len(out) >= self.limit:
                    break
        # observe() must not count this layer again
        for e, t in zip(ctx.work.experts, ctx.work.tokens):
            row[e] -= t
        return out
