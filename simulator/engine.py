"""The SimPy discrete-event engine: replays a compiled workload on a modelled machine.

Resources and who models them:

* the **GPU compute stream** is the driver process itself: one forward pass at a time, layer by layer
  (non-expert work, then the layer's experts). Work that nobody else needs to see is accumulated and
  slept in one ``timeout``; the driver only yields where another process matters (issuing a copy,
  waiting for one, handing work to the CPU), so an all-hit decode layer costs no event of its own.
* the **PCIe link**, one lane per direction (host->device, device->host), serving copies FIFO (demand
  before prefetch when the policy says so), with the profile's contended time while the other direction
  is busy. By default a lane is a :class:`~moesim.simulator.transfer.ClockedLane`: its copies' start and
  end times are computed without SimPy events, in SimPy's order, and the driver sleeps (one timeout per
  forward step) only to the times it computed. ``exact_events=True`` keeps the previous engine, where
  each lane is a :class:`~moesim.simulator.transfer.Lane`, a SimPy process with an event per copy: the
  oracle the exactness test compares against (kept for one release). Copies that a system
  issues on the compute stream (Mixtral-Offloading's swap, Fiddler's placeholder copy, accelerate's
  layer copy) are serialized into the driver's own time and only accounted on the link.
* the **CPU expert pool**, a Lane that runs CPU-placed experts (activations down, FFN, activations up)
  while the GPU continues; the layer ends when both are done.

Cache, prefetch and placement are the plain-Python policy objects of :mod:`moesim.simulator.policies`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import simpy

from moesim.simulator.cache import ExpertCache
from moesim.simulator.costs import CostTables, host_issues_ahead
from moesim.simulator.decide import DecisionCore, LayerPlan, RunCounters, replay_steps
from moesim.simulator.placement import Placement
from moesim.simulator.prefetch import Prefetcher
from moesim.simulator.timeline import Timeline
from moesim.simulator.transfer import ClockedLane, Lane, LaneClock, TransferSpec, stretched
from moesim.simulator.workload import ForwardStep, Workload
from moesim.tracer import DECODE


@dataclass
class EngineStats(RunCounters):
    """Counters the engine fills; turned into a :class:`SimResult` by :mod:`moesim.simulator.run`."""

    gpu_busy_s: float = 0.0
    waits: int = 0  # the driver's waits (its sleeps, and copies it waited for): the same count on either engine
    hit_records: list[tuple[tuple[int, ...], frozenset]] = field(default_factory=list)


def build_simulation(prep, objects, record_hits: bool = False, timeline: Optional[Timeline] = None,
                     exact_events: bool = False) -> "Simulation":
    """The simulation of one prepared run (:class:`~moesim.simulator.run.Prepared`) driving ``objects``
    (:class:`~moesim.simulator.run.PolicyObjects`)."""
    return Simulation(prep.workload, objects.costs, objects.cache, objects.prefetcher, objects.placement,
                      objects.transfer, prep.trace.meta.model.hidden_size, objects.layer_copy_s,
                      objects.layer_copy_bytes, record_hits=record_hits, timeline=timeline,
                      exact_events=exact_events)


class Simulation:
    def __init__(self, workload: Workload, costs: CostTables, cache: ExpertCache, prefetcher: Prefetcher,
                 placement: Placement, transfer: TransferSpec, hidden_size: int,
                 layer_copy_s: Optional[list[float]] = None, layer_copy_bytes: Optional[list[int]] = None,
                 record_hits: bool = False, timeline: Optional[Timeline] = None, exact_events: bool = False):
        self.workload = workload
        self.costs = costs
        self.cache = cache
        self.prefetcher = prefetcher
        self.placement = placement
        self.transfer = transfer
        self.hidden_size = hidden_size
        self.layer_copy_s = layer_copy_s or [0.0] * workload.num_layers
        self.layer_copy_bytes = layer_copy_bytes or [0] * workload.num_layers
        self.record_hits = record_hits
        self.timeline = timeline
        self.L, self.E = workload.num_layers, workload.num_experts
        self.stats = EngineStats(self.L)
        self.core = DecisionCore(cache, prefetcher, placement, self.stats, self.L, self.E)
        self.env = simpy.Environment()
        record = timeline.record if timeline is not None else None
        if exact_events:
            self.clock: Optional[LaneClock] = None
            self._time = self.env  # whose ``now`` is the compute stream's time
            self.h2d = Lane(self.env, "PCIe H2D", record)
            self.d2h = Lane(self.env, "PCIe D2H", record)
            self.cpu = Lane(self.env, "CPU experts", record)
            self._sleep, self._wait = self._sleep_event, self._wait_event
        else:
            clock = self.clock = LaneClock()
            self._time = clock
            self.h2d = ClockedLane(clock, "PCIe H2D", record)
            self.d2h = ClockedLane(clock, "PCIe D2H", record)
            self.cpu = ClockedLane(clock, "CPU experts", record)
            self._sleep, self._wait = self._sleep_clocked, self._wait_clocked
        self.h2d.peer, self.d2h.peer = self.d2h, self.h2d
        self.compute_busy_until = 0.0
        self._compute_slowdown = costs.compute_slowdown_with_copy
        if costs.copy_slowdown_with_compute != 1.0 or costs.compute_slowdown_with_copy != 1.0:
            self.h2d.contended_by = lambda: self.compute_busy_until
            self.h2d.slowdown = costs.copy_slowdown_with_compute
        self._serial_copies = transfer.default_stream and not transfer.on_compute_stream
        if self._serial_copies:
            # cudaMemcpy on the legacy default stream: a copy waits for the kernels issued before it
            self.h2d.contended_by = lambda: self.compute_busy_until
            self.h2d.slowdown = math.inf
        self._segments: list[tuple[str, str, float]] = []  # (lane, label, seconds) of the pending time
        if transfer.on_compute_stream:
            self._copy_in = costs.h2d_by_layer if transfer.pinned else costs.h2d_pageable_by_layer
        else:
            self._copy_in = costs.h2d_by_layer
        self._copy_in_conc = costs.h2d_conc_by_layer
        self._expert_bytes = costs.expert_bytes_by_layer
        self._prefetch_background = transfer.demand_priority
        # A profile that times the non-expert layer's kernels apart from its launches lets the host issue a
        # layer while the GPU still runs the previous one (the loop only waits at each router's read-back).
        # Not where the host itself is held by the copies: accelerate's per-parameter layer copies and the
        # default-stream copies are synchronous for it.
        self._host_ahead = host_issues_ahead(costs, transfer)

    # ------------------------------------------------------------------------------------------
    def run(self) -> EngineStats:
        self.env.process(self._driver() if self.clock is None else self._clocked_driver())
        self.env.run()
        self.stats.makespan_s = self.env.now
        return self.stats

    def _stream_time(self, now: float, duration: float) -> float:
        """How long the compute stream takes, from ``now``, to run ``duration`` of accumulated work (both engines
        sleep this long), with the copy in flight accounted."""
        # default-stream copies: the kernels wait for the copy in flight, a stall
        waited = max(self.h2d.busy_until - now, 0.0) if self._serial_copies else 0.0
        if self.timeline is not None:
            self.timeline.gpu_segments(now + waited, self._segments)
            self._segments.clear()
        self.stats.waits += 1
        if self._serial_copies:
            duration += waited
            self.stats.stall_s += waited
        elif self.h2d.contended_by is not None:
            # compute and the copy in flight share the hardware: both slow down where they overlap
            duration = stretched(duration, now, self.h2d.busy_until, self._compute_slowdown)
            self.h2d.slow_down_current(now, now + duration)
        self.compute_busy_until = now + duration
        return duration

    def _sleep_event(self, duration: float) -> simpy.Event:
        """The compute stream runs the accumulated work: one timeout for all of it."""
        return self.env.timeout(self._stream_time(self.env.now, duration))

    def _wait_event(self, job) -> simpy.Event:
        return job.done

    def _driver(self):
        env = self.env
        for step in replay_steps(self.workload.batches, self.stats, self.cache, self.prefetcher, lambda: env.now):
            yield from self._forward(step)

    # ---- the clocked path: the driver keeps the time, the lanes are computed up to it
    def _sleep_clocked(self, duration: float) -> None:
        """As :meth:`_sleep_event`, without the timeout: the lanes are served up to the sleep's end, in the
        order SimPy would have served them, and the compute stream's time moves on."""
        clock = self.clock
        now = clock.now
        end = now + self._stream_time(now, duration)
        clock.order += 1
        if clock.lanes:
            clock.advance(end, clock.order)
        clock.now = end

    def _wait_clocked(self, job) -> None:
        """The compute stream waits for ``job``'s chain: its lanes are served until it is done."""
        clock = self.clock
        clock.run_until_done(job)
        root = job.root
        clock.advance(root.done_at, root.done_order)
        clock.now = root.done_at

    def _clocked_driver(self):
        """The driver as one SimPy process that yields once per forward step, to the step's computed end."""
        clock = self.clock
        for step in replay_steps(self.workload.batches, self.stats, self.cache, self.prefetcher,
                                 lambda: clock.now):
            for _ in self._forward(step):
                pass
            yield self._timeout_until(clock.now)
        yield self._timeout_until(clock.drain())

    def _timeout_until(self, t: float) -> simpy.Event:
        """A timeout that ends exactly at ``t`` (``now + (t - now)`` can miss ``t`` by a rounding)."""
        now = self.env.now
        delay = max(t - now, 0.0)
        for _ in range(4):
            if now + delay < t:
                delay = math.nextafter(delay, math.inf)
            elif now + delay > t and delay > 0.0:
                delay = math.nextafter(delay, 0.0)
            else:
                break
        return self.env.timeout(delay)

    def _cpu_experts(self, layer: int, tokens: tuple):
        """CPU-placed experts of one layer: their tokens' activations go down the D2H link, the CPU pool
        runs the FFNs, the outputs come back up the H2D link; the job has landed when the outputs are back."""
        costs = self.costs
        n = len(tokens)
        nbytes = sum(tokens) * self.hidden_size * 2
        if n == 1:  # the common case: one CPU expert, whose costs are the table's entries (a sum of one is exact)
            t = tokens[0]
            ffn, up_s, up_conc = costs.cpu_expert[t], costs.act_h2d[t], costs.act_h2d_conc[t]
            down_s, down_conc = costs.act_d2h[t], costs.act_d2h_conc[t]
        else:
            ffn = sum(costs.cpu_expert[t] for t in tokens)
            up_s, up_conc = sum(costs.act_h2d[t] for t in tokens), sum(costs.act_h2d_conc[t] for t in tokens)
            down_s, down_conc = sum(costs.act_d2h[t] for t in tokens), sum(costs.act_d2h_conc[t] for t in tokens)
        up = (self.h2d, up_s, up_conc, nbytes, f"outputs L{layer} x{n}")
        job = self.d2h.submit(down_s, nbytes, f"activations L{layer} x{n}", concurrent_duration=down_conc,
                              then=((self.cpu, ffn, ffn, 0, f"cpu experts L{layer} x{n}"), up))
        return job

    # ---- copies: on a lane (the decision core asks for them), or serialized into the compute stream
    def _submit_load(self, plan: LayerPlan, e: int, key: int, kept: bool):
        layer = plan.layer
        return self.h2d.submit(self._copy_in[layer], self._expert_bytes[layer], f"load L{layer} E{e}", False,
                               self._copy_in_conc[layer])

    def _submit_prefetch(self, layer: int, e: int, key: int):
        return self.h2d.submit(self._copy_in[layer], self._expert_bytes[layer], f"prefetch L{layer} E{e}",
                               self._prefetch_background, self._copy_in_conc[layer])

    def _inline_copies(self, plan: LayerPlan, pending: float) -> float:
        """Loads (and Mixtral-Offloading's write-backs of the evicted) issued on the compute stream: the stream
        copies, so each adds to the pending compute time and counts as a stall."""
        stats = self.stats
        layer = plan.layer
        eb = self.costs.expert_bytes_by_layer
        tl = self.timeline is not None
        d_in = self._copy_in[layer]
        for e in plan.loads:
            pending += d_in
            stats.stall_s += d_in
            self.h2d.busy_s += d_in
            self.h2d.bytes += eb[layer]
            if tl:
                self._segments.append(("h2d", f"load L{layer} E{e}", d_in))
        if self.transfer.write_back:
            d2h_t = self.costs.d2h_by_layer
            for l2, e2 in plan.access.evicted:
                d = d2h_t[l2]
                pending += d
                stats.stall_s += d
                self.d2h.busy_s += d
                self.d2h.bytes += eb[l2]
                if tl:
                    self._segments.append(("d2h", f"write-back L{l2} E{e2}", d))
        return pending

    def _layer_copy(self, layer: int, pending: float) -> float:
        """accelerate: the layer's offloaded experts, copied whole on the compute stream every forward pass."""
        d = self.layer_copy_s[layer]
        if d > 0.0:
            pending += d
            self.stats.stall_s += d
            self.h2d.busy_s += d
            self.h2d.bytes += self.layer_copy_bytes[layer]
            if self.timeline is not None:
                self._segments.append(("h2d", f"layer copy L{layer}", d))
        return pending

    def _record_hits(self, plan: LayerPlan) -> None:
        got = set(plan.access.hits)
        got.update(e for e in plan.access.misses if e not in plan.loads)
        self.stats.hit_records.append((plan.work.rows, frozenset(got)))

    # ------------------------------------------------------------------------------------------
    def _stall_for(self, job, pending: float):
        """The stream runs its pending work, then waits for ``job`` if it has still not landed: a stall."""
        if pending > 0.0:
            yield self._sleep(pending)
        if not job.landed():
            clock = self._time
            t0 = clock.now
            self.stats.waits += 1
            yield self._wait(job)
            self.stats.stall_s += clock.now - t0

    def _forward(self, step: ForwardStep):
        """One forward pass on the compute stream: the decision core decides each MoE layer, this driver
        turns the decisions into modelled time, sleeping only where another process matters."""
        sleep = self._sleep
        costs = self.costs
        core = self.core
        stats = self.stats
        transfer = self.transfer
        tl = self.timeline is not None
        segs = self._segments
        if step.phase == DECODE:
            ne = costs.decode_non_expert[step.tokens][step.context]
            head = costs.head[step.tokens]
        else:
            ne = costs.prefill_non_expert[step.tokens]
            head = costs.head[1]
        gpu = costs.gpu_expert
        lo = costs.layer_overhead_s
        shared = costs.shared_experts * gpu[step.tokens] if costs.shared_experts else 0.0
        pending = costs.step_overhead_s + head + costs.dense_layers * ne  # GPU-stream time not yet slept
        busy = stats.gpu_busy_s + (head + costs.dense_layers * ne)  # stats.gpu_busy_s, summed locally
        if tl:
            segs.append(("gpu", f"step {step.index} head", pending))
        on_compute = transfer.on_compute_stream
        layer_mode = transfer.mode == "layer"
        record_hits = self.record_hits
        begin_layer, issue_prefetches = core.begin_layer, core.issue_prefetches
        ready_experts, landing_order = core.ready_experts, core.landing_order
        promote = self.h2d.promote
        attention = ne + lo + shared  # each MoE layer's attention, router and shared experts on the stream
        attention_busy = ne + shared
        drop_queued = core.replaces_queue and step.phase in core.prefetcher.phases
        host_ahead = self._host_ahead
        if host_ahead:
            clock = self._time
            ne_gpu = (costs.decode_non_expert_device[step.tokens][step.context] if step.phase == DECODE
                      else costs.prefill_non_expert_device[step.tokens])
            attention_busy = ne_gpu + shared
            host_at = clock.now + pending  # the host has issued the step's start (head, dense layers)
        for layer, work in enumerate(step.layers):
            if host_ahead:
                # The host launches the layer (``ne``, launch-bound) from where it left the previous one, the
                # GPU runs its kernels (``ne_gpu``) once it has finished the work queued before them, and the
                # router's read-back waits for both; the per-layer overhead then delays the expert launches.
                now = clock.now
                end = max(now + pending + attention_busy, host_at + ne + shared)
                if tl:
                    segs.append(("gpu", f"attn L{layer}", end + lo - now - pending))
                pending = end + lo - now
                host_at = end + lo
            else:
                pending += attention
                if tl:
                    segs.append(("gpu", f"attn L{layer}", attention))
            busy += attention_busy
            if work is None:
                continue
            if drop_queued:  # the layer's prefetch call clears the queue once its attention has run
                if pending > 0.0:
                    yield sleep(pending)
                    pending = 0.0
                core.drop_queued_prefetches(self.h2d.withdraw)
            plan = begin_layer(step, layer, work)
            if record_hits:
                self._record_hits(plan)

            # --- loads of this layer's missing experts
            if layer_mode:
                pending = self._layer_copy(layer, pending)
            elif plan.loads and on_compute:
                pending = self._inline_copies(plan, pending)
                if host_ahead and not transfer.pinned:  # a pageable copy returns to the host once it is done
                    host_at = clock.now + pending
            elif plan.loads:
                if pending > 0.0:
                    yield sleep(pending)
                    pending = 0.0
                core.stream_loads(plan, self._submit_load)

            # --- prefetch for later layers
            if plan.prefetches:
                if pending > 0.0:
                    yield sleep(pending)
                    pending = 0.0
                issue_prefetches(plan, self._submit_prefetch)

            # --- CPU experts run beside the GPU
            cpu_task = None
            if plan.cpu_tokens:
                if pending > 0.0:
                    yield sleep(pending)
                    pending = 0.0
                cpu_task = self._cpu_experts(layer, plan.cpu_tokens)

            # --- GPU experts: ready ones first, then each as its copy lands
            for e, t in ready_experts(plan, promote):
                c = gpu[t]
                pending += c
                busy += c
                if tl:
                    segs.append(("gpu", f"expert L{layer} E{e}", c))
            for _, e, t, job in landing_order():
                if not job.landed():
                    yield from self._stall_for(job, pending)
                    pending = 0.0
                c = gpu[t]
                pending += c
                busy += c
                if tl:
                    segs.append(("gpu", f"expert L{layer} E{e}", c))
            if cpu_task is not None and not cpu_task.landed():
                yield from self._stall_for(cpu_task, pending)
                pending = 0.0
            if cpu_task is not None and host_ahead:
                # the host takes the CPU experts' outputs once they are done (the driver's time, after a stall)
                host_at = max(host_at, clock.now)
        stats.gpu_busy_s = busy
        if pending > 0.0:
            yield sleep(pending)
            pending = 0.0
