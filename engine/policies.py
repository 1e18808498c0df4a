"""The simulator's policy objects, built exactly as ``simulator/run.py`` builds them, and call recorders.

:func:`build_policy_objects` repeats ``run_prepared``'s construction (cache from ``make_cache`` with the
memory plan's capacity, preloaded with the preset's initial state and given Belady's future; prefetcher
from ``make_prefetcher``, the learned predictor annotated; placement from ``make_placement`` over the
run's cost tables; accelerate's per-layer copy sizes). The engine and the simulator then drive these
objects through the same calls in the same order. ``simulator/run.py`` has no public hook for this
construction, so it is repeated here; :func:`simulate_with_log` runs the simulator's own
:class:`~moesim.simulator.engine.Simulation` on objects built here and the tests check that its result
equals ``simulate()``'s, so a change in ``run.py`` that this copy misses fails a test.

The recorders wrap a policy object and log every decision call (``access``, ``insert``, ``observe``,
``reset_request``, ``predict``, ``place``) with its arguments and outcome; two runs made identical
decisions exactly when their logs are equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from moesim.simulator.cache import BeladyCache, FutureIndex, make_cache
from moesim.simulator.costs import CostTables
from moesim.simulator.placement import make_placement
from moesim.simulator.prefetch import make_prefetcher
from moesim.simulator.run import Prepared, _costs, _initial_keys, _predictions, _geometry
from moesim.simulator.transfer import TransferSpec


@dataclass
class PolicyObjects:
    cache: Any
    prefetcher: Any
    placement: Any
    transfer: TransferSpec
    costs: CostTables
    layer_copy_s: Optional[list[float]]
    layer_copy_bytes: Optional[list[int]]
    log: Optional["DecisionLog"] = None


def build_policy_objects(prep: Prepared, log: Optional["DecisionLog"] = None) -> PolicyObjects:
    """Fresh policy objects for one run of ``prep`` (the construction of ``simulator.run.run_prepared``)."""
    policy = prep.policy
    wl = prep.workload
    L, E = wl.num_layers, wl.num_experts
    costs = _costs(prep, policy.placement.policy != "gpu")
    cache = make_cache(policy.cache.policy, _geometry(prep), prep.plan.capacity, **policy.cache.params())
    cache.preload(_initial_keys(policy.cache.initial, prep))
    if isinstance(cache, BeladyCache):
        cache.attach_future(FutureIndex(wl.future_uses()))
    pf_spec = policy.prefetch
    if pf_spec.policy == "predictive":
        from moesim.simulator.predictor import annotate

        annotate(wl, _predictions(prep, pf_spec.train))
    prefetcher = make_prefetcher(pf_spec, wl)
    transfer = policy.transfer
    pageable = transfer.on_compute_stream and not transfer.pinned
    copy_by_layer = costs.h2d_pageable_by_layer if pageable else costs.h2d_by_layer
    placement = make_placement(policy.placement, costs, copy_by_layer)
    layer_copy_s = layer_copy_bytes = None
    if transfer.mode == "layer":
        layer_copy_s, layer_copy_bytes = [], []
        for layer in range(L):
            missing = sum(1 for e in range(E) if not cache.contains(layer, e))
            nbytes = missing * prep.expert_bytes[layer]
            layer_copy_bytes.append(nbytes)
            layer_copy_s.append(float(prep.profile.copy_time(nbytes, "h2d", pinned=transfer.pinned)) if nbytes else 0.0)
    if log is not None:
        cache, prefetcher, placement = RecordingCache(cache, log), RecordingPrefetcher(prefetcher, log), \
            RecordingPlacement(placement, log)
    return PolicyObjects(cache, prefetcher, placement, transfer, costs, layer_copy_s, layer_copy_bytes, log)


@dataclass
class DecisionLog:
    calls: list[tuple] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.calls)

    def first_difference(self, other: "DecisionLog") -> Optional[int]:
        """Index of the first differing call (or the shorter length), None when equal."""
        for i, (a, b) in enumerate(zip(self.calls, other.calls)):
            if a != b:
                return i
        if len(self.calls) != len(other.calls):
            return min(len(self.calls), len(other.calls))
        return None


class _Recorder:
    def __init__(self, inner, log: DecisionLog):
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_log", log)

    def __getattr__(self, name):
        return getattr(self._inner, name)


class RecordingCache(_Recorder):
    def access(self, layer, experts, clock):
        acc = self._inner.access(layer, experts, clock)
        self._log.calls.append(("access", layer, tuple(experts), clock, tuple(acc.hits), tuple(acc.misses),
                                tuple(acc.evicted), tuple(acc.bypassed)))
        return acc

    def insert(self, layer, expert, clock, protect=()):
        ins = self._inner.insert(layer, expert, clock, protect)
        self._log.calls.append(("insert", layer, expert, clock, ins.admitted, tuple(ins.evicted)))
        return ins

    def observe(self, layer, experts, weights):
        self._log.calls.append(("observe", layer, tuple(experts)))
        return self._inner.observe(layer, experts, weights)

    def reset_request(self):
        self._log.calls.append(("reset_request",))
        return self._inner.reset_request()


class RecordingPrefetcher(_Recorder):
    def predict(self, ctx):
        preds = self._inner.predict(ctx)
        self._log.calls.append(("predict", ctx.step.index, ctx.layer, tuple(tuple(p) for p in preds)))
        return preds

    def begin_batch(self, requests):
        self._log.calls.append(("begin_batch", tuple(requests)))
        return self._inner.begin_batch(requests)

    def end_batch(self, requests):
        self._log.calls.append(("end_batch", tuple(requests)))
        return self._inner.end_batch(requests)


class RecordingPlacement(_Recorder):
    def place(self, layer, phase, experts, tokens, resident):
        flags = self._inner.place(layer, phase, experts, tokens, resident)
        self._log.calls.append(("place", layer, tuple(experts), None if flags is None else tuple(flags)))
        return flags


def simulate_with_log(prep: Prepared, log: Optional[DecisionLog] = None):
    """The simulator's result for ``prep``, with the policy objects built here (and their calls logged)."""
    from moesim.simulator.engine import Simulation
    from moesim.simulator.run import _result, infeasible_result

    if not prep.plan.fits:
        return infeasible_result(prep)
    objs = build_policy_objects(prep, log)
    sim = Simulation(prep.workload, objs.costs, objs.cache, objs.prefetcher, objs.placement, objs.transfer,
                     prep.trace.meta.model.hidden_size, objs.layer_copy_s, objs.layer_copy_bytes)
    stats = sim.run()
    return _result(prep, objs.costs, sim, stats)
