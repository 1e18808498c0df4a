"""The offloading executor: runs a compiled workload through the model, making the policy objects' decisions.

:class:`OffloadEngine` owns what does not change between runs (the model's non-expert modules on the
device, the experts in host memory, the per-step routing tensors); :meth:`OffloadEngine.run` takes the
simulator's :class:`~moesim.simulator.run.Prepared` and fresh policy objects and replays the workload,
timing each forward step as a generate loop would (the batch loop is the simulator's
:func:`~moesim.simulator.decide.replay_steps`). Each MoE layer is :meth:`_Run.layer`: the simulator's
:class:`~moesim.simulator.decide.DecisionCore` makes every policy call (``observe``, ``place``, ``access``,
the side-buffer and prefetch bookkeeping, ``predict``/``insert``, ``observe``) and orders the waits, as it
does for :meth:`moesim.simulator.engine.Simulation._forward`; this module does real work where the
simulator adds modelled time:

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

import gc
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
from moesim.simulator.decide import DecisionCore, LayerPlan, RunCounters, replay_steps
from moesim.simulator.gating import keep_mask
from moesim.simulator.run import Prepared
from moesim.simulator.workload import ForwardStep, Workload
from moesim.tracer import DECODE, Trace


@dataclass
class RouteEntry:
    """One expert of one layer-step: which of the step's token rows it takes, with which weights."""

    idx: Optional[torch.Tensor]  # None: every row of the step (a one-token decode step)
    weight: object  # float when idx is None, else a [n, 1] tensor


@dataclass
class EngineStats(RunCounters):
    """The counters the simulator also fills (:class:`moesim.simulator.decide.RunCounters`; ``stall_s`` only on
    CPU-as-device), plus the engine's measurements."""

    step_times: list[tuple[int, int, float]] = field(default_factory=list)  # (step index, phase, seconds)
    h2d_bytes: int = 0  # expert loads and CPU experts' outputs
    d2h_bytes: int = 0  # write-backs and CPU experts' activations
    inline_copies: int = 0
    lane_copies: int = 0
    scratch_copies: int = 0  # copies of experts evicted before their copy started (redirected)
    extra_buffers: int = 0  # device buffers beyond the memory plan (bypassed loads with no staging buffer)
    kv_peak_bytes: int = 0  # the largest KV cache of the run
    outputs: list = field(default_factory=list)  # per step, the last logits row (when the engine records outputs)
    copy_times: list = field(default_factory=list)  # (pinned, seconds or a CUDA event pair) per expert copy
    expert_times: list = field(default_factory=list)  # CPU-as-device: (tokens, seconds, phase) per device expert FFN
    # per CPU-placed expert: (tokens, seconds of its forward on the host, seconds with its activations' copies, phase)
    cpu_expert_times: list = field(default_factory=list)

    def copy_seconds(self) -> list[tuple[bool, float]]:
        out = []
        for pinned, t in self.copy_times:
            if isinstance(t, tuple):
                start, end = t
                end.synchronize()
                t = start.elapsed_time(end) / 1e3
            out.append((pinned, float(t)))
        return out


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
        # a finished run's buffers can sit in a reference cycle (run <-> lanes' jobs): collect it now, or its
        # device memory would count in the next run's measured peak
        gc.collect()
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
        if count < 1 and objects.placement.copies_misses:
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
        self.core = DecisionCore(objects.cache, objects.prefetcher, objects.placement, self.stats, self.L, self.E)
        self.side_buffers: dict[int, DeviceBuffer] = {}  # key -> buffer of a side-buffer prefetch (AdapMoE)
        self._next_ids: Optional[torch.Tensor] = None
        self._kv = None
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
        if self.cuda:
            torch.cuda.synchronize(self.device)
        t_start = self._now()
        with torch.no_grad():
            for step in replay_steps(batches, st, self.o.cache, self.o.prefetcher, self._now, self._step_timed,
                                     self._batch_done):
                if step.phase == DECODE:
                    ids, kv = self._next_ids, self._kv
                else:
                    ids, kv = self.engine._prompt(step.requests[0], step.tokens), None
                self._next_ids, self._kv = self._forward(step, ids, kv)
        st.makespan_s = self._now() - t_start
        self.h2d.drain()
        st.extra_buffers = self.pool.extra
        st.h2d_bytes += self.h2d.bytes
        st.lane_copies = self.h2d.jobs

    def _step_timed(self, step: ForwardStep, seconds: float) -> None:
        self.stats.step_times.append((step.index, step.phase, seconds))

    def _batch_done(self, batch) -> None:
        self.stats.kv_peak_bytes = max(self.stats.kv_peak_bytes, kv_cache_bytes(self._kv))
        self._next_ids = self._kv = None

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
        phase = self.step.phase
        result: dict = {}
        nbytes = sum((hidden.shape[0] if en.idx is None else en.idx.numel()) * hidden.shape[1] * hidden.element_size()
                     for _, en in work)

        def run(job: Job, stream):
            ready.make_stream_wait(stream)
            out = torch.zeros_like(hidden)
            for key, en in work:
                t0 = time.perf_counter()
                rows = hidden if en.idx is None else hidden.index_select(0, en.idx)
                x = rows.to("cpu") if self.cuda else rows.clone()  # activations down
                t1 = time.perf_counter()
                y = store[key].forward(x.to(act))
                t2 = time.perf_counter()
                y = y.to(device) if self.cuda else y.clone()  # outputs up
                self.stats.cpu_expert_times.append((x.shape[0], t2 - t1, time.perf_counter() - t0, phase))
                if en.idx is None:
                    out.add_(y, alpha=en.weight)
                else:
                    out.index_add_(0, en.idx, y * en.weight)
            result["out"] = out

        job = self.cpu_lane.submit(run, 0, f"cpu experts L{layer} x{len(cpu_e)}")
        self.stats.d2h_bytes += nbytes
        self.stats.h2d_bytes += nbytes
        return job, result

    # ---- one MoE layer of the current step: the decision core decides, this runs it on real buffers
    def layer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        step = self.step
        out = torch.zeros_like(hidden)
        work = step.layers[layer]
        if work is None:
            return out
        if self.cuda:
            # The systems read the router's top-k on the host before they decide (a .tolist() or .cpu() of the
            # routing); the routes here come from the trace, so the host waits for the layer's input as theirs
            # does. Without it the host would issue a whole step ahead, which no offloading system does.
            self.compute_stream.synchronize()
        core = self.core
        plan = core.begin_layer(step, layer, work)
        lay = _LayerBuffers(self, plan, hidden, out)
        lay.bind_resident()
        if self.transfer.mode == "layer":
            self._layer_copy(lay)
        elif plan.loads and self.transfer.on_compute_stream:
            self._inline_loads(lay)
        elif plan.loads:
            core.stream_loads(plan, lay.load, lay.reuse)
        while lay.release_next():
            pass
        if plan.prefetches:
            core.issue_prefetches(plan, self._prefetch_copy, lay.evicted)
        cpu = self._cpu_job(layer, plan.cpu_experts, lay.entries, hidden) if plan.cpu_experts else None
        self._device_experts(lay)
        if cpu is not None:
            self._add_cpu_output(*cpu, out)
        return out

    def _layer_copy(self, lay: "_LayerBuffers") -> None:
        """accelerate: every offloaded expert of the layer, copied inline into the staging buffers."""
        layer = lay.plan.layer
        copy_bytes = self.o.layer_copy_bytes
        if not copy_bytes or copy_bytes[layer] <= 0:
            return
        for i, e in enumerate(self.layer_missing[layer]):
            sb = self.layer_staging[i]
            key = lay.base + e
            self._inline_load(key, sb)
            if e in lay.plan.gpu_experts and key not in lay.buffers:
                lay.buffers[key] = sb
                sb.last_use = lay.markers[key]

    def _inline_loads(self, lay: "_LayerBuffers") -> None:
        """Loads on the compute stream (swap, sync): a buffer whose expert is still to be computed is used
        first, then replaced, so a layer with more misses than buffers streams through them."""
        pool = self.pool
        pending = {b.last_use: k for k, b in lay.buffers.items()}
        for e in lay.plan.loads:
            key = lay.base + e
            bypassed = e in lay.bypassed
            b = pool.take(lay.release_next, grow=bypassed)
            before = pending.get(b.last_use)
            if before is not None and before not in lay.computed:
                lay.compute(before)
            self._inline_load(key, b)
            if bypassed:
                pool.release(b)
            else:
                pool.bind(key, b)
            b.job = None
            b.last_use = lay.markers[key]
            pending[b.last_use] = key
            lay.buffers[key] = b

    def _prefetch_copy(self, layer: int, e: int, key: int) -> Job:
        """A prefetch's copy on the lane, into a free buffer: bound to the cache's key, or held aside."""
        pool = self.pool
        b = pool.take(_nothing_to_release)
        fence, b.last_use = b.last_use, Marker.done()
        if self.o.prefetcher.into_buffer:
            self.side_buffers[key] = b
        else:
            pool.bind(key, b)
        job = self.h2d.submit(self._copy_job(key, b, fence), self.store[key].nbytes, f"prefetch L{layer} E{e}",
                              self.transfer.demand_priority, key)
        b.job = job
        return job

    def _device_experts(self, lay: "_LayerBuffers") -> None:
        """Ready experts first, then each after its own copy (the compute stream waits on its event)."""
        core = self.core
        pool = self.pool
        for e, _ in core.ready_experts(lay.plan, self.h2d.promote, lay.computed):
            key = lay.base + e
            if key not in lay.buffers:
                lay.buffers[key] = pool.owner[key]
            lay.compute(key)
        for _, e, _, job in core.landing_order():
            if self.cuda:
                job.done.make_stream_wait(self.compute_stream)
            else:
                t0 = time.perf_counter()
                job.done.wait_issued()
                self.stats.stall_s += time.perf_counter() - t0
            key = lay.base + e
            if key not in lay.buffers:
                lay.buffers[key] = pool.owner[key]
            lay.compute(key)

    def _add_cpu_output(self, cpu_job: Job, cpu_result: dict, out: torch.Tensor) -> None:
        t0 = time.perf_counter()
        cpu_job.done.make_stream_wait(self.compute_stream)
        if not self.cuda:
            self.stats.stall_s += time.perf_counter() - t0
        self.cpu_lane.check()
        cpu_out = cpu_result["out"]
        if self.cuda:
            cpu_out.record_stream(self.compute_stream)  # made on the CPU lane's stream, read on this one
        out.add_(cpu_out)


def _nothing_to_release() -> bool:
    return False


class _LayerBuffers:
    """One MoE layer's device side: which buffer each device expert reads, the marker after its compute, and
    the buffers the cache's evictions free (released one at a time, as loads need them)."""

    def __init__(self, run: _Run, plan: LayerPlan, hidden: torch.Tensor, out: torch.Tensor):
        self.run = run
        self.plan = plan
        self.hidden = hidden
        self.out = out
        self.base = plan.base
        self.entries = run.routes[(plan.step.index, plan.layer)]
        self.markers = {plan.base + e: Marker(run.cuda, f"compute L{plan.layer} E{e}") for e in plan.gpu_experts}
        self.buffers: dict[int, DeviceBuffer] = {}
        self.victims = deque(l2 * run.E + e2 for l2, e2 in plan.access.evicted)
        self.bypassed = set(plan.access.bypassed) if plan.access.bypassed else ()
        self.computed: set[int] = set()

    def bind_resident(self) -> None:
        """Hits read their cached buffer; side-buffer prefetches that hit join the cache; wrong guesses' buffers
        are freed."""
        run = self.run
        pool = run.pool
        for key in self.plan.dropped:
            pool.release(run.side_buffers.pop(key))
        for e in self.plan.access.hits:
            key = self.base + e
            b = pool.owner[key]
            b.last_use = self.markers[key]
            self.buffers[key] = b
        for key in self.plan.from_buffer:
            b = run.side_buffers.pop(key)
            pool.bind(key, b)
            b.last_use = self.markers[key]
            self.buffers[key] = b

    def release_next(self) -> bool:
        pool = self.run.pool
        while self.victims:
            v = self.victims.popleft()
            vb = pool.owner.get(v)
            if vb is not None:
                self.run._release_victim(v, vb, self.markers)
                return True
        return False

    def evicted(self, key: int) -> None:
        """A prefetch's insertion evicted ``key``: its buffer is freed now."""
        vb = self.run.pool.owner.get(key)
        if vb is not None:
            self.run._release_victim(key, vb, self.markers)

    def load(self, plan: LayerPlan, e: int, key: int, kept: bool) -> Job:
        """A demand load on the copy lane, into a free buffer (a bypassed expert's is released at once)."""
        run = self.run
        pool = run.pool
        b = pool.take(self.release_next, grow=not kept)
        fence = b.last_use
        b.last_use = self.markers[key]
        if kept:
            pool.bind(key, b)
        else:
            pool.release(b)
        job = run.h2d.submit(run._copy_job(key, b, fence), run.store[key].nbytes, f"load L{plan.layer} E{e}", False,
                             key)
        b.job = job
        self.buffers[key] = b
        return job

    def reuse(self, key: int) -> None:
        """A miss whose prefetch is still landing reads the prefetch's buffer."""
        if key not in self.buffers:
            b = self.buffers[key] = self.run.pool.owner[key]
            b.last_use = self.markers[key]

    def compute(self, key: int) -> None:
        self.run._compute(key, self.buffers[key], self.entries[key - self.base], self.hidden, self.out,
                          self.markers[key])
        self.computed.add(key)
