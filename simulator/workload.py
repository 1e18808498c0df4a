"""A trace compiled into the forward steps the simulator replays.

Requests are served in trace order in closed-loop batches of ``batch`` requests: each batch prefills its
requests one after another (a prefill layer sees all of the request's prompt tokens at once: the union of
their experts, with each expert's token count), then decodes them together, one token per active request
per step (a decode layer sees the union of the active requests' experts). The next batch starts when the
previous one has finished.

A workload is built once per (trace, batch, gating) and kept as flat numpy arrays, one :class:`StepStore`
per batch (about 50 bytes per activation: a production-sized trace of 32M activations fits in memory).
The engine's per-layer path reads tuples: a batch's :class:`ForwardStep` objects are made when the batch
is read, and a step's :class:`LayerWork` objects when its layers are first read, so only the batch being
replayed is held as Python objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from moesim.errors import MoesimError
from moesim.simulator.gating import GatingSpec, keep_mask
from moesim.tracer import DECODE, PREFILL, Trace

GUESS_SOURCES = ("auto", "trace", "previous-token", "accuracy:P")

# The guess model's default per-slot accuracy when a trace has no recorded next-layer guess. Source:
# AdapMoE (PKU-SEC-Lab/AdapMoE 2cfe8df, src/dp.py ``accs``) hard-codes the measured per-layer accuracy of
# exactly this guess (layer l+1's gate on layer l's hidden state, Mixtral-8x7B) as about 0.57-0.94
# (../shared/research/offloading-systems.md section 4); 0.75 is the middle of that range. Not fitted.
DEFAULT_GUESS_ACCURACY = 0.75
GUESS_SEED = 0  # the guess model's draws are seeded: the same trace gives the same guesses


def parse_guess(text: str) -> tuple[str, float]:
    """``auto`` | ``trace`` | ``previous-token`` | ``accuracy:P`` (0 <= P <= 1) -> (kind, accuracy)."""
    if text in ("auto", "trace", "previous-token"):
        return text, DEFAULT_GUESS_ACCURACY
    if text.startswith("accuracy:"):
        try:
            p = float(text.split(":", 1)[1])
        except ValueError:
            p = -1.0
        if 0.0 <= p <= 1.0:
            return "accuracy", p
    raise MoesimError(f"--guess '{text}': expected auto, trace, previous-token or accuracy:P with 0 <= P <= 1")


@dataclass(slots=True)
class LayerWork:
    """One MoE layer of one forward step."""

    experts: tuple[int, ...]  # distinct routed experts, in the order their last token used them
    tokens: tuple[int, ...]  # tokens routed to each
    weights: tuple[float, ...]  # each expert's summed routing weight over the step's tokens / tokens in step
    guess: tuple[int, ...]  # the next layer's experts as guessed from this layer's input, best first
    rows: tuple[int, ...]  # trace rows this layer-step replays (for per-row hit records)
    predicted: tuple[int, ...] = ()  # a learned predictor's guess for the next layer (filled on demand)


class ForwardStep:
    """One forward pass. ``layers`` (a LayerWork or None per MoE layer) is read from the batch's
    :class:`StepStore` on first use and kept for the life of this object."""

    __slots__ = ("index", "phase", "requests", "tokens", "context", "_layers", "_store", "_position")

    def __init__(self, index: int, phase: int, requests: tuple[int, ...], tokens: int, context: int,
                 layers: Optional[list[Optional[LayerWork]]] = None, store: Optional["StepStore"] = None,
                 position: int = 0):
        self.index = index  # global step counter (clock = index * num_layers + layer)
        self.phase = phase  # PREFILL or DECODE
        self.requests = requests
        self.tokens = tokens  # tokens in this forward pass (prompt length, or active requests)
        self.context = context  # KV length seen by attention (prompt length, or mean over the active requests)
        self._layers = layers
        self._store = store
        self._position = position  # this step's place in its store

    @property
    def layers(self) -> list[Optional[LayerWork]]:
        if self._layers is None:
            self._layers = self._store.layers(self._position)
        return self._layers


class Annotations:
    """What a run adds to a compiled workload, shared by its batches: the learned predictor's guesses per
    trace row (``moesim.simulator.predictor.annotate``), read into each decode layer's ``predicted``."""

    __slots__ = ("predictions",)

    def __init__(self):
        self.predictions: Optional[dict[int, tuple[int, ...]]] = None

    def __getstate__(self):
        return (None,)  # a run's annotation is not part of the compiled (and disk-cached) workload

    def __setstate__(self, state) -> None:
        self.predictions = None


class StepStore:
    """The forward steps of one batch as flat arrays: per step its header, per layer-step (a step's MoE layer
    with routed experts) its layer and offsets into the experts/tokens/weights, guess and rows arrays."""

    def __init__(self, steps: list[ForwardStep], num_layers: int, annotations: Annotations):
        self.num_layers = num_layers
        self.annotations = annotations
        self.index = [s.index for s in steps]
        self.phase = [s.phase for s in steps]
        self.requests = [s.requests for s in steps]
        self.tokens = [s.tokens for s in steps]
        self.context = [s.context for s in steps]
        works = [(layer, w) for s in steps for layer, w in enumerate(s.layers) if w is not None]
        self.step_offsets = _offsets([sum(w is not None for w in s.layers) for s in steps])
        self.layer = np.array([layer for layer, _ in works], dtype=np.int16)
        self.expert_offsets = _offsets([len(w.experts) for _, w in works])
        experts = [e for _, w in works for e in w.experts]
        self.experts = np.array(experts, dtype=_index_type(max(experts, default=0)))
        self.expert_tokens = np.array([t for _, w in works for t in w.tokens], dtype=np.int32)
        self.weights = np.array([x for _, w in works for x in w.weights], dtype=np.float64)
        self.guess_offsets = _offsets([len(w.guess) for _, w in works])
        guess = [e for _, w in works for e in w.guess]
        self.guess = np.array(guess, dtype=_index_type(max(guess, default=0)))
        self.row_offsets = _offsets([len(w.rows) for _, w in works])
        rows = [r for _, w in works for r in w.rows]
        self.rows = np.array(rows, dtype=_index_type(max(rows, default=0)))

    def __len__(self) -> int:
        return len(self.index)

    def step(self, i: int) -> ForwardStep:
        return ForwardStep(self.index[i], self.phase[i], self.requests[i], self.tokens[i], self.context[i],
                           store=self, position=i)

    def layers(self, i: int) -> list[Optional[LayerWork]]:
        lo, hi = int(self.step_offsets[i]), int(self.step_offsets[i + 1])
        out: list[Optional[LayerWork]] = [None] * self.num_layers
        if lo == hi:
            return out
        eo, go, ro = (self.expert_offsets[lo:hi + 1].tolist(), self.guess_offsets[lo:hi + 1].tolist(),
                      self.row_offsets[lo:hi + 1].tolist())
        e0, g0, r0 = eo[0], go[0], ro[0]
        # one tuple per field for the whole step: a tuple's slice is the layer's tuple, no list in between
        experts = tuple(self.experts[e0:eo[-1]].tolist())
        tokens = tuple(self.expert_tokens[e0:eo[-1]].tolist())
        weights = tuple(self.weights[e0:eo[-1]].tolist())
        guess = tuple(self.guess[g0:go[-1]].tolist())
        rows = tuple(self.rows[r0:ro[-1]].tolist())
        predictions = self.annotations.predictions if self.phase[i] == DECODE else None
        a = eo[0] - e0
        g = go[0] - g0
        r = ro[0] - r0
        for layer, b, h, s in zip(self.layer[lo:hi].tolist(), eo[1:], go[1:], ro[1:]):
            b, h, s = b - e0, h - g0, s - r0
            work_rows = rows[r:s]
            out[layer] = LayerWork(experts[a:b], tokens[a:b], weights[a:b], guess[g:h], work_rows,
                                   () if predictions is None else union_by_rank(predictions, work_rows))
            a, g, r = b, h, s
        return out

    @property
    def max_tokens_per_expert(self) -> int:
        return int(self.expert_tokens.max(initial=1))


def _index_type(largest: int):
    """The smallest signed integer type of the store's indices (about half the bytes of int64)."""
    return np.int16 if largest < 2**15 else np.int32 if largest < 2**31 else np.int64


def _offsets(lengths: list[int]) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out.astype(_index_type(int(out[-1])))


def union_by_rank(predictions: dict[int, tuple[int, ...]], rows: tuple[int, ...]) -> tuple[int, ...]:
    """The union of the rows' predicted experts, best first: every row's first guess, then every row's second..."""
    seen: dict[int, None] = {}
    lists = [predictions.get(r, ()) for r in rows]
    for rank in range(max((len(p) for p in lists), default=0)):
        for p in lists:
            if rank < len(p):
                seen.setdefault(p[rank], None)
    return tuple(seen)


class RequestBatch:
    """The requests served together and their forward steps: given as lists, or (a compiled workload) made
    from the batch's :class:`StepStore` each time they are read."""

    __slots__ = ("requests", "_prefill", "_decode", "store", "num_prefill")

    def __init__(self, requests: tuple[int, ...], prefill: Optional[list[ForwardStep]] = None,
                 decode: Optional[list[ForwardStep]] = None, store: Optional[StepStore] = None,
                 num_prefill: int = 0):
        self.requests = requests
        self._prefill = prefill
        self._decode = decode
        self.store = store
        self.num_prefill = num_prefill

    @property
    def prefill(self) -> list[ForwardStep]:
        """One step per request, in order."""
        if self._prefill is not None:
            return self._prefill
        return [self.store.step(i) for i in range(self.num_prefill)]

    @property
    def decode(self) -> list[ForwardStep]:
        if self._decode is not None:
            return self._decode
        return [self.store.step(i) for i in range(self.num_prefill, len(self.store))]

    @property
    def max_tokens_per_expert(self) -> int:
        if self.store is not None and self._prefill is None and self._decode is None:
            return self.store.max_tokens_per_expert
        return max((max(w.tokens) for s in self.prefill + self.decode for w in s.layers if w is not None and w.tokens),
                   default=1)


@dataclass
class Workload:
    num_layers: int
    num_experts: int
    top_k: int
    batch: int
    gating: GatingSpec
    guess_source: str  # "trace" | "previous-token" | "accuracy-P" (the guess model)
    batches: list[RequestBatch]
    prompt_tokens: dict[int, int]
    decode_tokens: dict[int, int]
    routed_activations: int  # decode (token, expert) activations before gating
    kept_activations: int  # after gating
    popularity: np.ndarray  # [L, E] routed activations over the whole trace (prefill and decode)
    annotations: Annotations = field(default_factory=Annotations, repr=False)
    _future: Optional[dict[int, list[int]]] = field(default=None, repr=False)

    def steps(self) -> Iterator[ForwardStep]:
        for b in self.batches:
            yield from b.prefill
            yield from b.decode

    @property
    def num_steps(self) -> int:
        return sum(len(b.prefill) + len(b.decode) for b in self.batches)

    @property
    def max_tokens_per_expert(self) -> int:
        return max((b.max_tokens_per_expert for b in self.batches), default=1)

    @property
    def max_context(self) -> int:
        return max((self.prompt_tokens[r] + self.decode_tokens[r] for r in self.prompt_tokens), default=1)

    def future_uses(self) -> dict[int, list[int]]:
        """Expert key -> sorted clocks of its uses (for oracles)."""
        if self._future is None:
            L, E = self.num_layers, self.num_experts
            uses: dict[int, list[int]] = {}
            for step in self.steps():
                base_clock = step.index * L
                for layer, work in enumerate(step.layers):
                    if work is None:
                        continue
                    clock = base_clock + layer
                    for e in work.experts:
                        uses.setdefault(layer * E + e, []).append(clock)
            self._future = uses
        return self._future


def _work_from_rows(rows: list[int], ex: list, w: list, keep: list, guess: Optional[list], k: int,
                    base: int = 0) -> LayerWork:
    """``rows`` index ``ex``/``w``/``keep``/``guess``, which hold the trace's rows from ``base`` on."""
    n: dict[int, int] = {}
    wsum: dict[int, float] = {}
    for i in rows:
        exi, wi, ki = ex[i], w[i], keep[i]
        for s in range(k):
            if not ki[s]:
                continue
            e = exi[s]
            if e in n:
                n[e] = n.pop(e) + 1  # re-insert: the order is the order of last use
                wsum[e] += wi[s]
            else:
                n[e] = 1
                wsum[e] = wi[s]
    g: tuple[int, ...] = ()
    if guess is not None:
        seen: dict[int, None] = {}
        for s in range(k):
            for i in rows:
                e = guess[i][s]
                if e >= 0:
                    seen.setdefault(e, None)
        g = tuple(seen)
    order = tuple(n)
    tokens_in_step = len(rows)
    return LayerWork(
        experts=order,
        tokens=tuple(n[e] for e in order),
        weights=tuple(wsum[e] / tokens_in_step for e in order),
        guess=g,
        rows=tuple(i + base for i in rows),
    )


def compile_workload(trace: Trace, batch: int = 1, gating: GatingSpec | None = None, guess: str = "auto") -> Workload:
    if batch < 1:
        raise MoesimError(f"--batch {batch}: expected a positive integer")
    guess_kind, guess_accuracy = parse_guess(guess)
    gating = gating or GatingSpec()
    meta = trace.meta
    L, E, k = meta.num_layers, meta.num_experts, meta.top_k
    c = trace.cells
    decode_mask = c.phase == DECODE
    keep_arr = keep_mask(c.weights, c.layer, decode_mask, gating, L)
    has_guess = c.next_layer_guess is not None and bool((c.next_layer_guess >= 0).any())
    if guess_kind == "trace" and not has_guess:
        where = trace.path or "trace"
        raise MoesimError(f"{where}: has no 'next_layer_guess' column, which the next-layer guess needs")
    # Without a recorded guess, "auto" draws guesses from a stated accuracy against the real next layer.
    # (It used to take the previous token's experts, which a cache of >= top-k slots always holds, so
    # next-layer prefetch issued nothing and silently equalled plain LRU.)
    if guess_kind in ("auto", "trace") and has_guess:
        source = "trace"
    elif guess_kind == "previous-token":
        source = "previous-token"
    else:
        source = f"accuracy-{guess_accuracy:g}"

    popularity = np.zeros((L, E), dtype=np.int64)
    np.add.at(popularity, (np.repeat(c.layer.astype(np.int64), k), c.experts.astype(np.int64).reshape(-1)), 1)

    groups = trace.layer_steps()
    # the requests in order of first appearance, and each request's layer-step groups in trace order
    uniques, first, inverse = np.unique(groups.request, return_index=True, return_inverse=True)
    appearance = np.argsort(first, kind="stable")
    order = uniques[appearance].tolist()
    place = np.empty(len(uniques), dtype=np.int64)
    place[appearance] = np.arange(len(uniques))
    rank = place[inverse.reshape(-1)]
    del uniques, first, inverse, appearance, place
    by_request = np.argsort(rank, kind="stable")
    bounds = np.searchsorted(rank[by_request], np.arange(len(order) + 1)).tolist()
    del rank

    compiler = _BatchCompiler(trace, keep_arr, source, guess_accuracy)
    prompt_len: dict[int, int] = {}
    decode_tokens: dict[int, int] = {}
    batches: list[RequestBatch] = []
    annotations = Annotations()
    for b0 in range(0, len(order), batch):
        reqs = tuple(order[b0:b0 + batch])
        group_ids = [by_request[bounds[b0 + i]:bounds[b0 + i + 1]] for i in range(len(reqs))]
        steps, num_prefill = compiler.batch(reqs, group_ids, groups, prompt_len, decode_tokens)
        batches.append(RequestBatch(reqs, store=StepStore(steps, L, annotations), num_prefill=num_prefill))

    routed = int(decode_mask.sum()) * k
    kept = int(keep_arr[decode_mask].sum())
    return Workload(
        num_layers=L, num_experts=E, top_k=k, batch=batch, gating=gating, guess_source=source,
        batches=batches, prompt_tokens=prompt_len, decode_tokens=decode_tokens,
        routed_activations=routed, kept_activations=kept, popularity=popularity, annotations=annotations,
    )


class _BatchCompiler:
    """Compiles one batch at a time, from Python lists of only the batch's rows (row ids local to the batch's
    span of the trace; the LayerWork rows are global), so compiling a long trace holds one batch as objects."""

    def __init__(self, trace: Trace, keep: np.ndarray, source: str, guess_accuracy: float):
        self.trace = trace
        self.keep = keep
        self.source = source
        self.guess_accuracy = guess_accuracy
        self.rng = np.random.default_rng(GUESS_SEED)
        self.L, self.E, self.k = trace.meta.num_layers, trace.meta.num_experts, trace.meta.top_k
        self.step_index = 0

    def batch(self, reqs: tuple, group_ids: list, groups, prompt_len: dict, decode_tokens: dict):
        L, E, k = self.L, self.E, self.k
        c = self.trace.cells
        all_ids = np.concatenate(group_ids) if group_ids else np.zeros(0, dtype=np.int64)
        base = int(groups.start[all_ids].min()) if all_ids.size else 0
        top = int(groups.stop[all_ids].max()) if all_ids.size else 0
        ex = c.experts[base:top].astype(np.int64).tolist()
        w = c.weights[base:top].astype(np.float64).tolist()
        keep = self.keep[base:top].tolist()
        guess_rows = c.next_layer_guess[base:top].astype(np.int64).tolist() if self.source == "trace" else None
        positions = c.position[base:top].tolist()
        # request -> prefill {layer: local rows}, decode [(position, {layer: local rows})]
        prefill: dict[int, dict[int, list[int]]] = {}
        decode: dict[int, list[tuple[int, dict[int, list[int]]]]] = {}
        for r, ids in zip(reqs, group_ids):
            pre: dict[int, list[int]] = {}
            dec: list[tuple[int, dict[int, list[int]]]] = []
            for start, stop, layer, phase, step in zip((groups.start[ids] - base).tolist(),
                                                       (groups.stop[ids] - base).tolist(), groups.layer[ids].tolist(),
                                                       groups.phase[ids].tolist(), groups.step[ids].tolist()):
                rows = list(range(start, stop))
                if phase == PREFILL:
                    pre.setdefault(layer, []).extend(rows)
                else:
                    if not dec or dec[-1][0] != step:
                        dec.append((step, {}))
                    dec[-1][1].setdefault(layer, []).extend(rows)
            prefill[r], decode[r] = pre, dec
            prompt_len[r] = len({positions[i] for rows in pre.values() for i in rows})
            decode_tokens[r] = len(dec)
        steps: list[ForwardStep] = []
        for r in reqs:
            layers: list[Optional[LayerWork]] = [None] * L
            for layer, rows in prefill[r].items():
                layers[layer] = _work_from_rows(rows, ex, w, keep, guess_rows, k, base)
            if any(x is not None for x in layers):
                P = max(prompt_len[r], 1)
                steps.append(ForwardStep(self.step_index, PREFILL, (r,), P, P, layers))
                self.step_index += 1
        num_prefill = len(steps)
        longest = max((len(decode[r]) for r in reqs), default=0)
        for j in range(longest):
            active = [r for r in reqs if j < len(decode[r])]
            layers = [None] * L
            for layer in range(L):
                rows = []
                for r in active:
                    rows.extend(decode[r][j][1].get(layer, ()))
                if rows:
                    layers[layer] = _work_from_rows(rows, ex, w, keep, guess_rows, k, base)
            if self.source == "previous-token":
                _fill_previous_token_guess(layers, active, j, decode, prefill, ex, k)
            elif self.source != "trace":
                _fill_model_guess(layers, active, j, decode, ex, k, E, self.guess_accuracy, self.rng)
            ctx = sum(prompt_len[r] + j + 1 for r in active) // len(active)
            steps.append(ForwardStep(self.step_index, DECODE, tuple(active), len(active), max(ctx, 1), layers))
            self.step_index += 1
        return steps, num_prefill


def _fill_previous_token_guess(layers, active, j, decode, prefill, ex, k) -> None:
    """Without a recorded next-layer guess, guess layer l+1 from the previous token's experts there."""
    L = len(layers)
    for layer in range(L - 1):
        work = layers[layer]
        if work is None:
            continue
        seen: dict[int, None] = {}
        for r in active:
            if j > 0:
                rows = decode[r][j - 1][1].get(layer + 1, ())
            else:
                pre = prefill[r].get(layer + 1, ())
                rows = pre[-1:] if pre else ()
            for i in rows:
                for e in ex[i][:k]:
                    seen.setdefault(e, None)
        work.guess = tuple(seen)


def _fill_model_guess(layers, active, j, decode, ex, k, E, accuracy, rng) -> None:
    """The guess model: layer l's guess for l+1 is l+1's real top-k, each slot of each token kept with
    probability ``accuracy`` and otherwise replaced by an expert that token did not select."""
    L = len(layers)
    for layer in range(L - 1):
        work = layers[layer]
        if work is None:
            continue
        seen: dict[int, None] = {}
        for s in range(k):
            for r in active:
                for i in decode[r][j][1].get(layer + 1, ()):
                    real = ex[i][:k]
                    if rng.random() < accuracy:
                        seen.setdefault(real[s], None)
                    else:
                        taken = sorted({e for e in real if 0 <= e < E})
                        if len(taken) < E:  # the drawn one among the experts not taken, in id order
                            e = int(rng.integers(E - len(taken)))
                            for t in taken:
                                if t <= e:
                                    e += 1
                            seen.setdefault(e, None)
        work.guess = tuple(seen)
