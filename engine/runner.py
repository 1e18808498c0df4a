"""The offloading executor: runs a compiled workload through the model, making the policy objects' decisions.

:class:`OffloadEngine` owns what does not change between runs (the model's non-expert modules on the
device, the experts in host memory, the per-step routing tensors); :meth:`OffloadEngine.run` takes the
simulator's :class:`~moesim.simulator.run.Prepared` and fresh policy objects and replays the workload,
timing each forward step as a generate loop would. Each MoE layer is
:meth:`_Run.layer`, a line-by-line counterpart of :meth:`moesim.simulator.engine.Simulation._forward`:
the same calls on the same objects in the same order (``observe``, ``place``, ``access``, the side-buffer
and prefetch bookkeeping, ``predict``/``insert``, ``observe``), with real work where the simulator adds
modelled time:

================  ==========================================  ==========================================
transfer          loads                                        experts
================  ==========================================  ==========================================
swap              inline on the compute stream, evicted       each as soon as its weights are in place
                  expert written back device->host first
sync              inline from pageable memory into the        (the same)
                  staging buffer (Fiddler's placeholder)
stream            on the copy lane (CUDA copy stream / copy   ready ones first, then each after its own
                  thread), demand before queued prefetches    copy's event, in submission order
                  when the policy says so
layer             every missing expert of the layer, inline,  (the same)
                  into staging buffers (accelerate)
================  ==========================================  ==========================================

CPU-placed experts (Fiddler, HybriMoE) run on the CPU lane, a worker thread that copies their tokens'
activations to the host, runs the FFNs on the host weights and copies the outputs back, while the main
thread runs the device experts. Device buffers are reused only after the last compute that reads them
(see :mod:`moesim.engine.store`), so a step that needs more experts than there are slots streams them
through, as Mixtral-Offloading's prefill does.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from moesim.engine.kernels import ExpertFormat, ExpertTensors
from moesim.engine.lanes import Job, Lane, Marker
from moesim.engine.memory import kv_cache_bytes
from moesim.hfcompat import cache_argument, returned_cache
from moesim.simulator.run import PolicyObjects
from moesim.engine.store import BufferPool, DeviceBuffer, HostStore, copy_expert, new_bounce
from moesim.errors import MoesimError
from moesim.simulator.gating import keep_mask
from moesim.simulator.prefetch import PrefetchContext
from moesim.simulator.run import Prepared
from moesim.simulator.workload import ForwardStep, Workload
from moesim.tracer import DECODE, Trace


@dataclass
class RouteEntry:
    """One expert of one layer-step: which of the step's token rows it takes, with which weights."""

    idx: Optional[torch.Tensor]  # None: every row of the step (a one-token decode step)
    weight: object  # float when idx is None, else a [n, 1] tensor


@dataclass
class EngineStats:
    """Counters named as the simulator's :class:`moesim.simulator.engine.EngineStats`, plus measurements."""

    num_layers: int
    decode_accesses: list[int] = field(default_factory=list)
    decode_hits: list[int] = field(default_factory=list)
    prefill_accesses: int = 0
    prefill_hits: int = 0
    decode_cpu: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_served: int = 0
    demand_loads: int = 0
    ttft: dict[int, float] = field(default_factory=dict)
    e2e: dict[int, float] = field(default_factory=dict)
    token_intervals: list[float] = field(default_factory=list)
    step_times: list[tuple[int, int, float]] = field(default_factory=list)  # (step index, phase, seconds)
    makespan_s: float = 0.0
    decode_time_s: float = 0.0
    decode_tokens: int = 0
    h2d_bytes: int = 0  # expert loads and CPU experts' outputs
    d2h_bytes: int = 0  # write-backs and CPU experts' activations
    inline_copies: int = 0
    lane_copies: int = 0
    scratch_copies: int = 0  # copies of experts evicted before their copy started (redirected)
    extra_buffers: int = 0  # device buffers beyond the memory plan (bypassed loads with no staging buffer)
    kv_peak_bytes: int = 0  # the largest KV cache of the run
    stall_s: float = 0.0  # CPU-as-device: the compute thread waiting for copies and CPU experts
    outputs: list = field(default_factory=list)  # per step, the last logits row (when the engine records outputs)
    copy_times: list = field(default_factory=list)  # (pinned, seconds or a CUDA event pair) per expert copy
    expert_times: list = field(default_factory=list)  # CPU-as-device: (tokens, seconds, phase) per device expert FFN

    def copy_seconds(self) -> list[tuple[bool, float]]:
        out = []
        for pinned, t in self.copy_times:
            if isinstance(t, tuple):
                start, end = t
                end.synchronize()
                t = start.elapsed_time(end) / 1e3
            out.append((pinned, float(t)))
        return out

    def __post_init__(self):
        self.decode_accesses = [0] * self.num_layers
        self.decode_hits = [0] * self.num_layers


class _BufEntry:
    __slots__ = ("job", "buffer")

    def __init__(self, job: Job, buffer: DeviceBuffer):
        self.job = job
        self.buffer = buffer


class OffloadEngine:
    """Model + host experts + routing tensors for one (trace, model, format, device)."""

    def __init__(self, model: torch.nn.Module, store: HostStore, trace: Trace, device: torch.device,
                 act_dtype: torch.dtype, fmt: ExpertFormat, seed: int = 0):
        self.model = model
        self.store = store
        self._stores = {store.pinned: store}
        self.trace = trace
        self.device = device
        self.cuda = device.type == "cuda"
        self.act_dtype = act_dtype
        self.fmt = fmt
        self.seed = seed
        self.L = trace.meta.num_layers
        self.E = trace.meta.num_experts
        self.record_outputs = False  # keep each step's logits (tests: outputs must not depend on the policy)
        self._run: Optional[_Run] = None
        self._pool: Optional[BufferPool] = None
        self._routes: dict = {}
        self._prompts: dict[int, torch.Tensor] = {}
        self.vocab = int(getattr(model.config, "vocab_size", None) or model.get_output_embeddings().weight.shape[0])

    def release_buffers(self) -> None:
        self._pool = None
        if self.cuda:
            torch.cuda.empty_cache()

    def store_for(self, pinned: bool) -> HostStore:
        if pinned not in self._stores:
            self._stores[pinned] = self.store.with_pinning(pinned, self.cuda)
        return self._stores[pinned]

    # ---- the hook the model's MoE blocks call
    def run_layer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        run = self._run
        if run is None:  # a forward outside a run (e.g. a smoke test): no experts
            return torch.zeros_like(hidden)
        return run.layer(layer, hidden)

    # ---- routing tensors, built before timing
    def _routes_for(self, workload: Workload, gating) -> dict:
        key = (id(workload), gating)
        if key in self._routes:
            return self._routes[key]
        c = self.trace.cells
        keep = keep_mask(c.weights, c.layer, c.phase == DECODE, gating, self.L)
        experts = c.experts.astype(np.int64)
        weights = c.weights.astype(np.float64)
        positions = c.position
        routes: dict[tuple[int, int], dict[int, RouteEntry]] = {}
        for step in workload.steps():
            if step.phase == DECODE:
                if len(step.requests) != 1:
                    raise MoesimError(f"--batch {len(step.requests)}: the engine runs one request at a time "
                                      f"(batch 1); expected --batch 1")
            for layer, work in enumerate(step.layers):
                if work is None:
                    continue
                rows = list(work.rows)
                if step.phase == DECODE:
                    token_of = {r: 0 for r in rows}
                else:
                    order = sorted({int(positions[r]) for r in rows})
                    rank = {p: i for i, p in enumerate(order)}
                    token_of = {r: rank[int(positions[r])] for r in rows}
                per: dict[int, tuple[list[int], list[float]]] = {}
                for r in rows:
                    for s in range(experts.shape[1]):
                        if keep[r, s]:
                            t, w = per.setdefault(int(experts[r, s]), ([], []))
                            t.append(token_of[r])
                            w.append(float(weights[r, s]))
                entries = {}
                for e, n in zip(work.experts, work.tokens):
                    t, w = per[e]
                    if len(t) != n:
                        raise RuntimeError(f"engine routing: expert {e} of layer {layer} step {step.index} has "
                                           f"{len(t)} tokens, the workload says {n}")
                    if step.tokens == 1 and len(t) == 1:
                        entries[e] = RouteEntry(None, w[0])
                    else:
                        entries[e] = RouteEntry(
                            torch.tensor(t, dtype=torch.long, device=self.device),
                            torch.tensor(w, dtype=self.act_dtype, device=self.device)[:, None])
                routes[(step.index, layer)] = entries
        self._routes[key] = routes
        return routes

    def _prompt(self, request: int, length: int) -> torch.Tensor:
        if request not in self._prompts:
            c = self.trace.cells
            ids = None
            if c.token_id is not None:
                sel = (c.request == request) & (c.phase != DECODE) & (c.layer == 0)
                pos = c.position[sel]
                tok = c.token_id[sel][np.argsort(pos)]
                if tok.size == length and (tok >= 0).all() and (tok < self.vocab).all():
                    ids = torch.as_tensor(tok.astype(np.int64))
            if ids is None:
                g = torch.Generator().manual_seed(self.seed * 7919 + request)
                ids = torch.randint(0, self.vocab, (length,), generator=g)
            self._prompts[request] = ids[None, :].to(self.device)
        return self._prompts[request]

    # ---- a run
    def run(self, prep: Prepared, objects: PolicyObjects, warmup: Optional[PolicyObjects] = None,
            warmup_decode_steps: int = 3) -> EngineStats:
        """Replay ``prep``'s workload with ``objects``; first an untimed warm-up with ``warmup``'s objects
        (the first request's prefill and ``warmup_decode_steps`` decode steps), then the measured run
        from the policy's initial state."""
        workload = prep.workload
        routes = self._routes_for(workload, prep.policy.gating)
        for b in workload.batches:
            for s in b.prefill:
                self._prompt(s.requests[0], s.tokens)
        if warmup is not None and workload.batches:
            first = workload.batches[0]
            steps = first.decode[:warmup_decode_steps]
            run = _Run(self, prep, warmup, routes)
            self._run = run
            try:
                run.replay([type(first)(first.requests, first.prefill, steps)], timed=False)
            finally:
                self._run = None
                run.close()
        run = _Run(self, prep, objects, routes)
        self._run = run
        try:
            run.replay(workload.batches, timed=True)
        finally:
            self._run = None
            run.close()
        return run.stats


class _Run:
    """One replay: the policy objects, the device buffers' ownership, the lanes and the counters."""

    def __init__(self, engine: OffloadEngine, prep: Prepared, objects: PolicyObjects, routes: dict):
        self.engine = engine
        self.prep = prep
        self.o = objects
        self.routes = routes
        self.cuda = engine.cuda
        self.device = engine.device
        self.L, self.E = engine.L, engine.E
        t = objects.transfer
        self.transfer = t
        self.store = engine.store_for(t.pinned)
        self.cpu_store = self.store
        if objects.placement.needs_cpu:
            self._check_cpu_store()
        self.stats = EngineStats(self.L)
        plan = prep.plan
        max_eb = max(prep.expert_bytes)
        staging = t.staging_experts if t.mode != "layer" else self.E
        count = plan.slots + staging + t.prefetch_buffer_experts
        if count < 1:
            raise MoesimError("the memory plan has no expert buffer on the device: expected --cache-experts >= 1")
        if engine._pool is None or engine._pool.planned != count:
            engine.release_buffers()
            engine._pool = BufferPool(self.store.template(), count, self.device)
        pool = engine._pool
        self.pool = pool
        if self.store.expert_bytes != max_eb:
            raise RuntimeError(f"engine: host experts are {self.store.expert_bytes} bytes, the plan says {max_eb}")
        self.h2d = Lane("h2d", self.device)
        self.cpu_lane = Lane("cpu-experts", self.device, depth=1) if objects.placement.needs_cpu else None
        self.compute_stream = torch.cuda.current_stream(self.device) if self.cuda else None
        self.bounce = new_bounce() if not self.cuda else None
        self.lane_bounce = new_bounce() if not self.cuda else None
        self.scratch: Optional[ExpertTensors] = None
        self.inflight: dict[int, Job] = {}
        self.buf: dict[int, _BufEntry] = {}
        self.unused: dict[int, bool] = {}
        self.ctx = PrefetchContext(self.L, objects.cache.contains)
        self.step: Optional[ForwardStep] = None
        self.layer_staging: list[DeviceBuffer] = []
        self.layer_missing: list[list[int]] = []
        self.timed = False
        self._preload()

    def _check_cpu_store(self) -> None:
        fmt = self.engine.fmt
        if self.cuda and fmt.variant not in ("bf16", "int8/pack"):
            raise MoesimError(f"--expert-format {fmt.kernel}: CPU-placed experts need weights the host CPU can "
                              f"run, and the host copy is packed for the GPU's {fmt.variant} kernel; expected bf16 "
                              f"for policies that compute experts on the CPU")

    def close(self) -> None:
        for lane in (self.h2d, self.cpu_lane):
            if lane is not None:
                try:
                    lane.drain()
                finally:
                    lane.close()

    # ---- initial residency (not timed)
    def _preload(self) -> None:
        pool = self.pool
        pool.reset()
        cache = self.o.cache
        if self.transfer.mode == "layer":
            self.layer_staging = [pool.take(lambda: False) for _ in range(self.E)]
            self.layer_missing = [[e for e in range(self.E) if not cache.contains(layer, e)] for layer in range(self.L)]
        for key in cache.resident_keys():
            b = pool.take(lambda: False)
            pool.bind(key, b)
            copy_expert(b.expert, self.store[key], True, None)
        if self.cuda:
            torch.cuda.synchronize(self.device)

    # ---- timing
    def _now(self) -> float:
        return time.perf_counter()

    def replay(self, batches, timed: bool) -> None:
        self.timed = timed
        st = self.stats
        cache, prefetcher = self.o.cache, self.o.prefetcher
        engine = self.engine
        if self.cuda:
            torch.cuda.synchronize(self.device)
        t_start = self._now()
        with torch.no_grad():
            for batch in batches:
                t0 = self._now()
                prefetcher.begin_batch(batch.requests)
                last: dict[int, float] = {}
                kv = None
                next_ids = None
                for step in batch.prefill:
                    r = step.requests[0]
                    ids = engine._prompt(r, step.tokens)
                    ts = self._now()
                    next_ids, kv = self._forward(step, ids, None)
                    now = self._now()
                    st.step_times.append((step.index, step.phase, now - ts))
                    st.ttft[r] = now - t0
                    last[r] = now
                cache.reset_request()
                for step in batch.decode:
                    ts = self._now()
                    next_ids, kv = self._forward(step, next_ids, kv)
                    now = self._now()
                    st.step_times.append((step.index, step.phase, now - ts))
                    st.decode_time_s += now - ts
                    st.decode_tokens += step.tokens
                    for r in step.requests:
                        st.token_intervals.append(now - last.get(r, t0))
                        last[r] = now
                for r in batch.requests:
                    st.e2e[r] = last.get(r, self._now()) - t0
                st.kv_peak_bytes = max(st.kv_peak_bytes, kv_cache_bytes(kv))
                cache.reset_request()
                prefetcher.end_batch(batch.requests)
                del kv
        st.makespan_s = self._now() - t_start
        self.h2d.drain()
        st.extra_buffers = self.pool.extra
        st.h2d_bytes += self.h2d.bytes
        st.lane_copies = self.h2d.jobs

    def _forward(self, step: ForwardStep, ids: torch.Tensor, kv):
        self.step = step
        try:
            out = self.engine.model(input_ids=ids, use_cache=True, logits_to_keep=1,
                                    **{cache_argument(self.engine.model): kv})
        finally:
            self.step = None
        logits = out.logits[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        int(nxt[0, 0])  # the generate loop reads the token: the step ends when the device is done
        if self.engine.record_outputs and self.timed:
            self.stats.outputs.append(logits[0].float().cpu())
        for lane in (self.h2d, self.cpu_lane):
            if lane is not None:
                lane.check()
        return nxt, returned_cache(out)

    # ---- buffers
    def _release_victim(self, key: int, buf: DeviceBuffer, needed: dict) -> None:
        """A policy evicted ``key``: its buffer becomes free (written back first under swap)."""
        job = buf.job
        if key not in needed and job is not None and not job.started:
            self.h2d.cancel(job)  # a queued load of an expert nobody will read: do not let it overwrite
        if self.transfer.write_back:
            self._write_back(key, buf)
        self.pool.release(buf)

    def _write_back(self, key: int, buf: DeviceBuffer) -> None:
        host = self.store[key]
        t0 = time.perf_counter()
        n = copy_expert(host, buf.expert, self.transfer.pinned, self.bounce)
        if not self.cuda:
            self.stats.stall_s += time.perf_counter() - t0
        self.stats.d2h_bytes += n
        self.stats.inline_copies += 1

    def _copy_job(self, key: int, buf: DeviceBuffer, fence: Marker):
        src = self.store[key]
        pinned = self.transfer.pinned

        def run(job: Job, stream):
            fence.make_stream_wait(stream)
            dst = buf.expert
            if job.cancelled:
                if self.scratch is None:
                    self.scratch = src.empty_like(self.device)
                dst = self.scratch
                self.stats.scratch_copies += 1
            timer = self._copy_timer(stream)
            copy_expert(dst, src, pinned, self.lane_bounce)
            self._copy_timed(timer, stream, pinned)

        return run

    def _copy_timer(self, stream):
        if not self.timed:
            return None
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            return start
        return time.perf_counter()

    def _copy_timed(self, timer, stream, pinned: bool) -> None:
        if timer is None:
            return
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record(stream)
            self.stats.copy_times.append((pinned, (timer, end)))
        else:
            self.stats.copy_times.append((pinned, time.perf_counter() - timer))

    def _inline_load(self, key: int, buf: DeviceBuffer) -> None:
        if buf.job is not None and not buf.job.cancelled:
            buf.job.done.make_stream_wait(self.compute_stream)  # a prefetch still writing this buffer
        buf.job = None
        timer = self._copy_timer(self.compute_stream)
        t0 = time.perf_counter()
        n = copy_expert(buf.expert, self.store[key], self.transfer.pinned, self.bounce)
        if not self.cuda:  # the compute stream does the copy: as the simulator, count it as a stall
            self.stats.stall_s += time.perf_counter() - t0
        self._copy_timed(timer, self.compute_stream, self.transfer.pinned)
        self.stats.h2d_bytes += n
        self.stats.inline_copies += 1

    # ---- compute
    def _compute(self, key: int, buf: DeviceBuffer, entry: RouteEntry, hidden: torch.Tensor, out: torch.Tensor,
                 marker: Marker) -> None:
        t0 = time.perf_counter()
        expert = buf.expert
        if entry.idx is None:
            out.add_(expert.forward(hidden), alpha=entry.weight)
        else:
            y = expert.forward(hidden.index_select(0, entry.idx))
            out.index_add_(0, entry.idx, y * entry.weight)
        marker.record(self.compute_stream)
        if not self.cuda and self.timed:
            n = hidden.shape[0] if entry.idx is None else entry.idx.numel()
            self.stats.expert_times.append((n, time.perf_counter() - t0, self.step.phase))

    def _cpu_job(self, layer: int, cpu_e: tuple, entries: dict, hidden: torch.Tensor):
        lbase = layer * self.E
        ready = Marker(self.cuda, f"L{layer} input")
        ready.record(self.compute_stream)
        store = self.cpu_store
        device = self.device
        act = self.engine.act_dtype
        work = [(lbase + e, entries[e]) for e in cpu_e]
        result: dict = {}
        nbytes = sum((hidden.shape[0] if en.idx is None else en.idx.numel()) * hidden.shape[1] * hidden.element_size()
                     for _, en in work)

        def run(job: Job, stream):
            ready.make_stream_wait(stream)
            out = torch.zeros_like(hidden)
            for key, en in work:
                rows = hidden if en.idx is None else hidden.index_select(0, en.idx)
                x = rows.to("cpu") if self.cuda else rows.clone()  # activations down
                y = store[key].forward(x.to(act))
                y = y.to(device) if self.cuda else y.clone()  # outputs up
                if en.idx is None:
                    out.add_(y, alpha=en.weight)
                else:
                    out.index_add_(0, en.idx, y * en.weight)
            result["out"] = out

        job = self.cpu_lane.submit(run, 0, f"cpu experts L{layer} x{len(cpu_e)}")
        self.stats.d2h_bytes += nbytes
        self.stats.h2d_bytes += nbytes
        return job, result

    # ---- one MoE layer of the current step: the counterpart of Simulation._forward's loop body
    def layer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        step = self.step
        out = torch.zeros_like(hidden)
        work = step.layers[layer]
        if work is None:
            return out
        o = self.o
        cache, prefetcher, placement = o.cache, o.prefetcher, o.placement
        transfer = self.transfer
        stats = self.stats
        pool = self.pool
        E = self.E
        inflight, buf, unused = self.inflight, self.buf, self.unused
        decode = step.phase == DECODE
        clock = step.index * self.L + layer
        experts = work.experts
        tokens = work.tokens
        entries = self.routes[(step.index, layer)]
        if cache.uses_scores:
            cache.observe(layer, experts, work.weights)
        place_active = placement.needs_cpu
        cpu_flags = placement.place(layer, step.phase, experts, tokens, cache.contains) if place_active else None
        if cpu_flags is None:
            gpu_e: tuple = experts
            cpu_e: tuple = ()
        else:
            gpu_e = tuple(e for e, c in zip(experts, cpu_flags) if not c)
            cpu_e = tuple(e for e, c in zip(experts, cpu_flags) if c)
        acc = cache.access(layer, gpu_e, clock)
        lbase = layer * E
        served = 0
        if unused:
            for e in acc.hits:
                if unused.pop(lbase + e, None):
                    served += 1
        misses = acc.misses
        layer_jobs: dict[int, Job] = {}
        from_buffer: dict[int, DeviceBuffer] = {}
        if buf:
            loads = []
            for e in misses:
                entry = buf.pop(lbase + e, None)
                if entry is not None:
                    served += 1
                    layer_jobs[lbase + e] = entry.job
                    from_buffer[lbase + e] = entry.buffer
                else:
                    loads.append(e)
            for key in [k for k in buf if k // E == layer]:
                pool.release(buf.pop(key).buffer)  # guessed wrong: the buffer is released
        else:
            loads = misses
        stats.prefetch_used += served
        for l2, e2 in acc.evicted:
            k2 = l2 * E + e2
            unused.pop(k2, None)
            job = inflight.pop(k2, None)
            if job is not None and l2 == layer and e2 in acc.hits:
                layer_jobs[k2] = job  # a hit still landing, evicted by this layer's misses: wait for its copy
        if decode:
            stats.decode_accesses[layer] += len(experts)
            stats.decode_hits[layer] += len(acc.hits) + (len(misses) - len(loads))
            stats.decode_cpu += len(cpu_e)
            stats.prefetch_served += served
            stats.demand_loads += len(loads)
        else:
            stats.prefill_accesses += len(experts)
            stats.prefill_hits += len(acc.hits) + (len(misses) - len(loads))

        # --- device buffers of this step's device experts: who reads which buffer
        markers = {lbase + e: Marker(self.cuda, f"compute L{layer} E{e}") for e in gpu_e}
        step_buf: dict[int, DeviceBuffer] = {}
        for e in acc.hits:
            key = lbase + e
            b = pool.owner[key]
            b.last_use = markers[key]
            step_buf[key] = b
        for key, b in from_buffer.items():
            pool.bind(key, b)
            b.last_use = markers[key]
            step_buf[key] = b
        victims = deque((l2 * E + e2) for l2, e2 in acc.evicted)

        def release_next() -> bool:
            while victims:
                v = victims.popleft()
                vb = pool.owner.get(v)
                if vb is not None:
                    self._release_victim(v, vb, markers)
                    return True
            return False

        bypassed = set(acc.bypassed) if acc.bypassed else ()
        computed: set[int] = set()

        def compute(key: int) -> None:
            self._compute(key, step_buf[key], entries[key - lbase], hidden, out, markers[key])
            computed.add(key)

        # --- loads of this layer's missing experts
        layer_mode = transfer.mode == "layer"
        if layer_mode:
            if o.layer_copy_bytes and o.layer_copy_bytes[layer] > 0:
                for i, e in enumerate(self.layer_missing[layer]):
                    sb = self.layer_staging[i]
                    key = lbase + e
                    self._inline_load(key, sb)
                    if e in gpu_e and key not in step_buf:
                        step_buf[key] = sb
                        sb.last_use = markers[key]
        elif loads and transfer.on_compute_stream:
            pending = {b.last_use: k for k, b in step_buf.items()}
            for e in loads:
                key = lbase + e
                b = pool.take(release_next, grow=e in bypassed)
                before = pending.get(b.last_use)
                if before is not None and before not in computed:
                    compute(before)  # streaming: the expert in this buffer is used first, then replaced
                self._inline_load(key, b)
                if e in bypassed:
                    pool.release(b)
                else:
                    pool.bind(key, b)
                b.job = None
                b.last_use = markers[key]
                pending[b.last_use] = key
                step_buf[key] = b
        elif loads:
            for e in loads:
                key = lbase + e
                job = inflight.get(key)
                if job is None:
                    b = pool.take(release_next, grow=e in bypassed)
                    fence = b.last_use
                    b.last_use = markers[key]
                    if e in bypassed:
                        pool.release(b)
                    else:
                        pool.bind(key, b)
                    job = self.h2d.submit(self._copy_job(key, b, fence), self.store[key].nbytes, f"load L{layer} E{e}",
                                          False, key)
                    b.job = job
                    step_buf[key] = b
                    if e not in bypassed:
                        inflight[key] = job
                elif key not in step_buf:
                    step_buf[key] = pool.owner[key]
                    step_buf[key].last_use = markers[key]
                layer_jobs[key] = job
        while release_next():
            pass

        # --- prefetch for later layers
        pf_active = prefetcher.active and step.phase in prefetcher.phases
        if pf_active:
            ctx = self.ctx
            ctx.layer, ctx.phase, ctx.step, ctx.work = layer, step.phase, step, work
            preds = prefetcher.predict(ctx)
            if preds:
                protect = {lbase + e for e in gpu_e}
                into_buffer = prefetcher.into_buffer
                for pl, pe in preds:
                    pkey = pl * E + pe
                    if cache.contains_key(pkey) or pkey in buf:
                        continue
                    if into_buffer:
                        b = pool.take(lambda: False)
                        fence, b.last_use = b.last_use, Marker.done()
                        job = self.h2d.submit(self._copy_job(pkey, b, fence), self.store[pkey].nbytes,
                                              f"prefetch L{pl} E{pe}", transfer.demand_priority, pkey)
                        b.job = job
                        buf[pkey] = _BufEntry(job, b)
                    else:
                        ins = cache.insert(pl, pe, clock, protect)
                        if not ins.admitted:
                            continue
                        for l2, e2 in ins.evicted:
                            k2 = l2 * E + e2
                            unused.pop(k2, None)
                            inflight.pop(k2, None)
                            vb = pool.owner.get(k2)
                            if vb is not None:
                                self._release_victim(k2, vb, markers)
                        b = pool.take(lambda: False)
                        fence, b.last_use = b.last_use, Marker.done()
                        pool.bind(pkey, b)
                        job = self.h2d.submit(self._copy_job(pkey, b, fence), self.store[pkey].nbytes,
                                              f"prefetch L{pl} E{pe}", transfer.demand_priority, pkey)
                        b.job = job
                        inflight[pkey] = job
                        unused[pkey] = True
                    stats.prefetch_issued += 1
        if prefetcher.wants_observe:
            prefetcher.observe(step, layer, work)

        # --- CPU experts run beside the device
        cpu_job = None
        if cpu_e:
            cpu_job, cpu_result = self._cpu_job(layer, cpu_e, entries, hidden)

        # --- device experts: ready ones first, then each as its copy lands
        waiting = []
        for e in gpu_e:
            key = lbase + e
            if key in computed:
                continue
            job = layer_jobs.get(key) if layer_jobs else None
            if job is None:
                job = inflight.get(key)
            if job is not None and job.done.is_done():
                if inflight.get(key) is job:
                    del inflight[key]
                job = None
            if job is None:
                if key not in step_buf:
                    step_buf[key] = pool.owner[key]
                compute(key)
            else:
                if job.background:
                    self.h2d.promote(job)
                waiting.append((job.seq, e, key, job))
        if waiting:
            waiting.sort(key=lambda w: w[0])
            for _, e, key, job in waiting:
                if self.cuda:
                    job.done.make_stream_wait(self.compute_stream)
                else:
                    t0 = time.perf_counter()
                    job.done.wait_issued()
                    stats.stall_s += time.perf_counter() - t0
                if inflight.get(key) is job:
                    del inflight[key]
                if key not in step_buf:
                    step_buf[key] = pool.owner[key]
                compute(key)
        if cpu_job is not None:
            t0 = time.perf_counter()
            cpu_job.done.make_stream_wait(self.compute_stream)
            if not self.cuda:
                stats.stall_s += time.perf_counter() - t0
            self.cpu_lane.check()
            cpu_out = cpu_result["out"]
            if self.cuda:
                cpu_out.record_stream(self.compute_stream)  # made on the CPU lane's stream, read on this one
            out.add_(cpu_out)
        return out
