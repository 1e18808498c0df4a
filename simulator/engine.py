"""The SimPy discrete-event engine: replays a compiled workload on a modelled machine.

Resources and who models them:

* the **GPU compute stream** is the driver process itself: one forward pass at a time, layer by layer
  (non-expert work, then the layer's experts). Work that nobody else needs to see is accumulated and
  slept in one ``timeout``; the driver only yields where another process matters (issuing a copy,
  waiting for one, handing work to the CPU), so an all-hit decode layer costs no event of its own.
* the **PCIe link**, one :class:`~moesim.simulator.transfer.Lane` per direction (host->device,
  device->host), each its own SimPy process serving copies FIFO (demand before prefetch when the policy
  says so), with the profile's contended time while the other direction is busy. Copies that a system
  issues on the compute stream (Mixtral-Offloading's swap, Fiddler's placeholder copy, accelerate's
  layer copy) are serialized into the driver's own time and only accounted on the link.
* the **CPU expert pool**, a Lane that runs CPU-placed experts (activations down, FFN, activations up)
  while the GPU continues; the layer ends when both are done.

Cache, prefetch and placement are the plain-Python policy objects of :mod:`moesim.simulator.policies`.
"""

from __future__ import annotations

from typing import Optional

import simpy

from moesim.simulator.cache import ExpertCache
from moesim.simulator.costs import CostTables
from moesim.simulator.placement import Placement
from moesim.simulator.prefetch import PrefetchContext, Prefetcher
from moesim.simulator.timeline import Timeline
from moesim.simulator.transfer import Lane, TransferSpec, stretched
from moesim.simulator.workload import ForwardStep, Workload
from moesim.tracer import DECODE


class EngineStats:
    """Counters the engine fills; turned into a :class:`SimResult` by :mod:`moesim.simulator.run`."""

    def __init__(self, num_layers: int):
        self.decode_accesses = [0] * num_layers
        self.decode_hits = [0] * num_layers
        self.prefill_accesses = 0
        self.prefill_hits = 0
        self.decode_cpu = 0
        self.prefetch_issued = 0
        self.prefetch_used = 0  # prefetched experts that were accessed before leaving
        self.prefetch_served = 0  # accesses served by a prefetch (decode)
        self.demand_loads = 0  # accesses that needed a demand load (decode, GPU-placed)
        self.stall_s = 0.0
        self.gpu_busy_s = 0.0
        self.waits = 0
        self.ttft: dict[int, float] = {}
        self.e2e: dict[int, float] = {}
        self.token_intervals: list[float] = []
        self.makespan_s = 0.0
        self.decode_time_s = 0.0
        self.decode_tokens = 0
        self.hit_records: list[tuple[tuple[int, ...], frozenset]] = []


class Simulation:
    def __init__(self, workload: Workload, costs: CostTables, cache: ExpertCache, prefetcher: Prefetcher,
                 placement: Placement, transfer: TransferSpec, hidden_size: int,
                 layer_copy_s: Optional[list[float]] = None, layer_copy_bytes: Optional[list[int]] = None,
                 record_hits: bool = False, timeline: Optional[Timeline] = None):
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
        self.env = simpy.Environment()
        record = timeline.record if timeline is not None else None
        self.h2d = Lane(self.env, "PCIe H2D", record)
        self.d2h = Lane(self.env, "PCIe D2H", record)
        self.h2d.peer, self.d2h.peer = self.d2h, self.h2d
        self.cpu = Lane(self.env, "CPU experts", record)
        self.compute_busy_until = 0.0
        self._compute_slowdown = costs.compute_slowdown_with_copy
        if costs.copy_slowdown_with_compute != 1.0 or costs.compute_slowdown_with_copy != 1.0:
            self.h2d.contended_by = lambda: self.compute_busy_until
            self.h2d.slowdown = costs.copy_slowdown_with_compute
        self._segments: list[tuple[str, str, float]] = []  # (lane, label, seconds) of the pending time
        self._inflight: dict = {}  # key -> Job loading a cached expert
        self._buffer: dict = {}  # key -> Job: prefetches held outside the cache (AdapMoE)
        self._prefetched_unused: dict = {}  # key -> True: prefetched into the cache, not used yet
        self._ctx = PrefetchContext(self.L, cache.contains)
        if transfer.on_compute_stream:
            self._copy_in = costs.h2d_by_layer if transfer.pinned else costs.h2d_pageable_by_layer
        else:
            self._copy_in = costs.h2d_by_layer
        self._copy_in_conc = costs.h2d_conc_by_layer

    # ------------------------------------------------------------------------------------------
    def run(self) -> EngineStats:
        self.env.process(self._driver())
        self.env.run()
        self.stats.makespan_s = self.env.now
        return self.stats

    def _sleep(self, duration: float) -> simpy.Event:
        """The compute stream runs the accumulated work: one timeout for all of it."""
        if self.timeline is not None:
            self.timeline.gpu_segments(self.env.now, self._segments)
            self._segments.clear()
        self.stats.waits += 1
        now = self.env.now
        if self.h2d.contended_by is not None:
            # compute and the copy in flight share the hardware: both slow down where they overlap
            copy_until = self.h2d.busy_until
            duration = stretched(duration, now, copy_until, self._compute_slowdown)
            self.h2d.slow_down_current(now, now + duration)
        self.compute_busy_until = now + duration
        return self.env.timeout(duration)

    def _driver(self):
        env = self.env
        stats = self.stats
        for batch in self.workload.batches:
            t0 = env.now
            self.prefetcher.begin_batch(batch.requests)
            last: dict[int, float] = {}
            for step in batch.prefill:
                yield from self._forward(step)
                r = step.requests[0]
                stats.ttft[r] = env.now - t0
                last[r] = env.now
            self.cache.reset_request()
            for step in batch.decode:
                t_step = env.now
                yield from self._forward(step)
                now = env.now
                stats.decode_time_s += now - t_step
                stats.decode_tokens += step.tokens
                for r in step.requests:
                    stats.token_intervals.append(now - last.get(r, t0))
                    last[r] = now
            for r in batch.requests:
                stats.e2e[r] = last.get(r, env.now) - t0
            self.cache.reset_request()
            self.prefetcher.end_batch(batch.requests)

    def _cpu_experts(self, layer: int, tokens: tuple) -> simpy.Event:
        """CPU-placed experts of one layer: their tokens' activations go down the D2H link, the CPU pool
        runs the FFNs, the outputs come back up the H2D link; the event fires when the outputs are back."""
        costs = self.costs
        n = len(tokens)
        nbytes = sum(tokens) * self.hidden_size * 2
        ffn = sum(costs.cpu_expert[t] for t in tokens)
        up = (self.h2d, sum(costs.act_h2d[t] for t in tokens), sum(costs.act_h2d_conc[t] for t in tokens), nbytes,
              f"outputs L{layer} x{n}")
        job = self.d2h.submit(sum(costs.act_d2h[t] for t in tokens), nbytes, f"activations L{layer} x{n}",
                              concurrent_duration=sum(costs.act_d2h_conc[t] for t in tokens),
                              then=((self.cpu, ffn, ffn, 0, f"cpu experts L{layer} x{n}"), up))
        return job.done

    # ------------------------------------------------------------------------------------------
    def _forward(self, step: ForwardStep):
        env = self.env
        costs = self.costs
        cache = self.cache
        stats = self.stats
        transfer = self.transfer
        prefetcher = self.prefetcher
        placement = self.placement
        L, E = self.L, self.E
        tl = self.timeline is not None
        segs = self._segments
        decode = step.phase == DECODE
        if decode:
            ne = costs.decode_non_expert[step.tokens][step.context]
            head = costs.head[step.tokens]
        else:
            ne = costs.prefill_non_expert[step.tokens]
            head = costs.head[1]
        gpu = costs.gpu_expert
        lo = costs.layer_overhead_s
        shared = costs.shared_experts * gpu[step.tokens] if costs.shared_experts else 0.0
        pending = costs.step_overhead_s + head + costs.dense_layers * ne  # GPU-stream time not yet slept
        stats.gpu_busy_s += head + costs.dense_layers * ne
        if tl:
            segs.append(("gpu", f"step {step.index} head", pending))
        on_compute = transfer.on_compute_stream
        layer_mode = transfer.mode == "layer"
        write_back = transfer.write_back
        background = transfer.demand_priority
        copy_in = self._copy_in
        copy_in_conc = self._copy_in_conc
        d2h_t = costs.d2h_by_layer
        eb = costs.expert_bytes_by_layer
        pf_active = prefetcher.active and step.phase in prefetcher.phases
        pf_observe = prefetcher.wants_observe
        place_active = placement.needs_cpu
        inflight = self._inflight
        buf = self._buffer
        unused = self._prefetched_unused
        base_clock = step.index * L
        for layer, work in enumerate(step.layers):
            pending += ne + lo + shared
            stats.gpu_busy_s += ne + shared
            if tl:
                segs.append(("gpu", f"attn L{layer}", ne + lo + shared))
            if work is None:
                continue
            clock = base_clock + layer
            experts = work.experts
            tokens = work.tokens
            if cache.uses_scores:
                cache.observe(layer, experts, work.weights)
            cpu_flags = placement.place(layer, step.phase, experts, tokens, cache.contains) if place_active else None
            if cpu_flags is None:
                gpu_e, gpu_t = experts, tokens
                cpu_t: tuple = ()
            else:
                gpu_e = tuple(e for e, c in zip(experts, cpu_flags) if not c)
                gpu_t = tuple(t for t, c in zip(tokens, cpu_flags) if not c)
                cpu_t = tuple(t for t, c in zip(tokens, cpu_flags) if c)
            acc = cache.access(layer, gpu_e, clock)
            lbase = layer * E
            served = 0
            if unused:
                for e in acc.hits:
                    if unused.pop(lbase + e, None):
                        served += 1
            misses = acc.misses
            layer_jobs: dict = {}
            if buf:
                loads = []
                for e in misses:
                    job = buf.pop(lbase + e, None)
                    if job is not None:
                        served += 1
                        layer_jobs[lbase + e] = job
                    else:
                        loads.append(e)
                for key in [k for k in buf if k // E == layer]:
                    del buf[key]  # guessed wrong: the buffer is released
            else:
                loads = misses
            stats.prefetch_used += served
            for l2, e2 in acc.evicted:
                k2 = l2 * E + e2
                unused.pop(k2, None)
                job = inflight.pop(k2, None)
                if job is not None and l2 == layer and e2 in acc.hits:
                    # a hit whose prefetch is still landing, evicted by this layer's own misses (fewer
                    # slots than experts): it is computed first, but only once its copy is in
                    layer_jobs[k2] = job
            if decode:
                stats.decode_accesses[layer] += len(experts)
                stats.decode_hits[layer] += len(acc.hits) + (len(misses) - len(loads))
                stats.decode_cpu += len(cpu_t)
                stats.prefetch_served += served
                stats.demand_loads += len(loads)
            else:
                stats.prefill_accesses += len(experts)
                stats.prefill_hits += len(acc.hits) + (len(misses) - len(loads))
            if self.record_hits:
                got = set(acc.hits)
                got.update(e for e in misses if e not in loads)
                stats.hit_records.append((work.rows, frozenset(got)))

            # --- loads of this layer's missing experts
            if layer_mode:
                if self.layer_copy_s[layer] > 0.0:
                    d = self.layer_copy_s[layer]
                    pending += d
                    stats.stall_s += d
                    self.h2d.busy_s += d
                    self.h2d.bytes += self.layer_copy_bytes[layer]
                    if tl:
                        segs.append(("h2d", f"layer copy L{layer}", d))
            elif loads and on_compute:
                d_in = copy_in[layer]
                for e in loads:
                    pending += d_in
                    stats.stall_s += d_in
                    self.h2d.busy_s += d_in
                    self.h2d.bytes += eb[layer]
                    if tl:
                        segs.append(("h2d", f"load L{layer} E{e}", d_in))
                if write_back:
                    for l2, e2 in acc.evicted:
                        d = d2h_t[l2]
                        pending += d
                        stats.stall_s += d
                        self.d2h.busy_s += d
                        self.d2h.bytes += eb[l2]
                        if tl:
                            segs.append(("d2h", f"write-back L{l2} E{e2}", d))
            elif loads:
                if pending > 0.0:
                    yield self._sleep(pending)
                    pending = 0.0
                bypassed = acc.bypassed
                for e in loads:
                    key = lbase + e
                    job = inflight.get(key)
                    if job is None:
                        job = self.h2d.submit(copy_in[layer], eb[layer], f"load L{layer} E{e}", False,
                                              copy_in_conc[layer])
                        if not bypassed or e not in bypassed:
                            inflight[key] = job
                    layer_jobs[key] = job

            # --- prefetch for later layers
            if pf_active:
                ctx = self._ctx
                ctx.layer, ctx.phase, ctx.step, ctx.work = layer, step.phase, step, work
                preds = prefetcher.predict(ctx)
                if preds:
                    if pending > 0.0:
                        yield self._sleep(pending)
                        pending = 0.0
                    protect = {lbase + e for e in gpu_e}
                    into_buffer = prefetcher.into_buffer
                    for pl, pe in preds:
                        pkey = pl * E + pe
                        if cache.contains_key(pkey) or pkey in buf:
                            continue
                        if into_buffer:
                            buf[pkey] = self.h2d.submit(copy_in[pl], eb[pl], f"prefetch L{pl} E{pe}", background,
                                                        copy_in_conc[pl])
                        else:
                            ins = cache.insert(pl, pe, clock, protect)
                            if not ins.admitted:
                                continue
                            for l2, e2 in ins.evicted:
                                k2 = l2 * E + e2
                                unused.pop(k2, None)
                                inflight.pop(k2, None)
                            inflight[pkey] = self.h2d.submit(copy_in[pl], eb[pl], f"prefetch L{pl} E{pe}",
                                                             background, copy_in_conc[pl])
                            unused[pkey] = True
                        stats.prefetch_issued += 1
            if pf_observe:
                prefetcher.observe(step, layer, work)

            # --- CPU experts run beside the GPU
            cpu_task = None
            if cpu_t:
                if pending > 0.0:
                    yield self._sleep(pending)
                    pending = 0.0
                cpu_task = self._cpu_experts(layer, cpu_t)

            # --- GPU experts: ready ones first, then each as its copy lands
            waiting = None
            for e, t in zip(gpu_e, gpu_t):
                key = lbase + e
                job = layer_jobs.get(key) if layer_jobs else None
                if job is None:
                    job = inflight.get(key)
                if job is not None and job.done.triggered:
                    if inflight.get(key) is job:
                        del inflight[key]
                    job = None
                if job is None:
                    c = gpu[t]
                    pending += c
                    stats.gpu_busy_s += c
                    if tl:
                        segs.append(("gpu", f"expert L{layer} E{e}", c))
                else:
                    if job.background:
                        self.h2d.promote(job)
                    if waiting is None:
                        waiting = []
                    waiting.append((job.seq, e, t, key, job))
            if waiting:
                waiting.sort()
                for _, e, t, key, job in waiting:
                    if not job.done.triggered:
                        if pending > 0.0:
                            yield self._sleep(pending)
                            pending = 0.0
                        if not job.done.triggered:
                            t0 = env.now
                            stats.waits += 1
                            yield job.done
                            stats.stall_s += env.now - t0
                    if inflight.get(key) is job:
                        del inflight[key]
                    c = gpu[t]
                    pending += c
                    stats.gpu_busy_s += c
                    if tl:
                        segs.append(("gpu", f"expert L{layer} E{e}", c))
            if cpu_task is not None and not cpu_task.triggered:
                if pending > 0.0:
                    yield self._sleep(pending)
                    pending = 0.0
                if not cpu_task.triggered:
                    t0 = env.now
                    stats.waits += 1
                    yield cpu_task
                    stats.stall_s += env.now - t0
        if pending > 0.0:
            yield self._sleep(pending)
            pending = 0.0
