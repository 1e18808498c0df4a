"""The compiled half of :mod:`moesim.simulator.kernel`: imported only when a run takes the compiled replay, so
importing the simulator (or ``moesim --help``) never imports numba.

Every function mirrors one of the engine's, named in its docstring; float operations are written in the
engine's order (no fastmath), so sums round as the engine's do. Numba compiles these once per machine and keeps
the machine code on disk (``cache=True``): a warm process pays no compile.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from moesim.simulator.kernel import (
    _BUSY, _COMPUTE, _FIFO, _IDLE, _LAYER, _LFU, _LRU, _STATIC, _STREAM, _WAKING, F_BUSY, F_D2H_BUSY,
    F_DECODE_TIME, F_DUR, F_EV_AT, F_H2D_BUSY, F_LAST_EVENT, F_NOW, F_STALL, F_START, I_CUR, I_D2H_BYTES,
    I_DECODE_TOKENS, I_DEMAND, I_EV_ORDER, I_H2D_BYTES, I_H2D_JOBS, I_ORDER, I_PREFILL_ACC, I_PREFILL_HITS,
    I_QHEAD, I_QTAIL, I_STAMP, I_STATE, I_WAITS,
)
from moesim.tracer import DECODE

# columns of the job tables: floats (duration, done at), integers (bytes, landed, done order)
J_DUR, J_DONE_AT = 0, 1
J_BYTES, J_LANDED, J_DONE_ORDER = 0, 1, 2


# ---- the host->device copy lane: ClockedLane / LaneClock with one lane, demand jobs only, no contention
@njit(cache=True)
def _finish(F, I, jf, ji, at):
    """ClockedLane._finish: the job in service is done."""
    cur = I[I_CUR]
    F[F_H2D_BUSY] += F[F_DUR]
    I[I_H2D_BYTES] += ji[cur, J_BYTES]
    I[I_H2D_JOBS] += 1
    ji[cur, J_LANDED] = 1
    jf[cur, J_DONE_AT] = at
    I[I_ORDER] += 1
    ji[cur, J_DONE_ORDER] = I[I_ORDER]


@njit(cache=True)
def _start_next(F, I, jf, ji, now):
    """ClockedLane._start_next: the lane takes the next queued job (FIFO: jobs are numbered in submission order)."""
    while True:
        if I[I_QHEAD] == I[I_QTAIL]:
            I[I_STATE] = _IDLE
            return
        job = I[I_QHEAD]
        I[I_QHEAD] += 1
        duration = jf[job, J_DUR]
        I[I_CUR] = job
        F[F_START] = now
        F[F_DUR] = duration
        if duration > 0:
            I[I_STATE] = _BUSY
            F[F_EV_AT] = now + duration
            I[I_ORDER] += 1
            I[I_EV_ORDER] = I[I_ORDER]
            return
        _finish(F, I, jf, ji, now)


@njit(cache=True)
def _fire(F, I, jf, ji):
    """ClockedLane.fire: process the lane's pending event."""
    at = F[F_EV_AT]
    F[F_LAST_EVENT] = at
    if I[I_STATE] == _BUSY:
        _finish(F, I, jf, ji, at)
    _start_next(F, I, jf, ji, at)


@njit(cache=True)
def _advance(F, I, jf, ji, until, order):
    """LaneClock.advance: every lane event SimPy would process before the event (until, order)."""
    while I[I_STATE] != _IDLE and (F[F_EV_AT] < until or (F[F_EV_AT] == until and I[I_EV_ORDER] < order)):
        _fire(F, I, jf, ji)


@njit(cache=True)
def _sleep(F, I, jf, ji, duration):
    """Simulation._sleep_clocked: the compute stream runs its pending work."""
    I[I_WAITS] += 1
    end = F[F_NOW] + duration
    I[I_ORDER] += 1
    _advance(F, I, jf, ji, end, I[I_ORDER])
    F[F_NOW] = end


@njit(cache=True)
def _wait(F, I, jf, ji, job):
    """Simulation._wait_clocked: the compute stream waits until ``job`` has landed."""
    while ji[job, J_LANDED] == 0:
        _fire(F, I, jf, ji)
    _advance(F, I, jf, ji, jf[job, J_DONE_AT], ji[job, J_DONE_ORDER])
    F[F_NOW] = jf[job, J_DONE_AT]


@njit(cache=True)
def _submit(F, I, jf, ji, duration, nbytes):
    """ClockedLane.submit at the driver's time; returns the job's number."""
    job = I[I_QTAIL]
    I[I_QTAIL] += 1
    jf[job, J_DUR] = duration
    ji[job, J_BYTES] = nbytes
    ji[job, J_LANDED] = 0
    if I[I_STATE] == _IDLE:
        I[I_STATE] = _WAKING
        F[F_EV_AT] = F[F_NOW]
        I[I_ORDER] += 1
        I[I_EV_ORDER] = I[I_ORDER]
    return job


# ---- the cache: ExpertCache.access / _admit_key with LRU, FIFO, LFU or static rules
@njit(cache=True)
def _victim(cache, kind, scope_layer, pool, layer, E, experts, rest, stop, base):
    """The resident key of ``pool`` the rule evicts first, passing over the experts still to be used in this
    access (``experts[rest:stop]`` of layer ``base // E``); -1 when every resident key is protected."""
    resident, _, _, pool_of_layer, _, stamp, count, tie = cache
    lo, hi = (layer * E, layer * E + E) if scope_layer else (0, resident.shape[0])
    best = -1
    for key in range(lo, hi):
        if not resident[key] or pool_of_layer[key // E] != pool:
            continue
        protected = False
        for j in range(rest, stop):
            if base + experts[j] == key:
                protected = True
                break
        if protected:
            continue
        if best < 0:
            best = key
        elif kind == _LFU:
            if count[key] < count[best] or (count[key] == count[best] and tie[key] < tie[best]):
                best = key
        elif stamp[key] < stamp[best]:
            best = key
    return best


@njit(cache=True)
def _admit(cache, I, kind, scope_layer, E, key, layer, experts, rest, stop, base, evicted, n_evicted):
    """ExpertCache._admit_key for a demand miss: (admitted, evictions so far in this access)."""
    resident, used, limit, pool_of_layer, cost_of_layer, stamp, count, _ = cache
    if kind == _STATIC:
        return False, n_evicted
    pool = pool_of_layer[layer]
    cost = cost_of_layer[layer]
    if cost > limit[pool]:
        return False, n_evicted
    while used[pool] + cost > limit[pool]:
        victim = _victim(cache, kind, scope_layer, pool, layer, E, experts, rest, stop, base)
        if victim < 0:
            return False, n_evicted
        resident[victim] = False
        used[pool] -= cost_of_layer[victim // E]
        evicted[n_evicted] = victim
        n_evicted += 1
    resident[key] = True
    used[pool] += cost
    if kind == _LRU or kind == _FIFO:
        I[I_STAMP] += 1
        stamp[key] = I[I_STAMP]
    elif kind == _LFU:
        count[key] += 1  # a demand load is a dispatch: the count survives evictions (LFUCache._on_admit)
    return True, n_evicted


@njit(cache=True)
def _access(cache, I, kind, scope_layer, E, layer, experts, a, b, missed, evicted):
    """ExpertCache.access of one layer's routed experts ``experts[a:b]``: (hits, misses, evictions), with
    ``missed[i - a]`` set for each miss."""
    resident, _, _, _, _, stamp, count, _ = cache
    base = layer * E
    hits = 0
    misses = 0
    n_evicted = 0
    for i in range(a, b):
        key = base + experts[i]
        if resident[key]:
            hits += 1
            missed[i - a] = False
            if kind == _LRU:
                I[I_STAMP] += 1
                stamp[key] = I[I_STAMP]
            elif kind == _LFU:
                count[key] += 1
        else:
            misses += 1
            missed[i - a] = True
            _, n_evicted = _admit(cache, I, kind, scope_layer, E, key, layer, experts, i + 1, b, base, evicted,
                                  n_evicted)
    return hits, misses, n_evicted


# ---- the driver: Simulation._forward's layer and step
@njit(cache=True)
def _run_experts(F, I, jf, ji, gpu, expert_tokens, a, b, missed, job_of, streamed, pending, busy):
    """The device experts of a layer: ready ones in routing order, then each streamed load as its copy lands
    (DecisionCore.ready_experts / landing_order and Simulation._stall_for)."""
    if not streamed:
        for i in range(a, b):
            c = gpu[expert_tokens[i]]
            pending += c
            busy += c
        return pending, busy
    for i in range(a, b):
        if missed[i - a] and ji[job_of[i - a], J_LANDED] == 0:
            continue  # held back until its copy lands
        missed[i - a] = False
        c = gpu[expert_tokens[i]]
        pending += c
        busy += c
    for i in range(a, b):  # the held-back loads, in submission (= routing) order
        if not missed[i - a]:
            continue
        job = job_of[i - a]
        if ji[job, J_LANDED] == 0:
            if pending > 0.0:
                _sleep(F, I, jf, ji, pending)
            if ji[job, J_LANDED] == 0:
                t0 = F[F_NOW]
                I[I_WAITS] += 1
                _wait(F, I, jf, ji, job)
                F[F_STALL] += F[F_NOW] - t0
            pending = 0.0
        c = gpu[expert_tokens[i]]
        pending += c
        busy += c
    return pending, busy


@njit(cache=True)
def _layer(F, I, dec_acc, dec_hit, cache, shape, tables, layer, experts, expert_tokens, a, b, decode, pending,
           busy, jf, ji, missed, job_of, evicted):
    """One MoE layer: the cache's decisions, the counters, the copies, the experts (Simulation._forward)."""
    L, E, mode, write_back, kind, scope_layer = shape[0], shape[1], shape[2], shape[3], shape[4], shape[5]
    gpu, copy_in, d2h, expert_bytes, layer_copy_s, layer_copy_bytes = tables
    hits, misses, n_evicted = _access(cache, I, kind, scope_layer, E, layer, experts, a, b, missed, evicted)
    if decode:
        dec_acc[layer] += b - a
        dec_hit[layer] += hits
        I[I_DEMAND] += misses
    else:
        I[I_PREFILL_ACC] += b - a
        I[I_PREFILL_HITS] += hits
    streamed = False
    if mode == _LAYER:  # accelerate: the layer's offloaded experts, copied whole on the compute stream
        d = layer_copy_s[layer]
        if d > 0.0:
            pending += d
            F[F_STALL] += d
            F[F_H2D_BUSY] += d
            I[I_H2D_BYTES] += layer_copy_bytes[layer]
    elif misses > 0 and mode == _COMPUTE:  # loads (and swap's write-backs) on the compute stream
        d = copy_in[layer]
        for _ in range(misses):
            pending += d
            F[F_STALL] += d
            F[F_H2D_BUSY] += d
            I[I_H2D_BYTES] += expert_bytes[layer]
        if write_back:
            for j in range(n_evicted):
                l2 = evicted[j] // E
                d = d2h[l2]
                pending += d
                F[F_STALL] += d
                F[F_D2H_BUSY] += d
                I[I_D2H_BYTES] += expert_bytes[l2]
    elif misses > 0:  # demand loads on the copy stream, issued after the pending compute
        if pending > 0.0:
            _sleep(F, I, jf, ji, pending)
            pending = 0.0
        for i in range(a, b):
            if missed[i - a]:
                job_of[i - a] = _submit(F, I, jf, ji, copy_in[layer], expert_bytes[layer])
        streamed = True
    return _run_experts(F, I, jf, ji, gpu, expert_tokens, a, b, missed, job_of, streamed, pending, busy)


@njit(cache=True)
def _reset_request(cache, kind):
    """ExpertCache.reset_request: LFU's visit counts are per request."""
    if kind == _LFU:
        cache[6][:] = 0


@njit(cache=True)
def replay_batch(F, I, dec_acc, dec_hit, cache, shape, scalars, tables, phase, tokens, ne, head, shared,
                 step_offsets, layer_of, expert_offsets, experts, expert_tokens, num_prefill, step_end):
    """One batch's forward steps (replay_steps and Simulation._forward): fills the state F, I, the counters
    and each step's end time."""
    L, E = shape[0], shape[1]
    step_overhead, layer_overhead, dense = scalars[0], scalars[1], scalars[2]
    n_jobs = experts.shape[0] + 1
    jf = np.zeros((n_jobs, 2), dtype=np.float64)
    ji = np.zeros((n_jobs, 3), dtype=np.int64)
    I[I_QHEAD] = 0  # every copy of the previous batch was waited for: the lane is idle and its queue empty
    I[I_QTAIL] = 0
    missed = np.zeros(E, dtype=np.bool_)
    job_of = np.zeros(E, dtype=np.int64)
    evicted = np.zeros(L * E, dtype=np.int64)
    for s in range(phase.shape[0]):
        if s == num_prefill:
            _reset_request(cache, shape[4])
        ts = F[F_NOW]
        h, n, sh = head[s], ne[s], shared[s]
        pending = step_overhead + h + dense * n
        busy = F[F_BUSY] + (h + dense * n)
        attention = n + layer_overhead + sh
        attention_busy = n + sh
        decode = phase[s] == DECODE
        w, w_end = step_offsets[s], step_offsets[s + 1]
        for layer in range(L):
            pending += attention
            busy += attention_busy
            if w < w_end and layer_of[w] == layer:
                pending, busy = _layer(F, I, dec_acc, dec_hit, cache, shape, tables, layer, experts, expert_tokens,
                                       expert_offsets[w], expert_offsets[w + 1], decode, pending, busy, jf, ji,
                                       missed, job_of, evicted)
                w += 1
        F[F_BUSY] = busy
        if pending > 0.0:
            _sleep(F, I, jf, ji, pending)
        t = F[F_NOW]
        step_end[s] = t
        if decode:
            F[F_DECODE_TIME] += t - ts
            I[I_DECODE_TOKENS] += tokens[s]
    _reset_request(cache, shape[4])
