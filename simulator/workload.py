"""A trace compiled into the forward steps the simulator replays.

Requests are served in trace order in closed-loop batches of ``batch`` requests: each batch prefills its
requests one after another (a prefill layer sees all of the request's prompt tokens at once: the union of
their experts, with each expert's token count), then decodes them together, one token per active request
per step (a decode layer sees the union of the active requests' experts). The next batch starts when the
previous one has finished.

Everything here is plain Python data built once per (trace, batch, gating) so the engine's per-layer
path only reads tuples.
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


@dataclass(slots=True)
class ForwardStep:
    index: int  # global step counter (clock = index * num_layers + layer)
    phase: int  # PREFILL or DECODE
    requests: tuple[int, ...]
    tokens: int  # tokens in this forward pass (prompt length, or active requests)
    context: int  # KV length seen by attention (prompt length, or mean over the active requests)
    layers: list[Optional[LayerWork]]


@dataclass
class RequestBatch:
    requests: tuple[int, ...]
    prefill: list[ForwardStep]  # one per request, in order
    decode: list[ForwardStep]


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
        best = 1
        for step in self.steps():
            for work in step.layers:
                if work is not None and work.tokens:
                    best = max(best, max(work.tokens))
        return best

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


def _work_from_rows(rows: list[int], ex: list, w: list, keep: list, guess: Optional[list], k: int) -> LayerWork:
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
        rows=tuple(rows),
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
    rng = np.random.default_rng(GUESS_SEED)

    ex = c.experts.astype(np.int64).tolist()
    w = c.weights.astype(np.float64).tolist()
    keep = keep_arr.tolist()
    guess_rows = c.next_layer_guess.astype(np.int64).tolist() if source == "trace" else None
    popularity = np.zeros((L, E), dtype=np.int64)
    np.add.at(popularity, (np.repeat(c.layer.astype(np.int64), k), c.experts.astype(np.int64).reshape(-1)), 1)

    groups = trace.layer_steps()
    g_req = groups.request.tolist()
    g_phase = groups.phase.tolist()
    g_step = groups.step.tolist()
    g_layer = groups.layer.tolist()
    g_start = groups.start.tolist()
    g_stop = groups.stop.tolist()

    # request -> prefill {layer: rows}, decode [(position, {layer: rows})]
    order: list[int] = []
    prefill: dict[int, dict[int, list[int]]] = {}
    decode: dict[int, list[tuple[int, dict[int, list[int]]]]] = {}
    prompt_len: dict[int, int] = {}
    for gi in range(len(g_req)):
        r = g_req[gi]
        if r not in prefill:
            order.append(r)
            prefill[r] = {}
            decode[r] = []
        rows = list(range(g_start[gi], g_stop[gi]))
        if g_phase[gi] == PREFILL:
            prefill[r].setdefault(g_layer[gi], []).extend(rows)
        else:
            steps = decode[r]
            if not steps or steps[-1][0] != g_step[gi]:
                steps.append((g_step[gi], {}))
            steps[-1][1].setdefault(g_layer[gi], []).extend(rows)
    positions = c.position.tolist()
    for r in order:
        pos = {positions[i] for rows in prefill[r].values() for i in rows}
        prompt_len[r] = len(pos)

    routed = int(decode_mask.sum()) * k
    kept = int(keep_arr[decode_mask].sum())
    batches: list[RequestBatch] = []
    step_index = 0
    for b0 in range(0, len(order), batch):
        reqs = tuple(order[b0:b0 + batch])
        pre_steps = []
        for r in reqs:
            layers: list[Optional[LayerWork]] = [None] * L
            for layer, rows in prefill[r].items():
                layers[layer] = _work_from_rows(rows, ex, w, keep, guess_rows, k)
            if any(x is not None for x in layers):
                P = max(prompt_len[r], 1)
                pre_steps.append(ForwardStep(step_index, PREFILL, (r,), P, P, layers))
                step_index += 1
        dec_steps = []
        longest = max((len(decode[r]) for r in reqs), default=0)
        for j in range(longest):
            active = [r for r in reqs if j < len(decode[r])]
            layers = [None] * L
            for layer in range(L):
                rows: list[int] = []
                for r in active:
                    rows.extend(decode[r][j][1].get(layer, ()))
                if rows:
                    layers[layer] = _work_from_rows(rows, ex, w, keep, guess_rows, k)
            if source == "previous-token":
                _fill_previous_token_guess(layers, active, j, decode, prefill, ex, k)
            elif source != "trace":
                _fill_model_guess(layers, active, j, decode, ex, k, E, guess_accuracy, rng)
            ctx = sum(prompt_len[r] + j + 1 for r in active) // len(active)
            dec_steps.append(ForwardStep(step_index, DECODE, tuple(active), len(active), max(ctx, 1), layers))
            step_index += 1
        batches.append(RequestBatch(reqs, pre_steps, dec_steps))

    return Workload(
        num_layers=L, num_experts=E, top_k=k, batch=batch, gating=gating, guess_source=source,
        batches=batches, prompt_tokens=prompt_len,
        decode_tokens={r: len(decode[r]) for r in order},
        routed_activations=routed, kept_activations=kept, popularity=popularity,
    )


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
                        others = [e for e in range(E) if e not in real]
                        if others:
                            seen.setdefault(others[int(rng.integers(len(others)))], None)
        work.guess = tuple(seen)
