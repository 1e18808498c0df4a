"""A compiled replay (numba) of the runs whose every rule it holds as arrays: the engine's answers, ~10-30x faster.

The engine (:mod:`moesim.simulator.engine`) drives Python policy objects layer by layer: a few microseconds
per layer-step whatever the policy, so no preset reached a million activations per second. This module
replays a whole batch in one compiled call over the compiled workload's arrays (:class:`StepStore`), with the
decisions of :class:`~moesim.simulator.decide.DecisionCore` and the driver of
:class:`~moesim.simulator.engine.Simulation` as array code (``_kernel_jit.py``): the cache as per-key state
(LRU/FIFO stamps, LFU visit counts, Belady's next uses, MRS scores, a static set, each pool's members), the
copy lanes and the CPU pool as the clocked lanes' state machines (every event numbered in SimPy's order, so
ties land as the engine's do), copies in flight and unused prefetches per key, and the driver's sleep and
stall rules, with every float operation in the engine's order.

It covers a run when :func:`unsupported` returns "" (one explicit check, made before the run): caches
``lru``, ``fifo``, ``lfu``, ``static``, ``belady``, ``mrs``; placements ``gpu``, ``fiddler``, ``hybrimoe``, ``cpu``;
prefetch ``none``, ``next-layer``, ``predictive`` (into an LRU/FIFO cache) and ``first-non-resident``, with
prefetches queued FIFO among demand loads, and ``eam-all`` (into an LRU/FIFO/LFU cache, queued behind demand
loads, its queue replaced at each layer call, optionally evicting earlier layers only); every transfer mode,
default-stream copies included; a profile where copies and compute do not slow each other; no timeline or hit
records; not the event engine. That is every preset as defined; other runs (``lfu-forget``, ``oracle``/``eam``
prefetch, ``demand_priority`` with another prefetcher, a CPU-calibrated profile) take the engine. The contract
(``tests/test_sim_fastpath.py``): on the runs it covers, the :class:`SimResult` of the engine, field for field
(times within 1e-9 relative; in practice identical).
"""

from __future__ import annotations

import sys
import weakref

import numpy as np

from moesim.simulator.cache import NEVER, BeladyCache, FIFOCache, LFUCache, LRUCache, MRSCache, StaticCache
from moesim.simulator.costs import host_issues_ahead
from moesim.simulator.decide import RunCounters
from moesim.simulator.placement import CpuForHostExperts, FiddlerPlacement, GpuOnly, HybriMoEPlacement
from moesim.simulator.prefetch import FirstNonResident, LearnedPrefetch, NextLayerGuess
from moesim.simulator.prefetch_eam_all import EAMEveryLayerPrefetch
from moesim.simulator.workload import union_by_rank
from moesim.tracer import DECODE

_CACHE_KINDS = {LRUCache: 0, FIFOCache: 1, LFUCache: 2, StaticCache: 3, MRSCache: 4, BeladyCache: 5}
_LRU, _FIFO, _LFU, _STATIC, _MRS, _BELADY = 0, 1, 2, 3, 4, 5
_PLACEMENTS = {GpuOnly: 0, FiddlerPlacement: 1, HybriMoEPlacement: 2, CpuForHostExperts: 3}
_GPU, _FIDDLER, _HYBRIMOE, _CPU_HOST = 0, 1, 2, 3
_STREAM, _COMPUTE, _LAYER = 0, 1, 2
# each acts on a guess of the next layer's experts per layer-step, in decode: the trace's (or the guess model's)
# guess, or the learned predictor's prediction
_PREFETCHERS = {NextLayerGuess: 1, LearnedPrefetch: 1, FirstNonResident: 2, EAMEveryLayerPrefetch: 3}
_NO_PREFETCH, _NEXT_LAYER, _FIRST_NON_RESIDENT, _EAM_ALL = 0, 1, 2, 3
H2D, D2H, CPU = 0, 1, 2  # the lanes; the first two are each other's peer (a copy is slower while both run)

# slots of the float state F and the integer state I
F_NOW, F_STALL, F_BUSY, F_DECODE_TIME, F_HOST_AT = range(5)  # F_HOST_AT: where the host has issued up to
(I_ORDER, I_WAITS, I_PREFILL_ACC, I_PREFILL_HITS, I_DEMAND, I_DECODE_CPU, I_DECODE_TOKENS, I_STAMP, I_NJOBS,
 I_H2D_SEQ, I_PF_ISSUED, I_PF_USED, I_PF_SERVED) = range(13)
JOBS = 1 << 12  # slots of the job ring (a power of two)
# per lane (rows of LF and LI): its pending event, the job in service, its queue and its totals
L_EV_AT, L_LAST_EVENT, L_DUR, L_BUSY_UNTIL, L_BUSY_S, L_CONTEND_UNTIL = range(6)
L_STATE, L_EV_ORDER, L_CUR, L_QHEAD, L_QTAIL, L_JOBS, L_BYTES, L_SERIAL, L_BQHEAD, L_BQTAIL = range(10)
Q_BACKGROUND = 3  # the row of Q that holds the copy lane's queued background (prefetch) jobs
_IDLE, _WAKING, _BUSY = 0, 1, 2  # the clocked lane's states (transfer.py)
# rows of the cache's per-key integers CK, its per-pool integers CP, the per-layer tables TL (seconds) and TLI
# (integers), the per-token-count tables TT (seconds), the scratch integers SI and flags SB of one layer
C_RESIDENT, C_STAMP, C_COUNT, C_TIE, C_NEXT, C_POS, C_INFLIGHT, C_UNUSED, C_BUFFER = range(9)
P_USED, P_LIMIT, P_MEMBERS = range(3)
T_COPY_IN, T_COPY_CONC, T_D2H, T_LAYER_COPY, T_PLACE_COPY = range(5)
T_POOL, T_COST, T_BYTES, T_LAYER_COPY_BYTES = range(4)
X_GPU, X_CPU, X_UP, X_UP_CONC, X_DOWN, X_DOWN_CONC = range(6)
S_SEL, S_JOB_OF, S_ORDER, S_EVICTED, S_PREFETCH = range(5)
# shape: the run's integer constants
(H_L, H_E, H_MODE, H_WRITE_BACK, H_CACHE, H_SCOPE_LAYER, H_PLACEMENT, H_CODE, H_HIDDEN, H_PREFETCHER, H_LIMIT,
 H_BACKGROUND, H_DROP_QUEUED, H_EARLIER_ONLY, H_HOST_AHEAD, H_PAGEABLE_INLINE) = range(16)
B_MISSED, B_ON_CPU, B_RES, B_KEPT = range(4)


# the kernel reproduces numpy's pairwise sums of eam-all's match two splits deep (numba caches no recursion)
EAM_PAIRWISE_LIMIT = 496


def unsupported(prep, objs, record_hits: bool = False, timeline=None, exact_events: bool = False) -> str:
    """Why the compiled replay cannot reproduce this run ("" when it can)."""
    if exact_events:
        return "the event engine was asked for"
    if timeline is not None:
        return "a timeline is recorded"
    if record_hits:
        return "per-row hits are recorded"
    kind = _CACHE_KINDS.get(type(objs.cache))
    if kind is None:
        return f"cache '{objs.cache.name}'"
    prefetcher = objs.prefetcher
    if prefetcher.active or prefetcher.wants_observe:
        if type(prefetcher) not in _PREFETCHERS:
            return f"prefetch '{prefetcher.name}'"
        eam_all = type(prefetcher) is EAMEveryLayerPrefetch
        # LFU and the demand-first queue are held for the one prefetcher whose preset has them (eam-all)
        if kind not in (_LRU, _FIFO) and not (eam_all and kind == _LFU):
            return f"prefetch into cache '{objs.cache.name}'"
        if objs.transfer.demand_priority and not eam_all:
            return "prefetches queued behind demand loads"
        if eam_all and not (objs.transfer.demand_priority and prep.policy.prefetch.replaces_queue):
            # the queue of a prefetch that enqueues at every layer call is bounded only where each call drops it
            return "prefetch 'eam-all' whose queue is not replaced at each layer call"
        if eam_all and max(prep.workload.num_layers, prep.workload.num_experts) > EAM_PAIRWISE_LIMIT:
            return f"prefetch 'eam-all' over more than {EAM_PAIRWISE_LIMIT} layers or experts"
    if type(objs.placement) not in _PLACEMENTS:
        return f"placement '{objs.placement.name}'"
    costs = objs.costs
    if costs.copy_slowdown_with_compute != 1.0 or costs.compute_slowdown_with_copy != 1.0:
        return "copies and compute contend on this profile"
    return ""


class LaneTotals:
    """What a result reads of a lane."""

    __slots__ = ("busy_s", "bytes", "jobs")

    def __init__(self, busy_s: float = 0.0, nbytes: int = 0, jobs: int = 0):
        self.busy_s, self.bytes, self.jobs = busy_s, nbytes, jobs


class KernelRun:
    """The compiled replay of one run, with the lanes' totals where a :class:`Simulation` has its lanes."""

    def __init__(self, prep, objs):
        wl = prep.workload
        self.workload = wl
        self.objs = objs
        self.L, self.E = wl.num_layers, wl.num_experts
        self.hidden_size = prep.trace.meta.model.hidden_size
        self.h2d, self.d2h, self.cpu = LaneTotals(), LaneTotals(), LaneTotals()

    def run(self):
        from moesim.simulator.engine import EngineStats

        objs, L, E = self.objs, self.L, self.E
        costs, transfer, cache, placement = objs.costs, objs.transfer, objs.cache, objs.placement
        stats = EngineStats(L)
        mode = _LAYER if transfer.mode == "layer" else _COMPUTE if transfer.on_compute_stream else _STREAM
        copy_in = costs.h2d_pageable_by_layer if (mode != _STREAM and not transfer.pinned) else costs.h2d_by_layer
        TL = np.array([copy_in, costs.h2d_conc_by_layer, costs.d2h_by_layer, objs.layer_copy_s or [0.0] * L,
                       placement.copy_by_layer], dtype=np.float64)
        TT = np.array([costs.gpu_expert, costs.cpu_expert, costs.act_h2d, costs.act_h2d_conc, costs.act_d2h,
                       costs.act_d2h_conc], dtype=np.float64)
        CK, CP, members, pools, scores, stamp = _cache_arrays(cache, L, E)
        TLI = np.array(pools + [costs.expert_bytes_by_layer, objs.layer_copy_bytes or [0] * L], dtype=np.int64)
        shape = np.array([L, E, mode, int(transfer.write_back), _CACHE_KINDS[type(cache)],
                          int(cache.capacity.scope == "layer"), _PLACEMENTS[type(placement)],
                          int(placement.spec.rule == "code"), self.hidden_size,
                          _PREFETCHERS.get(type(objs.prefetcher), _NO_PREFETCH), _guess_limit(objs.prefetcher),
                          int(transfer.demand_priority), _drop_phases(objs.prefetcher),
                          int(bool(getattr(getattr(objs.prefetcher, "spec", None), "evicts_earlier_layers_only",
                                           False))),
                          int(host_issues_ahead(costs, transfer)), int(mode == _COMPUTE and not transfer.pinned),
                          costs.prefill_offload_tokens * costs.top_k],
                         dtype=np.int64)
        scalars = np.array([costs.step_overhead_s, costs.layer_overhead_s, float(costs.dense_layers)])
        params = np.array([getattr(cache, "alpha", 0.0), getattr(cache, "top_p", 0)], dtype=np.float64)
        F = np.zeros(5, dtype=np.float64)
        I = np.zeros(13, dtype=np.int64)
        I[I_STAMP] = stamp
        LF = np.zeros((3, 6), dtype=np.float64)
        LI = np.zeros((3, 10), dtype=np.int64)
        # default-stream copies (Simulation._serial_copies): a copy starts after the compute in progress
        LI[H2D, L_SERIAL] = int(transfer.default_stream and not transfer.on_compute_stream)
        Q = np.zeros((4, JOBS), dtype=np.int64)
        JF = np.zeros((JOBS, 3), dtype=np.float64)
        JI = np.zeros((JOBS, 11), dtype=np.int64)
        eam = _EAMState(objs.prefetcher, L, E, len(self.workload.batches))
        counts = np.zeros((2, L), dtype=np.int64)  # decode accesses and hits per layer
        replay = _compiled()
        next_uses = _next_uses(self.workload) if isinstance(cache, BeladyCache) else None
        decode_tables: dict[int, tuple] = {}
        for number, batch in enumerate(self.workload.batches):
            store = batch.store
            ne, ne_gpu, head, shared = _step_costs(store, costs, TT[X_GPU], decode_tables)
            step_end = np.zeros(len(store), dtype=np.float64)
            t0 = float(F[F_NOW])  # a Python float: results hold no numpy scalars (their repr differs)
            # one integer type for every store (they pick the smallest): one compiled signature
            replay(F, I, LF, LI, Q, JF, JI, counts, CK, CP, TL, TLI, TT, members, scores, shape, scalars, params,
                   np.asarray(store.phase, np.int64), np.asarray(store.tokens, np.int64), ne, ne_gpu, head, shared,
                   _int64(store.step_offsets), _int64(store.layer), _int64(store.expert_offsets),
                   _int64(store.experts), _int64(store.expert_tokens), store.weights,
                   _NO_FUTURE if next_uses is None else next_uses[number], *self._guesses(store),
                   batch.num_prefill, step_end, eam.EAM, eam.EN, eam.EA, eam.decay)
            eam.end_batch()
            _request_times(stats, batch, step_end, t0)
        stats.makespan_s = float(self._drain(F, I, LF, LI, Q, JF, JI))
        self._fill(stats, F, I, LF, LI, counts)
        return stats

    def _guesses(self, store) -> tuple[np.ndarray, np.ndarray]:
        """Per layer-step, the next layer's guessed experts the prefetcher reads: (offsets, experts)."""
        if isinstance(self.objs.prefetcher, LearnedPrefetch):
            return _predicted(store)
        return _int64(store.guess_offsets), _int64(store.guess)

    @staticmethod
    def _drain(*state) -> float:
        return _drained()(*state)

    def _fill(self, stats: RunCounters, F, I, LF, LI, counts) -> None:
        stats.decode_accesses = counts[0].tolist()
        stats.decode_hits = counts[1].tolist()
        stats.prefill_accesses, stats.prefill_hits = int(I[I_PREFILL_ACC]), int(I[I_PREFILL_HITS])
        stats.demand_loads, stats.waits = int(I[I_DEMAND]), int(I[I_WAITS])
        stats.decode_cpu, stats.decode_tokens = int(I[I_DECODE_CPU]), int(I[I_DECODE_TOKENS])
        stats.stall_s, stats.gpu_busy_s = float(F[F_STALL]), float(F[F_BUSY])
        stats.decode_time_s = float(F[F_DECODE_TIME])
        stats.prefetch_issued, stats.prefetch_used = int(I[I_PF_ISSUED]), int(I[I_PF_USED])
        stats.prefetch_served = int(I[I_PF_SERVED])
        self.h2d, self.d2h, self.cpu = (LaneTotals(float(LF[lane, L_BUSY_S]), int(LI[lane, L_BYTES]),
                                                   int(LI[lane, L_JOBS])) for lane in (H2D, D2H, CPU))


# store -> (the predictions it was computed from, its guesses): a run of the same workload and predictor reuses them
_PREDICTED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _predicted(store) -> tuple[np.ndarray, np.ndarray]:
    """The learned predictor's guess per decode layer-step (LayerWork.predicted: the union of its rows'
    predictions, best first), as (offsets, experts); prefill layer-steps have none."""
    predictions = store.annotations.predictions or {}
    memo = _PREDICTED.get(store)
    if memo is not None and memo[0] is predictions:
        return memo[1]
    guesses = _union_guesses(store, predictions)
    _PREDICTED[store] = (predictions, guesses)
    return guesses


def _union_guesses(store, predictions: dict) -> tuple[np.ndarray, np.ndarray]:
    decode = np.repeat(np.asarray(store.phase) == DECODE, np.diff(store.step_offsets.astype(np.int64)))
    rows = store.rows.tolist()
    bounds = store.row_offsets.tolist()
    lengths, experts = [], []
    for w, is_decode in enumerate(decode.tolist()):
        guess = union_by_rank(predictions, tuple(rows[bounds[w]:bounds[w + 1]])) if is_decode else ()
        lengths.append(len(guess))
        experts.extend(guess)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets, np.asarray(experts, dtype=np.int64)


def _guess_limit(prefetcher) -> int:
    """How many of a layer-step's guesses the prefetcher reads (0: all)."""
    if isinstance(prefetcher, FirstNonResident):
        return prefetcher.top_k
    return prefetcher.limit if isinstance(prefetcher, (NextLayerGuess, LearnedPrefetch, EAMEveryLayerPrefetch)) else 0


def _drop_phases(prefetcher) -> int:
    """The phases (a bit per phase number) whose layer calls drop the queued prefetches (PrefetchSpec.replaces_queue,
    as DecisionCore.replaces_queue reads it)."""
    spec = getattr(prefetcher, "spec", None)
    if spec is None or not spec.replaces_queue or not prefetcher.active:
        return 0
    return sum(1 << phase for phase in prefetcher.phases)


class _EAMState:
    """eam-all's state as arrays (EAMEveryLayerPrefetch's): EAM[0] the request's EAM, EAM[1] it row-normalised
    (scratch), EAM[2:2 + cap] the collection, EAM[2 + cap:] each entry row-normalised; EN[0] the request's row
    norms (scratch), EN[1:1 + cap] the entries', EN[1 + cap:] each entry's similarity per layer (scratch); EA[0]
    the entries, EA[1:] their access counts. The collection never outgrows the batches, hence ``cap``."""

    def __init__(self, prefetcher, L: int, E: int, batches: int):
        self.on = isinstance(prefetcher, EAMEveryLayerPrefetch)
        self.capacity = prefetcher.spec.eam_capacity if self.on else 0
        cap = min(self.capacity, batches) if self.on else 0
        self.cap = cap
        self.EAM = np.zeros((2 + 2 * cap, L, E), dtype=np.float64)
        self.EN = np.zeros((1 + 2 * cap, L), dtype=np.float64)
        self.EA = np.zeros(1 + cap, dtype=np.int64)
        self.decay = prefetcher._decay[:, 0].copy() if self.on else np.zeros(L, dtype=np.float64)

    def end_batch(self) -> None:
        """EAMEveryLayerPrefetch.end_batch (and begin_batch's fresh EAM)."""
        if not self.on:
            return
        EAM, EA, cap = self.EAM, self.EA, self.cap
        eam = EAM[0].copy()
        EAM[0] = 0.0
        if not eam.any():
            return
        n = int(EA[0])
        if n >= self.capacity:
            slot = int(np.argmin(EA[1:1 + n]))  # expert_tracer.finish_entry: the least accessed entry
        else:
            slot = n
            EA[0] += 1
        EA[1 + slot] = 1
        EAM[2 + slot] = eam
        # as EAMEveryLayerPrefetch._match normalises and measures the entries (row by row: the same floats)
        normed = eam / np.maximum(eam.sum(axis=1, keepdims=True), 1e-30)
        EAM[2 + cap + slot] = normed
        self.EN[1 + slot] = np.linalg.norm(normed, axis=1)


def _int64(a: np.ndarray) -> np.ndarray:
    return a.astype(np.int64, copy=False)


def _cache_arrays(cache, L: int, E: int) -> tuple:
    """The Python cache's state after its preload, as arrays: CK (per key: resident, LRU/FIFO stamp, LFU count,
    LFU tie, Belady's next use, place in ``members``), CP (per pool: used, limit, members), the pools' members,
    [pool of each layer, an expert's cost in each layer], MRS scores, and the last stamp. An order is kept as
    stamps: the smallest stamp in a pool is the least recent."""
    K = L * E
    pool_of_layer, cost_of_layer, limit, used = cache.pool_layout()
    CK = np.zeros((9, K), dtype=np.int64)
    CK[C_INFLIGHT] = -1  # no copy in flight
    CK[C_BUFFER] = -1  # no prefetch in the side buffer
    CK[C_RESIDENT, cache.resident_keys()] = 1
    stamp = 0
    if isinstance(cache, LRUCache):
        for pool in range(len(limit)):
            for key in cache.recency_order(pool):
                stamp += 1
                CK[C_STAMP, key] = stamp
    if isinstance(cache, LFUCache):
        CK[C_COUNT] = [cache.visit_count(k // E, k % E) for k in range(K)]
    if isinstance(cache, BeladyCache):
        for key, clock in cache.next_uses().items():
            CK[C_NEXT, key] = clock
    keys = np.arange(K, dtype=np.int64)
    CK[C_TIE] = (keys % E) * L + keys // E  # MoE-Infinity's scan order: expert, then layer (LFUCache._tie)
    scores = np.zeros(K, dtype=np.float64)
    if isinstance(cache, MRSCache):
        scores[:] = cache.scores.reshape(-1)
    # each pool's members: a layer's pool in its own E entries, the one global pool in all of them
    members = np.zeros(K, dtype=np.int64)
    filled = [0] * len(limit)
    for key in cache.resident_keys():
        pool = pool_of_layer[key // E]
        at = (pool * E if cache.capacity.scope == "layer" else 0) + filled[pool]
        members[at] = key
        CK[C_POS, key] = at
        filled[pool] += 1
    CP = np.array([used, limit, filled], dtype=np.int64)
    return CK, CP, members, [pool_of_layer, cost_of_layer], scores, stamp


_NO_FUTURE = np.zeros(0, dtype=np.int64)


def _next_uses(workload) -> list[np.ndarray]:
    """Per batch, for each routed expert of each layer-step, the clock of that expert's next use (NEVER when it
    is not used again): what Belady's oracle reads (the workload's future_uses, as one array per batch)."""
    L, E = workload.num_layers, workload.num_experts
    keys, clocks, sizes = [], [], []
    for batch in workload.batches:
        store = batch.store
        per_work = np.diff(store.expert_offsets.astype(np.int64))
        step_of_work = np.repeat(np.arange(len(store)), np.diff(store.step_offsets.astype(np.int64)))
        layer = np.repeat(store.layer.astype(np.int64), per_work)
        keys.append(layer * E + store.experts.astype(np.int64))
        clocks.append(np.repeat(np.asarray(store.index, dtype=np.int64)[step_of_work], per_work) * L + layer)
        sizes.append(len(store.experts))
    key, clock = np.concatenate(keys), np.concatenate(clocks)
    order = np.lexsort((clock, key))
    after = np.full(len(key), NEVER, dtype=np.int64)
    same = key[order[1:]] == key[order[:-1]]
    after[order[:-1][same]] = clock[order[1:]][same]
    return np.split(after, np.cumsum(sizes)[:-1])


def _step_costs(store, costs, gpu: np.ndarray, decode_tables: dict):
    """Per step of a batch: one decoder layer's non-expert time (host to host, and its kernels alone where the
    profile has them, else zeros), the head's time, the shared experts' time (``decode_tables`` keeps each
    batch size's two rows as arrays, for the run)."""
    tokens = np.asarray(store.tokens, dtype=np.int64)
    context = np.asarray(store.context, dtype=np.int64)
    decode = np.asarray(store.phase) == DECODE
    split = costs.decode_non_expert_device is not None and costs.prefill_non_expert_device is not None
    ne = np.empty(len(tokens), dtype=np.float64)
    ne_gpu = np.zeros(len(tokens), dtype=np.float64)
    head = np.empty(len(tokens), dtype=np.float64)
    for b in np.unique(tokens[decode]).tolist():
        rows = decode & (tokens == b)
        if b not in decode_tables:  # (host to host, kernels alone or None)
            decode_tables[b] = (np.asarray(costs.decode_non_expert[b], dtype=np.float64),
                                np.asarray(costs.decode_non_expert_device[b], dtype=np.float64) if split else None)
        host_row, kernel_row = decode_tables[b]
        ne[rows] = host_row[context[rows]]
        if split:
            ne_gpu[rows] = kernel_row[context[rows]]
        head[rows] = costs.head[b]
    for i in np.flatnonzero(~decode).tolist():
        ne[i] = costs.prefill_non_expert[store.tokens[i]]
        if split:
            ne_gpu[i] = costs.prefill_non_expert_device[store.tokens[i]]
        head[i] = costs.head[1]
    if costs.shared_experts:
        shared = costs.shared_experts * gpu[tokens]
    else:
        shared = np.zeros(len(tokens), dtype=np.float64)
    return ne, ne_gpu, head, shared


def _request_times(stats: RunCounters, batch, step_end: np.ndarray, t0: float) -> None:
    """TTFT, token intervals and end-to-end times of one batch, as :func:`~moesim.simulator.decide.replay_steps`
    reads them from the clock before and after each step."""
    store = batch.store
    n_pre = batch.num_prefill
    last: dict[int, float] = {}
    for i in range(n_pre):
        r = store.requests[i][0]
        stats.ttft[r] = float(step_end[i]) - t0
        last[r] = float(step_end[i])
    if len(batch.requests) == 1 and len(step_end) > n_pre:  # one request: its intervals are the steps' ends' steps
        r = batch.requests[0]
        ends = np.concatenate(([last.get(r, t0)], step_end[n_pre:]))
        stats.token_intervals.extend(np.diff(ends).tolist())
        last[r] = float(ends[-1])
    else:
        intervals = stats.token_intervals
        for i in range(n_pre, len(step_end)):
            t = float(step_end[i])
            for r in store.requests[i]:
                intervals.append(t - last.get(r, t0))
                last[r] = t
    end = float(step_end[-1]) if len(step_end) else t0
    for r in batch.requests:
        stats.e2e[r] = last.get(r, end) - t0


_REPLAY = None


def _compiled():
    """The compiled batch replay (numba, cached on disk: a warm process loads it without compiling)."""
    global _REPLAY
    if _REPLAY is None:
        from moesim.simulator._kernel_jit import replay_batch

        _REPLAY = replay_batch
        if sys.stderr.isatty() and not compiled_on_disk():
            print("moesim: compiling the simulator's replay kernel for this install (numba, about a minute, once)",
                  file=sys.stderr, flush=True)
    return _REPLAY


def compiled_on_disk() -> bool:
    """Whether numba's disk cache holds the replay for this source; True where the cache cannot be read."""
    try:
        return bool(_compiled()._cache._cache_file._load_index())
    except Exception:  # numba's own cache layout (not a public API) changed: nothing to announce
        return True


def preload() -> None:
    """Import numba, the replay's module and numba's CPU registries (most of a second), so processes forked
    afterwards start with them: what is left of a first run is loading the replay from numba's disk cache."""
    _compiled()
    from numba.core.registry import cpu_target

    cpu_target.target_context.refresh()


def _drained():
    from moesim.simulator._kernel_jit import drain

    return drain


def run_compiled(prep, objs) -> tuple[KernelRun, object]:
    """Run ``prep`` with ``objs`` (already checked by :func:`unsupported`): (the run, its counters)."""
    run = KernelRun(prep, objs)
    return run, run.run()


