"""Call recorders around the simulator's policy objects, so two runs can be compared decision by decision.

The engine and the simulator drive objects built by the simulator's own
:func:`moesim.simulator.run.build_policy_objects`, through the same calls in the same order. The recorders
wrap a policy object and log every decision call (``access``, ``insert``, ``observe``, ``reset_request``,
``predict``, ``place``) with its arguments and outcome; two runs made identical decisions exactly when their
logs are equal.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from moesim.simulator.run import PolicyObjects, Prepared
from moesim.simulator.run import build_policy_objects as _build_simulator_objects


def build_policy_objects(prep: Prepared, log: Optional["DecisionLog"] = None) -> PolicyObjects:
    """The simulator's policy objects for one run of ``prep``; with ``log``, every decision call is recorded."""
    objs = _build_simulator_objects(prep)
    if log is None:
        return objs
    return dataclasses.replace(objs, cache=RecordingCache(objs.cache, log),
                               prefetcher=RecordingPrefetcher(objs.prefetcher, log),
                               placement=RecordingPlacement(objs.placement, log))


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
    from moesim.simulator.engine import build_simulation
    from moesim.simulator.run import infeasible_result, simulation_result

    if not prep.plan.fits:
        return infeasible_result(prep)
    objs = build_policy_objects(prep, log)
    sim = build_simulation(prep, objs)
    stats = sim.run()
    return simulation_result(prep, objs.costs, sim, stats)
