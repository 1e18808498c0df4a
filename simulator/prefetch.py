"""Prefetchers: which experts to start loading before a layer asks for them.

``none``                no prefetch (Mixtral-Offloading's released code, Fiddler, MoE-Infinity's default)
``next-layer``          Mixtral-Offloading *paper*'s speculative loading: layer l+1's gate applied to layer
                        l's hidden state guesses l+1's experts; every guessed expert not resident is loaded
                        into the cache in the background while layer l computes.
``first-non-resident``  AdapMoE (``SparseMoeWrapper.forward``, ``LinearCache.prefetch``): of the same
                        guess's top-k, only the first expert that is not resident, into a side buffer; it
                        enters the cache (evicting the LRU entry) only if layer l+1 then selects it.
``eam``                 MoE-Infinity's activation-aware prefetch (``expert_tracer.py``/``expert_predictor.py``,
                        disabled by default in the released code): the request's expert activation matrix
                        (EAM, layers x experts counts) is matched by cosine similarity (row-normalized,
                        averaged over the layers seen so far) against a collection of past requests' EAMs;
                        the best match's future layers, weighted by ``1 - (l' - l)/(L + 1)``, are prefetched
                        best first. Matching runs once per forward step, not per layer (for speed).
``predictive``          a learned next-layer predictor (:mod:`moesim.simulator.predictor`) fitted on other
                        traces: its top-k guess for layer l+1, loaded into the cache.
``oracle``              reads the trace: exactly layer l+1's experts (the bound; Pre-gated MoE's behaviour).

The guess of ``next-layer``/``first-non-resident`` is the trace's ``next_layer_guess`` column (recorded
by applying layer l+1's router to layer l's MoE input). Traces without it (imports from engines that do
not record it) get a guess model (``guess="auto"``): layer l+1's real experts, each kept with a stated
accuracy (:data:`moesim.simulator.workload.DEFAULT_GUESS_ACCURACY`, from AdapMoE's measured accuracies)
and otherwise replaced by a wrong expert; ``guess="accuracy:P"`` states another accuracy and
``guess="previous-token"`` takes the previous token's experts (which a cache of >= top-k slots always
holds, so it prefetches nothing). The result says which (``guess_source``) and reports the prefetches'
precision and recall. Guess-based prefetchers act in decode only, as AdapMoE's; the oracle also in prefill.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from moesim.errors import MoesimError
from moesim.simulator.policies import Registry
from moesim.simulator.workload import ForwardStep, LayerWork, Workload
from moesim.tracer import DECODE, PREFILL


@dataclass(frozen=True)
class PrefetchSpec:
    policy: str = "none"
    limit: int = 0  # most experts one call may prefetch; 0 = the prefetcher's default
    eam_capacity: int = 1000  # MoE-Infinity trace_capacity
    train: tuple[str, ...] = ()  # predictive: traces to fit on (default: the bundled traces but the simulated one)
    guess: str = "auto"  # next-layer guess: auto | trace | previous-token | accuracy:P (see the module doc)
    # MoE-Infinity 2024's task queue (prefetch_eam_all.py cites the code): each layer's call drops the queued
    # prefetches not started yet, and a prefetch may evict only experts of layers before the current one
    replaces_queue: bool = False
    evicts_earlier_layers_only: bool = False

    def __post_init__(self):
        from moesim.simulator.workload import parse_guess

        parse_guess(self.guess)


class PrefetchContext:
    """What a prefetcher may look at when layer ``layer`` of ``step`` has been routed (reused object)."""

    __slots__ = ("layer", "phase", "step", "work", "resident", "num_layers")

    def __init__(self, num_layers: int, resident: Callable[[int, int], bool]):
        self.num_layers = num_layers
        self.resident = resident
        self.layer = 0
        self.phase = DECODE
        self.step: Optional[ForwardStep] = None
        self.work: Optional[LayerWork] = None


class Prefetcher:
    name = "base"
    into_buffer = False  # loads go to a side buffer, not the cache (AdapMoE)
    phases: tuple[int, ...] = (DECODE,)
    wants_observe = False
    default_limit = 0  # 0: no limit

    def __init__(self, spec: PrefetchSpec, workload: Workload):
        self.spec = spec
        self.workload = workload
        self.top_k = workload.top_k
        self.limit = spec.limit or self.default_limit

    @property
    def active(self) -> bool:
        return True

    def predict(self, ctx: PrefetchContext) -> Sequence[tuple[int, int]]:
        raise NotImplementedError

    def observe(self, step: ForwardStep, layer: int, work: LayerWork) -> None:
        pass

    def begin_batch(self, requests: tuple[int, ...]) -> None:
        pass

    def end_batch(self, requests: tuple[int, ...]) -> None:
        pass


PREFETCHERS: Registry[type[Prefetcher]] = Registry("prefetcher")


@PREFETCHERS.register("none")
class NoPrefetch(Prefetcher):
    name = "none"

    @property
    def active(self) -> bool:
        return False

    def predict(self, ctx):
        return ()


@PREFETCHERS.register("next-layer")
class NextLayerGuess(Prefetcher):
    name = "next-layer"

    def predict(self, ctx):
        nxt = ctx.layer + 1
        if nxt >= ctx.num_layers:
            return ()
        guess = ctx.work.guess
        if self.limit:
            guess = guess[: self.limit]
        return [(nxt, e) for e in guess]


@PREFETCHERS.register("first-non-resident")
class FirstNonResident(Prefetcher):
    name = "first-non-resident"
    into_buffer = True

    def predict(self, ctx):
        nxt = ctx.layer + 1
        if nxt >= ctx.num_layers:
            return ()
        resident = ctx.resident
        for e in ctx.work.guess[: self.top_k]:
            if not resident(nxt, e):
                return [(nxt, e)]
        return ()


@PREFETCHERS.register("oracle")
class OraclePrefetch(Prefetcher):
    name = "oracle"
    phases = (PREFILL, DECODE)

    def predict(self, ctx):
        nxt = ctx.layer + 1
        if nxt >= ctx.num_layers:
            return ()
        work = ctx.step.layers[nxt]
        if work is None:
            return ()
        experts = work.experts if not self.limit else work.experts[: self.limit]
        return [(nxt, e) for e in experts]


@PREFETCHERS.register("predictive")
class LearnedPrefetch(Prefetcher):
    name = "predictive"

    def predict(self, ctx):
        nxt = ctx.layer + 1
        if nxt >= ctx.num_layers:
            return ()
        pred = ctx.work.predicted
        if self.limit:
            pred = pred[: self.limit]
        return [(nxt, e) for e in pred]


@PREFETCHERS.register("eam")
class EAMPrefetch(Prefetcher):
    """MoE-Infinity's expert-activation-matrix matching (see the module docstring)."""

    name = "eam"
    wants_observe = True

    def __init__(self, spec: PrefetchSpec, workload: Workload, history: Sequence[np.ndarray] = ()):
        super().__init__(spec, workload)
        self.limit = spec.limit or 4 * workload.top_k
        L, E = workload.num_layers, workload.num_experts
        self.L, self.E = L, E
        self._collection: list[np.ndarray] = []  # row-normalized EAMs
        self._access: list[int] = []
        for eam in history:
            self._add(np.asarray(eam, dtype=np.float64))
        self._current = np.zeros((L, E))
        self._matched_step = -1
        self._match: Optional[np.ndarray] = None
        self._decay = None

    @staticmethod
    def _normalize(eam: np.ndarray) -> np.ndarray:
        norms = np.linalg.norm(eam, axis=1, keepdims=True)
        return np.divide(eam, norms, out=np.zeros_like(eam), where=norms > 0)

    def _add(self, eam: np.ndarray) -> None:
        if eam.shape != (self.L, self.E):
            raise MoesimError(f"eam history: matrix of shape {eam.shape}, expected {(self.L, self.E)}")
        if not eam.any():
            return
        normalized = self._normalize(eam)
        if len(self._collection) >= self.spec.eam_capacity:
            victim = int(np.argmin(self._access))  # replaced by least access, as the released code
            self._collection[victim] = normalized
            self._access[victim] = 0
        else:
            self._collection.append(normalized)
            self._access.append(0)

    def begin_batch(self, requests):
        self._current = np.zeros((self.L, self.E))
        self._matched_step = -1

    def end_batch(self, requests):
        self._add(self._current)

    def observe(self, step, layer, work):
        if step.phase == DECODE:
            row = self._current[layer]
            for e, t in zip(work.experts, work.tokens):
                row[e] += t

    def _matched(self, step: ForwardStep) -> Optional[np.ndarray]:
        if self._matched_step != step.index:
            self._matched_step = step.index
            self._match = None
            if self._collection:
                seen = self._current.any(axis=1)
                if seen.any():
                    cur = self._normalize(self._current)
                    coll = np.stack(self._collection)
                    sims = (coll[:, seen, :] * cur[seen][None]).sum(axis=2).mean(axis=1)
                    best = int(np.argmax(sims))
                    self._access[best] += 1
                    self._match = coll[best]
        return self._match

    def predict(self, ctx):
        match = self._matched(ctx.step)
        if match is None:
            return ()
        l, L = ctx.layer, self.L
        if l + 1 >= L:
            return ()
        future = match[l + 1:] * (1.0 - (np.arange(l + 1, L) - l) / (L + 1.0))[:, None]
        flat = future.reshape(-1)
        positive = np.flatnonzero(flat > 0)
        if positive.size == 0:
            return ()
        take = min(positive.size, self.limit * 4)
        top = positive[np.argpartition(-flat[positive], take - 1)[:take]] if take < positive.size else positive
        top = top[np.lexsort((top, -flat[top]))]
        out = []
        resident = ctx.resident
        E = self.E
        for idx in top.tolist():
            layer, e = l + 1 + idx // E, idx % E
            if not resident(layer, e):
                out.append((layer, e))
                if len(out) >= self.limit:
                    break
        return out


def make_prefetcher(spec: PrefetchSpec, workload: Workload, **kwargs) -> Prefetcher:
    return PREFETCHERS.get(spec.policy, "--prefetch")(spec, workload, **kwargs)
