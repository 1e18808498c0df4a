"""The compiled half of :mod:`moesim.simulator.kernel`: imported only when a run takes the compiled replay, so
importing the simulator (or ``moesim --help``) never imports numba.

Every function mirrors one of the engine's, named in its docstring; float operations are written in the
engine's order (no fastmath), so sums round as the engine's do. Numba compiles these once per machine and keeps
the machine code on disk (``cache=True``): a warm process pays no compile. State is passed as whole arrays
(2-D where several rows belong together), never as tuples of arrays or row slices: each array taken out of a
tuple is a reference count change, and those cost more than the replay's own work.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from moesim.simulator.kernel import (
    _BELADY, _BUSY, _COMPUTE, _CPU_HOST, _EAM_ALL, _FIDDLER, _FIFO, _FIRST_NON_RESIDENT, _HYBRIMOE, _IDLE, _LAYER,
    _LFU, _LRU, _MRS, _NEXT_LAYER, _STATIC, _WAKING, B_KEPT, B_MISSED, B_ON_CPU, B_RES, C_BUFFER, C_COUNT, C_INFLIGHT, C_NEXT,
    C_POS, C_RESIDENT, C_STAMP, C_TIE, C_UNUSED, CPU, D2H, F_BUSY, F_DECODE_TIME, F_HOST_AT, F_NOW, F_STALL, H2D,
    H_HOST_AHEAD, H_PAGEABLE_INLINE, I_DECODE_CPU,
    I_DECODE_TOKENS, I_DEMAND, I_H2D_SEQ, I_NJOBS, I_ORDER, I_PF_ISSUED, I_PF_SERVED, I_PF_USED, I_PREFILL_ACC,
    I_PREFILL_HITS, I_STAMP, I_WAITS, JOBS, L_BQHEAD, L_BQTAIL, L_BUSY_S, L_BUSY_UNTIL, L_BYTES, L_CONTEND_UNTIL,
    L_CUR, L_DUR, L_EV_AT, L_EV_ORDER, L_JOBS, L_LAST_EVENT, L_QHEAD, L_QTAIL, L_SERIAL, L_STATE, P_LIMIT,
    P_MEMBERS, P_USED, Q_BACKGROUND, S_EVICTED, S_JOB_OF, S_ORDER, S_PREFETCH, S_SEL, H_BACKGROUND, H_DROP_QUEUED,
    H_EARLIER_ONLY, H_LIMIT, H_PREFETCHER, T_BYTES, T_COPY_CONC, T_COPY_IN, T_COST, T_D2H, T_LAYER_COPY,
    T_LAYER_COPY_BYTES, T_PLACE_COPY, T_POOL, X_CPU, X_DOWN, X_DOWN_CONC, X_GPU, X_UP, X_UP_CONC,
)
from moesim.tracer import DECODE, PREFILL

# columns of the job tables: floats (duration, duration while the other copy direction is busy, done at) and
# integers (bytes, landed, done order, next stage or -1, first stage of the chain, lane)
J_DUR, J_CONC, J_DONE_AT = 0, 1, 2
J_BYTES, J_LANDED, J_DONE_ORDER, J_THEN, J_ROOT, J_LANE, J_NUM, J_SERVED, J_SEQ, J_QUEUE, J_KEY = range(11)
# J_QUEUE: where a job is (DemandFirstQueue); J_KEY: the expert a prefetch copies
IN_BACKGROUND, IN_DEMAND, STARTED, WITHDRAWN = 0, 1, 2, 3
# jobs and lane queues are rings of JOBS slots: a job's number n is in slot n & (JOBS - 1) until a later job
# takes the slot, by when it has long landed (a slot still in use is never taken: an error, not a wrong answer).
# Queues hold job numbers: a withdrawn prefetch's slot may be taken while its number is still queued.
# HybriMoEPlacement's released constants (rule "code")
HYBRIMOE_CPU_PER_TOKEN_S, HYBRIMOE_CPU_BASE_S, HYBRIMOE_GPU_S, HYBRIMOE_MOVE_S = 1e-3, 0.79e-3, 0.5e-3, 0.418e-3
FIDDLER_CPU_PER_TOKEN, FIDDLER_GPU_TRANSFER = 7.0, 70.0  # FiddlerPlacement's (rule "code")


# ---- the lanes: ClockedLane / LaneClock (H2D, D2H and the CPU pool), demand jobs, no contention
@njit(cache=True, inline='always')
def _push(LI, Q, lane, row, head, tail, number):
    if LI[lane, tail] - LI[lane, head] >= JOBS:
        raise RuntimeError("compiled replay: a lane's queue outgrew its ring")
    Q[row, LI[lane, tail] & (JOBS - 1)] = number
    LI[lane, tail] += 1


@njit(cache=True, inline='always')
def _pop(LI, Q, JI, lane):
    """DemandFirstQueue.pop: the slot of the next job to start (-1: none); a background entry whose job was
    withdrawn or promoted since is passed over."""
    if LI[lane, L_QHEAD] != LI[lane, L_QTAIL]:
        number = Q[lane, LI[lane, L_QHEAD] & (JOBS - 1)]
        LI[lane, L_QHEAD] += 1
        return number & (JOBS - 1)
    while LI[lane, L_BQHEAD] != LI[lane, L_BQTAIL]:
        number = Q[Q_BACKGROUND, LI[lane, L_BQHEAD] & (JOBS - 1)]
        LI[lane, L_BQHEAD] += 1
        job = number & (JOBS - 1)
        if JI[job, J_NUM] == number and JI[job, J_QUEUE] == IN_BACKGROUND:
            return job
    return -1


@njit(cache=True, inline='always')
def _promote(LI, Q, JI, job):
    """DemandFirstQueue.promote: a queued background job somebody waits for joins the demand queue."""
    if JI[job, J_QUEUE] == IN_BACKGROUND:
        JI[job, J_QUEUE] = IN_DEMAND
        _push(LI, Q, JI[job, J_LANE], JI[job, J_LANE], L_QHEAD, L_QTAIL, JI[job, J_NUM])


@njit(cache=True, inline='always')
def _enqueue(I, LF, LI, Q, JI, lane, job, now):
    """ClockedLane.submit's queueing (DemandFirstQueue.push): an idle lane schedules its wake-up now."""
    if JI[job, J_QUEUE] == IN_BACKGROUND:
        _push(LI, Q, lane, Q_BACKGROUND, L_BQHEAD, L_BQTAIL, JI[job, J_NUM])
    else:
        _push(LI, Q, lane, lane, L_QHEAD, L_QTAIL, JI[job, J_NUM])
    if lane == H2D:  # the copy lane's submission number: waits are served in this order
        I[I_H2D_SEQ] += 1
        JI[job, J_SEQ] = I[I_H2D_SEQ]
    if LI[lane, L_STATE] == _IDLE:
        LI[lane, L_STATE] = _WAKING
        LF[lane, L_EV_AT] = now
        I[I_ORDER] += 1
        LI[lane, L_EV_ORDER] = I[I_ORDER]


@njit(cache=True, inline='always')
def _new_job(I, JF, JI, lane, duration, concurrent, nbytes, then, root):
    """A job's slot (its number is ``JI[slot, J_NUM]``)."""
    number = I[I_NJOBS]
    I[I_NJOBS] += 1
    job = number & (JOBS - 1)
    if number >= JOBS and JI[job, J_SERVED] == 0:
        raise RuntimeError("compiled replay: more jobs in flight than its ring holds")
    JI[job, J_NUM] = number
    JI[job, J_SERVED] = 0
    JF[job, J_DUR] = duration
    JF[job, J_CONC] = concurrent
    JI[job, J_BYTES] = nbytes
    JI[job, J_LANDED] = 0
    JI[job, J_THEN] = then
    JI[job, J_ROOT] = job if root < 0 else root
    JI[job, J_LANE] = lane
    JI[job, J_QUEUE] = IN_DEMAND
    return job


@njit(cache=True, inline='always')
def _landed(JI, number):
    """Whether job ``number`` has landed (a job whose slot a later job took landed long ago)."""
    slot = number & (JOBS - 1)
    return JI[slot, J_NUM] != number or JI[slot, J_LANDED] == 1


@njit(cache=True, inline='always')
def _finish(I, LF, LI, Q, JF, JI, lane, at):
    """ClockedLane._finish: the job in service is done; its chain's next stage is queued, or the chain is done."""
    cur = LI[lane, L_CUR]
    LF[lane, L_BUSY_S] += LF[lane, L_DUR]
    LI[lane, L_BYTES] += JI[cur, J_BYTES]
    LI[lane, L_JOBS] += 1
    JI[cur, J_SERVED] = 1
    nxt = JI[cur, J_THEN]
    if nxt >= 0:
        _enqueue(I, LF, LI, Q, JI, JI[nxt, J_LANE], nxt, at)
    else:
        root = JI[cur, J_ROOT]
        JI[root, J_LANDED] = 1
        JF[root, J_DONE_AT] = at
        I[I_ORDER] += 1
        JI[root, J_DONE_ORDER] = I[I_ORDER]


@njit(cache=True, inline='always')
def _after_compute(duration, start, compute_until):
    """transfer.stretched with an infinite slowdown (default-stream copies): the copy starts when the compute
    in progress ends."""
    if duration != duration or duration == 0.0:
        overlap = duration * np.inf  # Python's min(nan, x) is nan
    else:
        overlap = compute_until - start
    if overlap <= 0.0:
        return duration
    return overlap + (duration - overlap / np.inf)


@njit(cache=True, inline='always')
def _start_next(I, LF, LI, Q, JF, JI, lane, now):
    """ClockedLane._start_next: the next queued job, at its contended time while the other copy direction is busy."""
    while True:
        job = _pop(LI, Q, JI, lane)
        if job < 0:
            LI[lane, L_STATE] = _IDLE
            return
        JI[job, J_QUEUE] = STARTED
        duration = JF[job, J_DUR]
        if lane != CPU and LF[1 - lane, L_BUSY_UNTIL] > now:
            duration = JF[job, J_CONC]
        if LI[lane, L_SERIAL]:
            duration = _after_compute(duration, now, LF[lane, L_CONTEND_UNTIL])
        LF[lane, L_BUSY_UNTIL] = now + duration
        LI[lane, L_CUR] = job
        LF[lane, L_DUR] = duration
        if duration > 0:
            LI[lane, L_STATE] = _BUSY
            LF[lane, L_EV_AT] = now + duration
            I[I_ORDER] += 1
            LI[lane, L_EV_ORDER] = I[I_ORDER]
            return
        _finish(I, LF, LI, Q, JF, JI, lane, now)


@njit(cache=True, inline='always')
def _first_lane(LF, LI):
    """The lane whose pending event SimPy processes first (time, then event number); -1 when all are idle."""
    first = -1
    for lane in range(3):
        if LI[lane, L_STATE] != _IDLE and (first < 0 or LF[lane, L_EV_AT] < LF[first, L_EV_AT] or (
                LF[lane, L_EV_AT] == LF[first, L_EV_AT] and LI[lane, L_EV_ORDER] < LI[first, L_EV_ORDER])):
            first = lane
    return first


@njit(cache=True, inline='always')
def _fire(I, LF, LI, Q, JF, JI, lane):
    """ClockedLane.fire."""
    at = LF[lane, L_EV_AT]
    LF[lane, L_LAST_EVENT] = at
    if LI[lane, L_STATE] == _BUSY:
        _finish(I, LF, LI, Q, JF, JI, lane, at)
    _start_next(I, LF, LI, Q, JF, JI, lane, at)


@njit(cache=True, inline='always')
def _advance(I, LF, LI, Q, JF, JI, until, order):
    """LaneClock.advance: every lane event SimPy processes before the event (until, order)."""
    while True:
        first = _first_lane(LF, LI)
        if first < 0 or LF[first, L_EV_AT] > until or (
                LF[first, L_EV_AT] == until and LI[first, L_EV_ORDER] >= order):
            return
        _fire(I, LF, LI, Q, JF, JI, first)


@njit(cache=True)
def _sleep(F, I, LF, LI, Q, JF, JI, duration):
    """Simulation._sleep_clocked: the compute stream runs its pending work (after the default-stream copy in
    flight, a stall)."""
    now = F[F_NOW]
    if LI[H2D, L_SERIAL]:
        waited = max(LF[H2D, L_BUSY_UNTIL] - now, 0.0)
        duration += waited
        F[F_STALL] += waited
    I[I_WAITS] += 1
    end = now + duration
    LF[H2D, L_CONTEND_UNTIL] = end
    I[I_ORDER] += 1
    _advance(I, LF, LI, Q, JF, JI, end, I[I_ORDER])
    F[F_NOW] = end


@njit(cache=True)
def _stall_for(F, I, LF, LI, Q, JF, JI, job, pending):
    """Simulation._stall_for: run the pending work, then wait for ``job``'s chain if it has not landed."""
    if pending > 0.0:
        _sleep(F, I, LF, LI, Q, JF, JI, pending)
    if JI[job, J_LANDED] == 0:
        t0 = F[F_NOW]
        I[I_WAITS] += 1
        while JI[job, J_LANDED] == 0:  # LaneClock.run_until_done
            _fire(I, LF, LI, Q, JF, JI, _first_lane(LF, LI))
        _advance(I, LF, LI, Q, JF, JI, JF[job, J_DONE_AT], JI[job, J_DONE_ORDER])
        F[F_NOW] = JF[job, J_DONE_AT]
        F[F_STALL] += F[F_NOW] - t0


# ---- the cache: ExpertCache.access / _admit_key with the LRU, FIFO, LFU, static or MRS rule
@njit(cache=True, inline='always')
def _victim(CK, CP, members, scores, kind, scope_layer, pool, layer, E, experts, SI, rest, n_sel, base, floor):
    """The resident key of ``pool`` the rule evicts first, passing over the device experts still to be used in
    this access (``experts[SI[S_SEL, rest:n_sel]]``) and the keys from ``floor`` on; -1 when every resident key
    is protected. Only the pool's members are scanned (``members``: each pool's resident keys, in no order; ties
    go to the lower key)."""
    start = layer * E if scope_layer else 0
    best = -1
    for m in range(start, start + CP[P_MEMBERS, pool]):
        key = members[m]
        if key >= floor:
            continue
        protected = False
        if base <= key < base + E:  # only the access's own layer has protected keys
            for j in range(rest, n_sel):
                if base + experts[SI[S_SEL, j]] == key:
                    protected = True
                    break
        if protected:
            continue
        if best < 0:
            best = key
        elif kind == _LFU:
            if CK[C_COUNT, key] < CK[C_COUNT, best] or (
                    CK[C_COUNT, key] == CK[C_COUNT, best] and CK[C_TIE, key] < CK[C_TIE, best]):
                best = key
        elif kind == _MRS:
            if scores[key] < scores[best] or (scores[key] == scores[best] and key < best):
                best = key
        elif kind == _BELADY:  # used farthest in the future
            if CK[C_NEXT, key] > CK[C_NEXT, best] or (CK[C_NEXT, key] == CK[C_NEXT, best] and key < best):
                best = key
        elif CK[C_STAMP, key] < CK[C_STAMP, best]:
            best = key
    return best


@njit(cache=True, inline='always')
def _join(CK, CP, members, scope_layer, E, pool, key):
    """``key`` becomes a member of ``pool`` (resident)."""
    at = (key // E) * E * scope_layer + CP[P_MEMBERS, pool]
    members[at] = key
    CK[C_POS, key] = at
    CP[P_MEMBERS, pool] += 1
    CK[C_RESIDENT, key] = 1


@njit(cache=True, inline='always')
def _leave(CK, CP, members, scope_layer, E, pool, key):
    """``key`` leaves ``pool``: the pool's last member takes its place."""
    last = (key // E) * E * scope_layer + CP[P_MEMBERS, pool] - 1
    moved = members[last]
    members[CK[C_POS, key]] = moved
    CK[C_POS, moved] = CK[C_POS, key]
    CP[P_MEMBERS, pool] -= 1
    CK[C_RESIDENT, key] = 0


@njit(cache=True, inline='always')
def _admit(I, CK, CP, TLI, members, scores, kind, scope_layer, E, key, layer, experts, SI, rest, n_sel, base,
           floor, n_evicted, next_use, used):
    """ExpertCache._admit_key for a demand miss (``used``) or a prefetch (Belady: whose next use is ``next_use``):
    (admitted, the evictions so far, in ``SI[S_EVICTED]``); the experts ``experts[SI[S_SEL, rest:n_sel]]`` of the
    layer at ``base`` are protected."""
    if kind == _STATIC:
        return False, n_evicted
    pool = TLI[T_POOL, layer]
    cost = TLI[T_COST, layer]
    if cost > CP[P_LIMIT, pool]:
        return False, n_evicted
    if kind == _BELADY and CP[P_USED, pool] + cost > CP[P_LIMIT, pool]:  # BeladyCache._bypass
        found = _victim(CK, CP, members, scores, kind, scope_layer, pool, layer, E, experts, SI, rest, n_sel, base,
                        floor)
        if found < 0 or next_use >= CK[C_NEXT, found]:
            return False, n_evicted
    while CP[P_USED, pool] + cost > CP[P_LIMIT, pool]:
        victim = _victim(CK, CP, members, scores, kind, scope_layer, pool, layer, E, experts, SI, rest, n_sel,
                         base, floor)
        if victim < 0:
            return False, n_evicted
        _leave(CK, CP, members, scope_layer, E, pool, victim)
        CP[P_USED, pool] -= TLI[T_COST, victim // E]
        SI[S_EVICTED, n_evicted] = victim
        n_evicted += 1
    _join(CK, CP, members, scope_layer, E, pool, key)
    CP[P_USED, pool] += cost
    if kind == _LRU or kind == _FIFO:
        I[I_STAMP] += 1
        CK[C_STAMP, key] = I[I_STAMP]
    elif kind == _LFU and used:
        CK[C_COUNT, key] += 1  # a demand load is a dispatch: the count survives evictions (LFUCache._on_admit)
    elif kind == _BELADY:
        CK[C_NEXT, key] = next_use
    return True, n_evicted


@njit(cache=True, inline='always')
def _access(I, CK, CP, TLI, members, scores, kind, scope_layer, E, layer, experts, SI, SB, n_sel, next_use):
    """ExpertCache.access of the device experts ``experts[SI[S_SEL, :n_sel]]``: (hits, misses, evictions), with
    ``SB[B_MISSED, j]`` set for each miss and the evicted keys in ``SI[S_EVICTED]``."""
    base = layer * E
    hits = 0
    misses = 0
    n_evicted = 0
    for j in range(n_sel):
        key = base + experts[SI[S_SEL, j]]
        if CK[C_RESIDENT, key]:
            hits += 1
            SB[B_MISSED, j] = False
            if kind == _LRU:
                I[I_STAMP] += 1
                CK[C_STAMP, key] = I[I_STAMP]
            elif kind == _LFU:
                CK[C_COUNT, key] += 1
            elif kind == _BELADY:
                CK[C_NEXT, key] = next_use[SI[S_SEL, j]]
        else:
            misses += 1
            SB[B_MISSED, j] = True
            nu = next_use[SI[S_SEL, j]] if kind == _BELADY else 0
            kept, n_evicted = _admit(I, CK, CP, TLI, members, scores, kind, scope_layer, E, key, layer, experts, SI,
                                     j + 1, n_sel, base, CK.shape[1], n_evicted, nu, True)
            SB[B_KEPT, j] = kept
    return hits, misses, n_evicted


@njit(cache=True, inline='always')
def _observe_scores(scores, params, layer, E, experts, weights, a, b):
    """MRSCache.observe: the layer's scores decay, the router's top-p (by weight, stable) gain ``alpha * weight``."""
    alpha, top_p = params[0], int(params[1])
    for e in range(E):
        scores[layer * E + e] *= 1.0 - alpha
    n = b - a
    if n > top_p:
        chosen = np.argsort(-weights[a:b], kind="mergesort")[:top_p] + a
        for i in chosen:
            scores[layer * E + experts[i]] += alpha * weights[i]
    else:
        for i in range(a, b):
            scores[layer * E + experts[i]] += alpha * weights[i]


# ---- placement: FiddlerPlacement / HybriMoEPlacement / CpuForHostExperts
@njit(cache=True, inline='always')
def _hss_before(SB, experts, expert_tokens, a, q, p):
    """Whether expert ``q`` comes before ``p`` in HybriMoE's order: resident first, more tokens, lower id."""
    if SB[B_RES, q] != SB[B_RES, p]:
        return SB[B_RES, q]
    if expert_tokens[a + q] != expert_tokens[a + p]:
        return expert_tokens[a + q] > expert_tokens[a + p]
    return experts[a + q] < experts[a + p]


@njit(cache=True, inline='always')
def _hybrimoe_split(SI, SB, TT, experts, expert_tokens, a, b, code, move):
    """HybriMoEPlacement.place's greedy split of one decode layer: the GPU takes the head of the order, the CPU
    the tail, whichever would finish earlier."""
    n = b - a
    for j in range(n):  # insertion sort by (not resident, -tokens, expert): n <= experts per layer
        SI[S_ORDER, j] = j
        k = j
        while k > 0 and _hss_before(SB, experts, expert_tokens, a, SI[S_ORDER, k], SI[S_ORDER, k - 1]):
            SI[S_ORDER, k - 1], SI[S_ORDER, k] = SI[S_ORDER, k], SI[S_ORDER, k - 1]
            k -= 1
    gpu_end = 0.0
    xfer_end = 0.0
    cpu_end = 0.0
    lo, hi = 0, n - 1
    while lo <= hi:
        g = SI[S_ORDER, lo]
        g_cost = HYBRIMOE_GPU_S if code else TT[X_GPU, expert_tokens[a + g]]
        if SB[B_RES, g]:
            new_gpu = gpu_end + g_cost
            new_xfer = xfer_end
        else:
            new_xfer = xfer_end + move
            new_gpu = max(gpu_end, new_xfer) + g_cost
        c = SI[S_ORDER, hi]
        tc = expert_tokens[a + c]
        new_cpu = cpu_end + (HYBRIMOE_CPU_PER_TOKEN_S * tc + HYBRIMOE_CPU_BASE_S if code else TT[X_CPU, tc])
        if new_gpu <= new_cpu:
            gpu_end, xfer_end = new_gpu, new_xfer
            lo += 1
        else:
            cpu_end = new_cpu
            SB[B_ON_CPU, c] = True
            hi -= 1


@njit(cache=True, inline='always')
def _place(placement, code, CK, TL, TT, SI, SB, layer, E, phase, experts, expert_tokens, a, b, offload_routed):
    """Per routed expert of the layer, whether it runs on the CPU (Placement.place): ``SB[B_ON_CPU]``.
    ``offload_routed``: the routed experts' token sum (the step's tokens x top_k) from which a prefill step runs
    host experts on the GPU (CpuForHostExperts; 0: never)."""
    n = b - a
    for j in range(n):
        SB[B_ON_CPU, j] = False
        SB[B_RES, j] = CK[C_RESIDENT, layer * E + experts[a + j]] != 0
    if placement == _FIDDLER:
        for j in range(n):
            if SB[B_RES, j]:
                continue
            t = expert_tokens[a + j]
            if code:
                SB[B_ON_CPU, j] = t * FIDDLER_CPU_PER_TOKEN < FIDDLER_GPU_TRANSFER
            else:
                SB[B_ON_CPU, j] = TT[X_CPU, t] < TL[T_PLACE_COPY, layer]
    elif placement == _HYBRIMOE and phase != PREFILL and n > 0:
        _hybrimoe_split(SI, SB, TT, experts, expert_tokens, a, b, code,
                        HYBRIMOE_MOVE_S if code else TL[T_PLACE_COPY, layer])
    elif placement == _CPU_HOST:
        offloaded = False
        if offload_routed > 0 and phase == PREFILL:
            routed = 0
            for j in range(n):
                routed += expert_tokens[a + j]
            offloaded = routed >= offload_routed
        if not offloaded:
            for j in range(n):
                SB[B_ON_CPU, j] = not SB[B_RES, j]


# ---- the driver: Simulation._forward's layer and step
@njit(cache=True, inline='always')
def _cpu_task(I, LF, LI, Q, JF, JI, TT, SB, hidden, expert_tokens, a, b, now):
    """Simulation._cpu_experts: the CPU experts' activations down, their FFNs on the CPU pool, the outputs up,
    as one chain of three jobs; returns its first (the job the driver waits on)."""
    tokens = 0
    ffn = 0.0
    up_s = 0.0
    up_conc = 0.0
    down_s = 0.0
    down_conc = 0.0
    for j in range(b - a):
        if SB[B_ON_CPU, j]:
            t = expert_tokens[a + j]
            tokens += t
            ffn += TT[X_CPU, t]
            up_s += TT[X_UP, t]
            up_conc += TT[X_UP_CONC, t]
            down_s += TT[X_DOWN, t]
            down_conc += TT[X_DOWN_CONC, t]
    nbytes = tokens * hidden * 2
    first = _new_job(I, JF, JI, D2H, down_s, down_conc, nbytes, -1, -1)
    ffn_job = _new_job(I, JF, JI, CPU, ffn, ffn, 0, -1, first)
    up_job = _new_job(I, JF, JI, H2D, up_s, up_conc, nbytes, -1, first)
    JI[first, J_THEN] = ffn_job
    JI[ffn_job, J_THEN] = up_job
    _enqueue(I, LF, LI, Q, JI, D2H, first, now)
    return first


@njit(cache=True, inline='always')
def _copies(F, I, LF, LI, Q, JF, JI, CK, TL, TLI, SI, SB, E, mode, write_back, layer, experts, n_sel, misses,
            n_evicted, pending):
    """The layer's copies: accelerate's whole layer, loads (and swap's write-backs) on the compute stream, or
    demand loads on the copy lane after the pending compute. Returns (pending, loads were streamed)."""
    if mode == _LAYER:
        d = TL[T_LAYER_COPY, layer]
        if d > 0.0:
            pending += d
            F[F_STALL] += d
            LF[H2D, L_BUSY_S] += d
            LI[H2D, L_BYTES] += TLI[T_LAYER_COPY_BYTES, layer]
        return pending, False
    if misses == 0:
        return pending, False
    if mode == _COMPUTE:
        d = TL[T_COPY_IN, layer]
        for _ in range(misses):
            pending += d
            F[F_STALL] += d
            LF[H2D, L_BUSY_S] += d
            LI[H2D, L_BYTES] += TLI[T_BYTES, layer]
        if write_back:
            for j in range(n_evicted):
                l2 = SI[S_EVICTED, j] // E
                d = TL[T_D2H, l2]
                pending += d
                F[F_STALL] += d
                LF[D2H, L_BUSY_S] += d
                LI[D2H, L_BYTES] += TLI[T_BYTES, l2]
        return pending, False
    if pending > 0.0:
        _sleep(F, I, LF, LI, Q, JF, JI, pending)
        pending = 0.0
    for j in range(n_sel):  # DecisionCore.stream_loads: a load in flight is waited for, others are issued
        if SB[B_MISSED, j]:
            key = layer * E + experts[SI[S_SEL, j]]
            number = CK[C_INFLIGHT, key]
            if number < 0:
                job = _new_job(I, JF, JI, H2D, TL[T_COPY_IN, layer], TL[T_COPY_CONC, layer], TLI[T_BYTES, layer], -1,
                               -1)
                number = JI[job, J_NUM]
                _enqueue(I, LF, LI, Q, JI, H2D, job, F[F_NOW])
                if SB[B_KEPT, j]:
                    CK[C_INFLIGHT, key] = number
            SI[S_JOB_OF, j] = number
    return pending, True


@njit(cache=True, inline='always')
def _run_experts(F, I, LF, LI, Q, JF, JI, CK, TT, SI, SB, layer, E, experts, expert_tokens, n_sel, pending, busy):
    """The device experts: those whose weights are in place in routing order, then those waiting for a copy (a
    load, or a prefetch still in flight) in the copies' submission order, each after its copy lands
    (DecisionCore.ready_experts / landing_order and Simulation._stall_for). Returns (pending, busy)."""
    n_wait = 0
    for j in range(n_sel):
        key = layer * E + experts[SI[S_SEL, j]]
        number = SI[S_JOB_OF, j]
        if number < 0:
            number = CK[C_INFLIGHT, key]
        if number >= 0 and _landed(JI, number):
            if CK[C_INFLIGHT, key] == number:
                CK[C_INFLIGHT, key] = -1
            number = -1
        if number >= 0:
            SI[S_JOB_OF, j] = number
            _promote(LI, Q, JI, number & (JOBS - 1))
            k = n_wait  # insertion by submission number
            while k > 0 and JI[SI[S_JOB_OF, SI[S_ORDER, k - 1]] & (JOBS - 1), J_SEQ] > JI[number & (JOBS - 1), J_SEQ]:
                SI[S_ORDER, k] = SI[S_ORDER, k - 1]
                k -= 1
            SI[S_ORDER, k] = j
            n_wait += 1
            continue
        c = TT[X_GPU, expert_tokens[SI[S_SEL, j]]]
        pending += c
        busy += c
    for w in range(n_wait):
        j = SI[S_ORDER, w]
        key = layer * E + experts[SI[S_SEL, j]]
        if CK[C_INFLIGHT, key] == SI[S_JOB_OF, j]:
            CK[C_INFLIGHT, key] = -1  # nothing reads it while the driver waits
    for w in range(n_wait):
        j = SI[S_ORDER, w]
        number = SI[S_JOB_OF, j]
        if not _landed(JI, number):
            _stall_for(F, I, LF, LI, Q, JF, JI, number & (JOBS - 1), pending)
            pending = 0.0
        c = TT[X_GPU, expert_tokens[SI[S_SEL, j]]]
        pending += c
        busy += c
    return pending, busy


@njit(cache=True, inline='always')
def _served(CK, SI, SB, layer, E, experts, n_sel, n_evicted):
    """DecisionCore.begin_layer after the access: hits on unused prefetches and misses in the side buffer are
    served by a prefetch (counted; a buffered one is no load: ``SB[B_MISSED]`` cleared, its copy waited for), the
    layer's other buffered prefetches are dropped, and each evicted key's prefetch is forgotten, unless it is a
    hit of this layer still landing (then the expert waits for it). Returns (served, loads)."""
    served = 0
    for j in range(n_sel):
        SI[S_JOB_OF, j] = -1
        key = layer * E + experts[SI[S_SEL, j]]
        if not SB[B_MISSED, j] and CK[C_UNUSED, key]:
            CK[C_UNUSED, key] = 0
            served += 1
    for v in range(n_evicted):
        evicted = SI[S_EVICTED, v]
        CK[C_UNUSED, evicted] = 0
        number = CK[C_INFLIGHT, evicted]
        CK[C_INFLIGHT, evicted] = -1
        if number >= 0 and evicted // E == layer:
            for j in range(n_sel):
                if not SB[B_MISSED, j] and layer * E + experts[SI[S_SEL, j]] == evicted:
                    SI[S_JOB_OF, j] = number
    loads = 0
    for j in range(n_sel):
        if SB[B_MISSED, j]:
            key = layer * E + experts[SI[S_SEL, j]]
            if CK[C_BUFFER, key] >= 0:
                served += 1
                SI[S_JOB_OF, j] = CK[C_BUFFER, key]
                SB[B_MISSED, j] = False
            else:
                loads += 1
    for key in range(layer * E, layer * E + E):  # the rest guessed wrong: the layer's side buffer is released
        CK[C_BUFFER, key] = -1
    return served, loads


@njit(cache=True, inline='always')
def _issue_prefetches(F, I, LF, LI, Q, JF, JI, CK, CP, TL, TLI, members, scores, shape, SI, layer, experts, n_sel,
                      n_pf):
    """DecisionCore.issue_prefetches for the keys ``SI[S_PREFETCH, :n_pf]``: each not resident is inserted into the
    cache (this layer's device experts protected, and with ``evicts_earlier_layers_only`` this and later layers)
    and copied on the copy lane (a background job when demand loads go first)."""
    E, kind, scope_layer = shape[1], shape[4], shape[5]
    floor = layer * E if shape[H_EARLIER_ONLY] else CK.shape[1]
    for g in range(n_pf):
        pkey = SI[S_PREFETCH, g]
        nxt = pkey // E
        if CK[C_RESIDENT, pkey] or CK[C_BUFFER, pkey] >= 0:
            continue
        if shape[9] == _FIRST_NON_RESIDENT:  # into the side buffer, not the cache
            job = _new_job(I, JF, JI, H2D, TL[T_COPY_IN, nxt], TL[T_COPY_CONC, nxt], TLI[T_BYTES, nxt], -1, -1)
            if shape[H_BACKGROUND]:
                JI[job, J_QUEUE] = IN_BACKGROUND
            _enqueue(I, LF, LI, Q, JI, H2D, job, F[F_NOW])
            CK[C_BUFFER, pkey] = JI[job, J_NUM]
            I[I_PF_ISSUED] += 1
            continue
        admitted, n_evicted = _admit(I, CK, CP, TLI, members, scores, kind, scope_layer, E, pkey, nxt, experts, SI, 0,
                                     n_sel, layer * E, floor, 0, 0, False)
        if not admitted:
            continue
        for v in range(n_evicted):
            CK[C_UNUSED, SI[S_EVICTED, v]] = 0
            CK[C_INFLIGHT, SI[S_EVICTED, v]] = -1
        job = _new_job(I, JF, JI, H2D, TL[T_COPY_IN, nxt], TL[T_COPY_CONC, nxt], TLI[T_BYTES, nxt], -1, -1)
        JI[job, J_KEY] = pkey
        if shape[H_BACKGROUND]:
            JI[job, J_QUEUE] = IN_BACKGROUND
        _enqueue(I, LF, LI, Q, JI, H2D, job, F[F_NOW])
        CK[C_INFLIGHT, pkey] = JI[job, J_NUM]
        CK[C_UNUSED, pkey] = 1
        I[I_PF_ISSUED] += 1


@njit(cache=True, inline='always')
def _drop_queued(LI, Q, JI, CK, CP, TLI, members, E, scope_layer):
    """DecisionCore.drop_queued_prefetches: every queued background prefetch still tracked (in flight, unused) is
    withdrawn and leaves the cache (the order of the keys changes no victim: each rule breaks ties by key)."""
    for at in range(LI[H2D, L_BQHEAD], LI[H2D, L_BQTAIL]):
        number = Q[Q_BACKGROUND, at & (JOBS - 1)]
        job = number & (JOBS - 1)
        if JI[job, J_NUM] != number or JI[job, J_QUEUE] != IN_BACKGROUND:
            continue
        key = JI[job, J_KEY]
        if CK[C_INFLIGHT, key] != number or not CK[C_UNUSED, key]:
            continue
        JI[job, J_QUEUE] = WITHDRAWN
        JI[job, J_SERVED] = 1  # its slot may be taken
        CK[C_INFLIGHT, key] = -1
        CK[C_UNUSED, key] = 0
        if CK[C_RESIDENT, key]:
            pool = TLI[T_POOL, key // E]
            _leave(CK, CP, members, scope_layer, E, pool, key)
            CP[P_USED, pool] -= TLI[T_COST, key // E]


# ---- eam-all: EAMEveryLayerPrefetch's match, in numpy's float order (its sums are pairwise, as numpy's are)
@njit(cache=True)
def _pairwise_block(a, start, n):
    """numpy's pairwise_sum of ``a[start:start + n]`` for n <= 128 (what ``add.reduce`` does along a contiguous
    axis): a plain loop below 8, else eight running sums."""
    if n < 8:
        res = 0.0
        for i in range(start, start + n):
            res += a[i]
        return res
    r0, r1, r2, r3 = a[start], a[start + 1], a[start + 2], a[start + 3]
    r4, r5, r6, r7 = a[start + 4], a[start + 5], a[start + 6], a[start + 7]
    i = 8
    while i < n - n % 8:
        r0 += a[start + i]
        r1 += a[start + i + 1]
        r2 += a[start + i + 2]
        r3 += a[start + i + 3]
        r4 += a[start + i + 4]
        r5 += a[start + i + 5]
        r6 += a[start + i + 6]
        r7 += a[start + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[start + i]
        i += 1
    return res


@njit(cache=True)
def _pairwise_split(a, start, n):
    """pairwise_sum one split deep (n <= 248): numba's disk cache cannot hold a recursive function."""
    if n <= 128:
        return _pairwise_block(a, start, n)
    n2 = n // 2
    n2 -= n2 % 8
    return _pairwise_block(a, start, n2) + _pairwise_block(a, start + n2, n - n2)


@njit(cache=True)
def _pairwise(a, start, n):
    """numpy's pairwise_sum of ``a[start:start + n]``, up to two splits deep (n <= 496)."""
    if n <= 248:
        return _pairwise_split(a, start, n)
    if n > 496:
        raise RuntimeError("compiled replay: a pairwise sum longer than 496")
    n2 = n // 2
    n2 -= n2 % 8
    return _pairwise_split(a, start, n2) + _pairwise_split(a, start + n2, n - n2)


@njit(cache=True, inline='always')
def _eam_step(EAM, EN, EA, L, E):
    """The similarity of the request's EAM (as of the step's start) to each collection entry, per layer:
    ``EN[1 + cap + c, l']`` (a step's layer l matches over rows l' > l, which only earlier steps filled)."""
    cap = (EAM.shape[0] - 2) // 2
    buf = np.empty(E, dtype=np.float64)
    for l2 in range(L):
        total = _pairwise(EAM[0, l2], 0, E)
        for e in range(E):
            EAM[1, l2, e] = EAM[0, l2, e] / total if total > 0 else 0.0
            buf[e] = EAM[1, l2, e] * EAM[1, l2, e]
        EN[0, l2] = np.sqrt(_pairwise(buf, 0, E))
    for c in range(EA[0]):
        for l2 in range(L):
            for e in range(E):
                buf[e] = EAM[2 + cap + c, l2, e] * EAM[1, l2, e]
            den = max(EN[1 + c, l2] * EN[0, l2], 1e-6)
            EN[1 + cap + c, l2] = _pairwise(buf, 0, E) / den


@njit(cache=True, inline='always')
def _eam_pick(EAM, EN, EA, CK, SI, decay, layer, L, E, limit):
    """EAMEveryLayerPrefetch.predict: the best-matching entry's scores for layers ``layer..L-1``, best first
    (ties by position), the first ``limit`` non-resident, into ``SI[S_PREFETCH]``; returns how many."""
    cap = (EAM.shape[0] - 2) // 2
    best = -1
    if EA[0] > 0:
        m = L - layer - 1
        best = 0
        if m > 0:
            top = 0.0
            for c in range(EA[0]):
                mean = _pairwise(EN[1 + cap + c], layer + 1, m) / m
                if c == 0 or mean > top:
                    best, top = c, mean
        EA[1 + best] += 1
    n = 0
    want = max(limit, 1)
    if best < 0:
        # No entry to match: every score is 1e-8 x the decay, which falls with the distance, so the picks are
        # the first non-resident keys in order (ties go to the lower position, as in the scan below).
        for key in range(layer * E, L * E):
            if n == want:
                break
            if not CK[C_RESIDENT, key]:
                SI[S_PREFETCH, n] = key
                n += 1
        return n
    prev_score, prev_idx = np.inf, -1
    while n < want:
        pick, pick_score = -1, 0.0
        idx = 0
        for d in range(L - layer):
            row = EAM[2 + best, layer + d]
            dec = decay[d]
            base = (layer + d) * E
            for e in range(E):
                if not CK[C_RESIDENT, base + e]:
                    score = (row[e] + 1e-8) * dec
                    taken = score > prev_score or (score == prev_score and idx <= prev_idx)
                    if not taken and (pick < 0 or score > pick_score):
                        pick, pick_score = idx, score
                idx += 1
        if pick < 0:
            break
        SI[S_PREFETCH, n] = layer * E + pick
        n += 1
        prev_score, prev_idx = pick_score, pick
    return n


@njit(cache=True)
def _layer(F, I, LF, LI, Q, JF, JI, counts, CK, CP, TL, TLI, TT, members, scores, SI, SB, shape, params, layer, experts,
           expert_tokens, weights, next_use, guess, g0, g1, a, b, phase, pending, busy, EAM, EN, EA, decay):
    """One MoE layer (DecisionCore.begin_layer and Simulation._forward's layer): scores, placement, the cache's
    decisions, the counters, the copies, the prefetches (``guess[g0:g1]``, the next layer's guessed experts, or
    eam-all's picks), the CPU experts, the device experts. Returns (pending, busy)."""
    E, mode, write_back, kind, scope_layer = shape[1], shape[2], shape[3], shape[4], shape[5]
    placement, code, hidden = shape[6], shape[7], shape[8]
    if kind == _MRS:
        _observe_scores(scores, params, layer, E, experts, weights, a, b)
    _place(placement, code, CK, TL, TT, SI, SB, layer, E, phase, experts, expert_tokens, a, b, shape[16])
    n_sel = 0
    for j in range(b - a):
        if not SB[B_ON_CPU, j]:
            SI[S_SEL, n_sel] = a + j
            n_sel += 1
    n_cpu = b - a - n_sel
    hits, misses, n_evicted = _access(I, CK, CP, TLI, members, scores, kind, scope_layer, E, layer, experts, SI, SB,
                                      n_sel, next_use)
    served, loads = _served(CK, SI, SB, layer, E, experts, n_sel, n_evicted)
    I[I_PF_USED] += served
    if phase == DECODE:
        counts[0, layer] += b - a
        counts[1, layer] += hits + (misses - loads)
        I[I_DECODE_CPU] += n_cpu
        I[I_PF_SERVED] += served
        I[I_DEMAND] += loads
    else:
        I[I_PREFILL_ACC] += b - a
        I[I_PREFILL_HITS] += hits + (misses - loads)
    pending, _ = _copies(F, I, LF, LI, Q, JF, JI, CK, TL, TLI, SI, SB, E, mode, write_back, layer, experts, n_sel,
                         loads, n_evicted, pending)
    if loads > 0 and shape[H_HOST_AHEAD] and shape[H_PAGEABLE_INLINE]:  # a pageable copy returns once it is done
        F[F_HOST_AT] = F[F_NOW] + pending
    if shape[9] == _FIRST_NON_RESIDENT and g1 > g0:  # FirstNonResident.predict: one guess, if any is not resident
        g = g0
        while g < g1 and CK[C_RESIDENT, (layer + 1) * E + guess[g]]:
            g += 1
        g0, g1 = g, min(g + 1, g1)
    n_pf = g1 - g0
    for g in range(n_pf):
        SI[S_PREFETCH, g] = (layer + 1) * E + guess[g0 + g]
    if shape[H_PREFETCHER] == _EAM_ALL:
        n_pf = _eam_pick(EAM, EN, EA, CK, SI, decay, layer, shape[0], E, shape[H_LIMIT])
        for i in range(a, b):  # observe: the layer's routing joins the request's EAM
            EAM[0, layer, experts[i]] += expert_tokens[i]
    if n_pf > 0:
        if pending > 0.0:
            _sleep(F, I, LF, LI, Q, JF, JI, pending)
            pending = 0.0
        _issue_prefetches(F, I, LF, LI, Q, JF, JI, CK, CP, TL, TLI, members, scores, shape, SI, layer, experts, n_sel,
                          n_pf)
    cpu_job = -1
    if n_cpu > 0:
        if pending > 0.0:
            _sleep(F, I, LF, LI, Q, JF, JI, pending)
            pending = 0.0
        cpu_job = _cpu_task(I, LF, LI, Q, JF, JI, TT, SB, hidden, expert_tokens, a, b, F[F_NOW])
    pending, busy = _run_experts(F, I, LF, LI, Q, JF, JI, CK, TT, SI, SB, layer, E, experts, expert_tokens, n_sel,
                                 pending, busy)
    if cpu_job >= 0 and JI[cpu_job, J_LANDED] == 0:
        _stall_for(F, I, LF, LI, Q, JF, JI, cpu_job, pending)
        pending = 0.0
    if cpu_job >= 0 and shape[H_HOST_AHEAD]:  # the host takes the CPU experts' outputs once they are done
        F[F_HOST_AT] = max(F[F_HOST_AT], F[F_NOW])
    return pending, busy


@njit(cache=True)
def _reset_request(CK, kind):
    """ExpertCache.reset_request: LFU's visit counts are per request."""
    if kind == _LFU:
        for key in range(CK.shape[1]):
            CK[C_COUNT, key] = 0


@njit(cache=True)
def replay_batch(F, I, LF, LI, Q, JF, JI, counts, CK, CP, TL, TLI, TT, members, scores, shape, scalars, params, phase,
                 tokens, ne, ne_gpu, head, shared, step_offsets, layer_of, expert_offsets, experts, expert_tokens, weights,
                 next_use, guess_offsets, guess, num_prefill, step_end, EAM, EN, EA, decay):
    """One batch's forward steps (replay_steps and Simulation._forward): fills the state F, I, the lanes LF, LI
    and their jobs Q, JF, JI, the decode counters (``counts``: accesses, hits per layer), each step's end and
    eam-all's EAM state (EAM, EN, EA)."""
    L, E, prefetching, limit = shape[0], shape[1], shape[9], shape[10]
    step_overhead, layer_overhead, dense = scalars[0], scalars[1], scalars[2]
    SI = np.zeros((5, L * E), dtype=np.int64)
    SB = np.zeros((4, E), dtype=np.bool_)
    for s in range(phase.shape[0]):
        if s == num_prefill:
            _reset_request(CK, shape[4])
        ts = F[F_NOW]
        h, n, sh = head[s], ne[s], shared[s]
        pending = step_overhead + h + dense * n
        busy = F[F_BUSY] + (h + dense * n)
        attention = n + layer_overhead + sh
        attention_busy = n + sh
        host_ahead = shape[H_HOST_AHEAD]
        if host_ahead:
            attention_busy = ne_gpu[s] + sh
            F[F_HOST_AT] = F[F_NOW] + pending
        w, w_end = step_offsets[s], step_offsets[s + 1]
        if prefetching == _EAM_ALL and EA[0] > 0:
            _eam_step(EAM, EN, EA, L, E)
        drop = (shape[H_DROP_QUEUED] >> phase[s]) & 1
        for layer in range(L):
            if host_ahead:  # Simulation._forward: the host launches the layer while the GPU works off its backlog
                now = F[F_NOW]
                end = max(now + pending + attention_busy, F[F_HOST_AT] + n + sh)
                pending = end + layer_overhead - now
                F[F_HOST_AT] = end + layer_overhead
            else:
                pending += attention
            busy += attention_busy
            if w < w_end and layer_of[w] == layer:
                if drop:  # the layer's prefetch call replaces the queue once its attention has run
                    if pending > 0.0:
                        _sleep(F, I, LF, LI, Q, JF, JI, pending)
                        pending = 0.0
                    _drop_queued(LI, Q, JI, CK, CP, TLI, members, E, shape[5])
                g0 = g1 = 0
                guessing = prefetching == _NEXT_LAYER or prefetching == _FIRST_NON_RESIDENT
                if guessing and phase[s] == DECODE and layer + 1 < L:
                    g0, g1 = guess_offsets[w], guess_offsets[w + 1]
                    if limit > 0:
                        g1 = min(g1, g0 + limit)
                pending, busy = _layer(F, I, LF, LI, Q, JF, JI, counts, CK, CP, TL, TLI, TT, members, scores, SI, SB,
                                       shape, params, layer, experts, expert_tokens, weights, next_use, guess, g0, g1,
                                       expert_offsets[w], expert_offsets[w + 1], phase[s], pending, busy, EAM, EN, EA,
                                       decay)
                w += 1
        F[F_BUSY] = busy
        if pending > 0.0:
            _sleep(F, I, LF, LI, Q, JF, JI, pending)
        t = F[F_NOW]
        step_end[s] = t
        if phase[s] == DECODE:
            F[F_DECODE_TIME] += t - ts
            I[I_DECODE_TOKENS] += tokens[s]
    _reset_request(CK, shape[4])


@njit(cache=True)
def drain(F, I, LF, LI, Q, JF, JI):
    """LaneClock.drain: serve what is still queued (prefetches issued at the end); the run's end time."""
    _advance(I, LF, LI, Q, JF, JI, np.inf, 0)
    end = F[F_NOW]
    for lane in range(3):
        end = max(end, LF[lane, L_LAST_EVENT])
    return end
