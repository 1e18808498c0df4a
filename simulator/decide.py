"""The decisions of an offloading run, without time: one core that the simulator and the real engine both drive.

An offloading run replays a workload layer by layer through three policy objects (cache, prefetcher,
placement). What happens at each MoE layer is decided here: which routed experts run on the CPU, which hit
the cache, which need a demand copy and which are served by a copy already issued, which prefetches go out
and what they evict, and in which order the device experts run. How it happens is the driver's: SimPy
timeouts and modelled lanes in :mod:`moesim.simulator.engine`, real copies, kernels and threads in
:mod:`moesim.engine.runner`. Because both call the policy objects only from here, they make the same calls
in the same order by construction (the decision-log test in ``tests/test_validate.py`` checks it).

Keys: expert ``e`` of layer ``l`` is ``l * num_experts + e``. Copies are the driver's job objects
(:class:`QueuedJob`); the core only stores them, asks whether they have landed and orders waits by their
submission number.

Also shared: :class:`DemandFirstQueue` (the queue rule of every lane), :class:`RunCounters` (the counters
both drivers report) and :func:`replay_steps` (the batch loop and its per-request timings).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Container, Iterator, Optional, Sequence

from moesim.simulator.cache import CacheAccess
from moesim.simulator.prefetch import PrefetchContext
from moesim.simulator.workload import ForwardStep, LayerWork, RequestBatch
from moesim.tracer import DECODE


class QueuedJob:
    """What a lane's queue and the decision core need of a job; each driver's job class extends it."""

    __slots__ = ("seq", "background", "started")

    def __init__(self, seq: int, background: bool):
        self.seq = seq  # submission number on its lane: waits are served in this order
        self.background = background  # a prefetch nobody waits for yet: queued behind demand jobs
        self.started = False

    def landed(self) -> bool:
        """The copy is complete (its weights may be read without waiting)."""
        raise NotImplementedError


class DemandFirstQueue:
    """The jobs a lane has not started: queued demand jobs go before queued background jobs, each kind FIFO.

    Whether prefetches are background (overtaken by demand loads) is the policy's choice (``demand_priority``);
    a background job somebody starts waiting for is promoted to demand.
    """

    __slots__ = ("demand", "background")

    def __init__(self):
        self.demand: deque[QueuedJob] = deque()
        self.background: deque[QueuedJob] = deque()

    def __bool__(self) -> bool:
        return bool(self.demand) or bool(self.background)

    def push(self, job: QueuedJob) -> None:
        (self.background if job.background else self.demand).append(job)

    def pop(self) -> Optional[QueuedJob]:
        if self.demand:
            return self.demand.popleft()
        if self.background:
            return self.background.popleft()
        return None

    def withdraw(self, job: QueuedJob) -> bool:
        """Drop a queued background job that has not started; False when it has started or is demand."""
        if job.started or not job.background:
            return False
        try:
            self.background.remove(job)
        except ValueError:
            return False
        return True

    def promote(self, job: QueuedJob) -> None:
        """A queued background job becomes demand (someone now waits on it)."""
        if job.started or not job.background:
            return
        try:
            self.background.remove(job)
        except ValueError:
            return
        job.background = False
        self.demand.append(job)


@dataclass
class RunCounters:
    """The counters both drivers fill, named as :class:`~moesim.simulator.results.SimResult` reads them."""

    num_layers: int
    decode_accesses: list[int] = field(init=False)  # routed experts per layer (decode)
    decode_hits: list[int] = field(init=False)  # of those, resident or served by a prefetch
    prefill_accesses: int = 0
    prefill_hits: int = 0
    decode_cpu: int = 0  # decode accesses run on the CPU
    prefetch_issued: int = 0
    prefetch_used: int = 0  # prefetched experts that were accessed before leaving
    prefetch_served: int = 0  # accesses served by a prefetch (decode)
    demand_loads: int = 0  # accesses that needed a demand load (decode, device-placed)
    stall_s: float = 0.0  # the compute stream waiting for copies and CPU experts
    ttft: dict[int, float] = field(default_factory=dict)
    e2e: dict[int, float] = field(default_factory=dict)
    token_intervals: list[float] = field(default_factory=list)
    makespan_s: float = 0.0
    decode_time_s: float = 0.0
    decode_tokens: int = 0

    def __post_init__(self):
        self.decode_accesses = [0] * self.num_layers
        self.decode_hits = [0] * self.num_layers


def replay_steps(batches: Sequence[RequestBatch], counters: RunCounters, cache, prefetcher,
                 now: Callable[[], float], step_done: Optional[Callable[[ForwardStep, float], None]] = None,
                 batch_done: Optional[Callable[[RequestBatch], None]] = None) -> Iterator[ForwardStep]:
    """The forward steps of ``batches`` in order, timed as a generate loop: the caller runs each step before
    asking for the next, and ``now()`` read before and after gives TTFT, token intervals and end-to-end
    times. The cache's per-request state is reset after prefill and after each batch; ``step_done(step,
    seconds)`` and ``batch_done(batch)`` let a driver measure more."""
    for batch in batches:
        t0 = now()
        prefetcher.begin_batch(batch.requests)
        last: dict[int, float] = {}
        for step in batch.prefill:
            ts = now()
            yield step
            t = now()
            if step_done is not None:
                step_done(step, t - ts)
            r = step.requests[0]
            counters.ttft[r] = t - t0
            last[r] = t
        cache.reset_request()
        for step in batch.decode:
            ts = now()
            yield step
            t = now()
            if step_done is not None:
                step_done(step, t - ts)
            counters.decode_time_s += t - ts
            counters.decode_tokens += step.tokens
            for r in step.requests:
                counters.token_intervals.append(t - last.get(r, t0))
                last[r] = t
        for r in batch.requests:
            counters.e2e[r] = last.get(r, now()) - t0
        cache.reset_request()
        prefetcher.end_batch(batch.requests)
        if batch_done is not None:
            batch_done(batch)


@dataclass(slots=True, eq=False)
class LayerPlan:
    """One MoE layer of one step as decided before any copy is issued (valid until the next layer begins)."""

    step: Optional[ForwardStep] = None
    layer: int = 0
    work: Optional[LayerWork] = None
    clock: int = 0  # the cache's clock: step index * layers + layer
    base: int = 0  # key of this layer's expert 0
    gpu_experts: tuple = ()  # routed experts that run on the device, in routing order
    gpu_tokens: tuple = ()  # their token counts
    cpu_experts: tuple = ()  # routed experts placed on the CPU
    cpu_tokens: tuple = ()
    access: Optional[CacheAccess] = None  # the cache's answer for the device experts: hits, misses, evicted, bypassed
    loads: Sequence[int] = ()  # misses that need a demand copy now (the others are in the prefetch side buffer)
    waits: dict = field(default_factory=dict)  # key -> job: issued copies that a device expert must wait for
    from_buffer: Sequence[int] = ()  # keys served from the side buffer (their copies are in ``waits``)
    dropped: Sequence[int] = ()  # keys of this layer's side-buffer prefetches that guessed wrong (freed)
    prefetches: Sequence[tuple[int, int]] = ()  # the prefetcher's guesses, (layer, expert) best first


def _split_by_flag(experts: tuple, tokens: tuple, cpu_flags: Sequence[bool]) -> tuple[tuple, tuple, tuple, tuple]:
    """(device experts, their tokens, CPU experts, their tokens), each in routing order: one pass, no generators."""
    gpu_e: list = []
    gpu_t: list = []
    cpu_e: list = []
    cpu_t: list = []
    for e, t, on_cpu in zip(experts, tokens, cpu_flags):
        if on_cpu:
            cpu_e.append(e)
            cpu_t.append(t)
        else:
            gpu_e.append(e)
            gpu_t.append(t)
    return tuple(gpu_e), tuple(gpu_t), tuple(cpu_e), tuple(cpu_t)


class DecisionCore:
    """The decision state of one run: the policy objects, the copies in flight and the counters.

    A driver calls, per MoE layer: :meth:`begin_layer` (every policy call up to the prefetcher's guesses); it
    issues ``plan.loads`` its own way (on a copy lane through :meth:`stream_loads`), then, when there are
    ``plan.prefetches``, :meth:`issue_prefetches` (the layer's last policy calls); it runs
    ``plan.cpu_experts`` and computes the device experts: first :meth:`ready_experts`, then
    :meth:`landing_order`.
    """

    def __init__(self, cache, prefetcher, placement, counters: RunCounters, num_layers: int, num_experts: int):
        self.cache = cache
        self.prefetcher = prefetcher
        self.placement = placement
        self.counters = counters
        self.L, self.E = num_layers, num_experts
        self.inflight: dict = {}  # key -> job loading an expert the cache holds
        self.buffer: dict = {}  # key -> job: prefetches held outside the cache (AdapMoE's side buffer)
        self.unused: dict = {}  # key -> True: prefetched into the cache, not accessed yet
        self.ctx = PrefetchContext(num_layers, cache.contains)
        # class constants of the policy objects and their bound methods, read once per run
        self._observe_scores = cache.uses_scores
        self._place = placement.place if placement.needs_cpu else None
        self._access = cache.access
        self._prefetch_phases = prefetcher.phases if prefetcher.active else ()
        self._observe = prefetcher.wants_observe
        self._into_buffer = prefetcher.into_buffer
        spec = getattr(prefetcher, "spec", None)
        self.replaces_queue = bool(spec is not None and spec.replaces_queue and prefetcher.active)
        self._earlier_layers_only = bool(spec is not None and spec.evicts_earlier_layers_only)
        self.prefetch_dropped = 0  # queued prefetches dropped by replaces_queue (their slots freed)
        self._waiting: Sequence[tuple] = ()  # (seq, expert, tokens, job) held back by ready_experts
        self._plan = LayerPlan()  # one object, refilled per layer: the simulator runs millions of layers

    def begin_layer(self, step: ForwardStep, layer: int, work: LayerWork) -> LayerPlan:
        """Place the routed experts, access the cache, settle what serves each device expert and ask the
        prefetcher for its guesses. No policy call comes between the access and the guesses, so asking
        before the driver issues the loads changes nothing the policies see."""
        cache = self.cache
        counters = self.counters
        E = self.E
        phase = step.phase
        clock = step.index * self.L + layer
        experts = work.experts
        tokens = work.tokens
        if self._observe_scores:
            cache.observe(layer, experts, work.weights)
        place = self._place
        cpu_flags = place(layer, phase, experts, tokens, cache.contains) if place is not None else None
        if cpu_flags is None:
            gpu_e, gpu_t = experts, tokens
            cpu_e: tuple = ()
            cpu_t: tuple = ()
        else:
            gpu_e, gpu_t, cpu_e, cpu_t = _split_by_flag(experts, tokens, cpu_flags)
        acc = self._access(layer, gpu_e, clock)
        base = layer * E
        served = 0
        unused = self.unused
        if unused:
            for e in acc.hits:
                if unused.pop(base + e, None):
                    served += 1
        misses = acc.misses
        waits: dict = {}
        buf = self.buffer
        if buf:
            loads = []
            from_buffer = []
            for e in misses:
                job = buf.pop(base + e, None)
                if job is not None:
                    served += 1
                    waits[base + e] = job
                    from_buffer.append(base + e)
                else:
                    loads.append(e)
            dropped = [k for k in buf if k // E == layer]  # guessed wrong: the buffer is released
            for key in dropped:
                del buf[key]
        else:
            loads = misses
            from_buffer = dropped = ()
        if served:
            counters.prefetch_used += served
        inflight = self.inflight
        for l2, e2 in acc.evicted:
            k2 = l2 * E + e2
            unused.pop(k2, None)
            job = inflight.pop(k2, None)
            if job is not None and l2 == layer and e2 in acc.hits:
                # a hit whose prefetch is still landing, evicted by this layer's own misses (fewer slots
                # than experts): it is computed first, but only once its copy is in
                waits[k2] = job
        if phase == DECODE:
            counters.decode_accesses[layer] += len(experts)
            counters.decode_hits[layer] += len(acc.hits) + (len(misses) - len(loads))
            if cpu_e:
                counters.decode_cpu += len(cpu_e)
            if served:
                counters.prefetch_served += served
            if loads:
                counters.demand_loads += len(loads)
        else:
            counters.prefill_accesses += len(experts)
            counters.prefill_hits += len(acc.hits) + (len(misses) - len(loads))
        if phase in self._prefetch_phases:
            ctx = self.ctx
            ctx.layer, ctx.phase, ctx.step, ctx.work = layer, phase, step, work
            prefetches = self.prefetcher.predict(ctx)
        else:
            prefetches = ()
        if not prefetches and self._observe:
            self.prefetcher.observe(step, layer, work)  # nothing to issue: the layer's decisions end here
        plan = self._plan
        plan.step, plan.layer, plan.work, plan.clock, plan.base = step, layer, work, clock, base
        plan.gpu_experts, plan.gpu_tokens, plan.cpu_experts, plan.cpu_tokens = gpu_e, gpu_t, cpu_e, cpu_t
        plan.access, plan.loads, plan.waits, plan.from_buffer, plan.dropped = acc, loads, waits, from_buffer, dropped
        plan.prefetches = prefetches
        return plan

    def stream_loads(self, plan: LayerPlan, submit: Callable[[LayerPlan, int, int, bool], object],
                     reuse: Optional[Callable[[int], None]] = None) -> None:
        """Demand loads on a copy lane: a miss whose copy is already in flight waits for it (``reuse(key)``);
        any other gets ``submit(plan, expert, key, kept)``, tracked while in flight unless the cache
        bypassed it (loaded for this step only, ``kept`` False)."""
        inflight = self.inflight
        bypassed = plan.access.bypassed
        waits = plan.waits
        base = plan.base
        for e in plan.loads:
            key = base + e
            job = inflight.get(key)
            if job is None:
                kept = not bypassed or e not in bypassed
                job = submit(plan, e, key, kept)
                if kept:
                    inflight[key] = job
            elif reuse is not None:
                reuse(key)
            waits[key] = job

    def issue_prefetches(self, plan: LayerPlan, submit: Callable[[int, int, int], object],
                         evicted: Optional[Callable[[int], None]] = None) -> None:
        """Issue ``plan.prefetches`` (when there are any) not resident or buffered yet: into the side buffer, or
        inserted into the cache with this layer's device experts protected (each key an insertion evicts
        goes to ``evicted`` first); ``submit(layer, expert, key)`` issues the copy. Then the prefetcher
        observes the routed layer, the layer's last policy call."""
        cache = self.cache
        E = self.E
        buf, inflight, unused = self.buffer, self.inflight, self.unused
        protect = {plan.base + e for e in plan.gpu_experts}
        if self._earlier_layers_only:  # this and later layers are all cache candidates: never victims
            protect.update(range(plan.base, self.L * E))
        into_buffer = self._into_buffer
        for pl, pe in plan.prefetches:
            pkey = pl * E + pe
            if cache.contains_key(pkey) or pkey in buf:
                continue
            if into_buffer:
                buf[pkey] = submit(pl, pe, pkey)
            else:
                ins = cache.insert(pl, pe, plan.clock, protect)
                if not ins.admitted:
                    continue
                for l2, e2 in ins.evicted:
                    k2 = l2 * E + e2
                    unused.pop(k2, None)
                    inflight.pop(k2, None)
                    if evicted is not None:
                        evicted(k2)
                inflight[pkey] = submit(pl, pe, pkey)
                unused[pkey] = True
            self.counters.prefetch_issued += 1
        if self._observe:
            self.prefetcher.observe(plan.step, plan.layer, plan.work)

    def drop_queued_prefetches(self, withdraw: Callable[[QueuedJob], bool]) -> None:
        """The prefetcher replaces its queue at each layer call: every prefetch whose copy has not started
        (``withdraw(job)`` takes it off its lane) leaves the cache it was inserted into."""
        inflight, unused, cache, E = self.inflight, self.unused, self.cache, self.E
        dropped = [key for key, job in inflight.items() if key in unused and withdraw(job)]
        for key in dropped:
            del inflight[key]
            del unused[key]
            cache.evict(key // E, key % E)
        self.prefetch_dropped += len(dropped)

    def ready_experts(self, plan: LayerPlan, promote: Callable[[QueuedJob], None],
                      skip: Container[int] = ()) -> Iterator[tuple[int, int]]:
        """The device experts whose weights are in place, as (expert, tokens) in routing order, each checked
        when its turn comes (a copy may land while an earlier expert computes). Those still waiting for a copy
        are held back for :meth:`landing_order`; a background copy somebody now waits for is promoted.
        Experts whose keys are in ``skip`` (already computed) are passed over."""
        if not plan.waits and not self.inflight and not skip:
            return zip(plan.gpu_experts, plan.gpu_tokens)  # no copy in flight: all are ready
        return self._ready_experts(plan, promote, skip)

    def _ready_experts(self, plan: LayerPlan, promote, skip):
        inflight = self.inflight
        waits = plan.waits
        base = plan.base
        waiting = self._waiting = []
        for e, t in zip(plan.gpu_experts, plan.gpu_tokens):
            key = base + e
            if skip and key in skip:
                continue
            job = waits.get(key) if waits else None
            if job is None:
                job = inflight.get(key)
            if job is not None and job.landed():
                if inflight.get(key) is job:
                    del inflight[key]
                job = None
            if job is None:
                yield e, t
            else:
                if job.background:
                    promote(job)
                waiting.append((job.seq, e, t, job))

    def landing_order(self) -> Sequence[tuple[int, int, int, QueuedJob]]:
        """The device experts :meth:`ready_experts` held back, as (copy's submission number, expert, tokens, job)
        in the order their copies were submitted: the driver waits for each job, then computes the expert."""
        waiting = self._waiting
        if not waiting:
            return ()
        self._waiting = ()
        waiting.sort()  # submission numbers are unique on a lane: no two entries compare further
        inflight = self.inflight
        base = self._plan.base
        for _, e, _, job in waiting:
            if inflight.get(base + e) is job:
                del inflight[base + e]  # nothing reads it while the driver waits
        return waiting
