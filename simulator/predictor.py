"""The learned next-layer expert predictor behind the ``predictive`` prefetcher.

For a decode token at layer l, every expert j of layer l+1 gets three features, all computed causally
from the same request's earlier tokens (its prompt, then the tokens decoded so far):

``transition``  how often the experts this token uses at layer l were followed by j at layer l+1
                (row-normalized transition counts, averaged over the token's experts)
``recency``     1 if the previous token used j at layer l+1
``popularity``  the share of earlier tokens that used j at layer l+1

A logistic regression over these features (fitted once by Newton's method, outside the replay) is trained on
*other* traces: the features do not depend on the model's size, so traces of any MoE model can train
it. Its top-k experts by score are the guess for layer l+1. Predictions are computed for the whole
trace before the replay, so the engine only reads a tuple per layer-step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from moesim.errors import MoesimError
from moesim.tracer import DECODE, Trace, read_trace

FEATURES = ("transition", "recency", "popularity")


@dataclass(frozen=True)
class PredictorWeights:
    coef: tuple[float, ...]
    intercept: float
    trained_on: tuple[str, ...]
    samples: int


def _request_rows(trace: Trace) -> Iterator[tuple[list[dict[int, int]], list[dict[int, int]]]]:
    """Per request: prompt tokens and decode tokens, each a {layer: row} map, in position order."""
    c = trace.cells
    req = c.request
    bounds = np.flatnonzero(np.diff(req)) + 1
    starts = np.concatenate([[0], bounds])
    stops = np.concatenate([bounds, [len(req)]])
    phase, pos, layer = c.phase.tolist(), c.position.tolist(), c.layer.tolist()
    for a, b in zip(starts.tolist(), stops.tolist()):
        prompt: dict[int, dict[int, int]] = {}
        decode: dict[int, dict[int, int]] = {}
        for i in range(a, b):
            (decode if phase[i] == DECODE else prompt).setdefault(pos[i], {})[layer[i]] = i
        yield [prompt[p] for p in sorted(prompt)], [decode[p] for p in sorted(decode)]


def causal_blocks(trace: Trace) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The predictor's samples, a decode token at a time: the token's rows at layers l [n] (ascending), each
    one's features [n, E, 3] (transitions from l's experts, the previous token's experts at l+1, l+1's
    popularity so far in the request) and labels [n, E] (l+1's real experts).

    One token's layers are computed together (a loop over layers was most of a predictor fit's time); each
    feature is the float a per-layer formula gives: the reductions run over the same axis in the same order."""
    L, E = trace.meta.num_layers, trace.meta.num_experts
    experts = trace.cells.experts.astype(np.int64)
    for prompt, decode in _request_rows(trace):
        trans = np.zeros((max(L - 1, 1), E, E))
        seen = np.zeros((L, E))
        tokens = 0
        prev: dict[int, int] = {}

        def update(tok: dict[int, int]) -> None:
            layers = np.fromiter(tok.keys(), dtype=np.int64, count=len(tok))
            rows = np.fromiter(tok.values(), dtype=np.int64, count=len(tok))
            seen[layers[:, None], experts[rows]] += 1
            pairs = [(layer, row, tok[layer + 1]) for layer, row in tok.items() if layer + 1 in tok]
            if pairs:
                pl, pr, pn = (np.array(c, dtype=np.int64) for c in zip(*pairs))
                trans[pl[:, None, None], experts[pr][:, :, None], experts[pn][:, None, :]] += 1

        for tok in prompt:
            update(tok)
            tokens += 1
            prev = tok
        for tok in decode:
            layers = [layer for layer in range(L - 1) if layer in tok and layer + 1 in tok]
            if layers:
                ls = np.array(layers, dtype=np.int64)
                rows = np.array([tok[layer] for layer in layers], dtype=np.int64)
                nxts = np.array([tok[layer + 1] for layer in layers], dtype=np.int64)
                counts = trans[ls[:, None], experts[rows]]
                sums = counts.sum(axis=2, keepdims=True)
                f_trans = (counts / np.maximum(sums, 1.0)).mean(axis=1)
                f_rec = np.zeros((len(layers), E))
                known = [(i, prev[layer + 1]) for i, layer in enumerate(layers) if layer + 1 in prev]
                if known:
                    ki, kr = (np.array(c, dtype=np.int64) for c in zip(*known))
                    f_rec[ki[:, None], experts[kr]] = 1.0
                f_pop = seen[ls + 1] / max(tokens, 1)
                labels = np.zeros((len(layers), E), dtype=bool)
                labels[np.arange(len(layers))[:, None], experts[nxts]] = True
                yield rows, np.stack([f_trans, f_rec, f_pop], axis=2), labels
            update(tok)
            tokens += 1
            prev = tok


_FITTED: dict[tuple, PredictorWeights] = {}


def fit_predictor(train: Sequence[str | Path]) -> PredictorWeights:
    """The predictor fitted on ``train``: trace files or bundled trace names (as every other trace flag takes)."""
    from moesim.traces import resolve_trace

    try:
        key = tuple(sorted(str(resolve_trace(str(p)).resolve()) for p in train))
    except MoesimError as exc:
        raise MoesimError(f"--predictor-train: {exc.message}") from None
    stamp = tuple((Path(p).stat().st_size, Path(p).stat().st_mtime_ns) if Path(p).exists() else (-1, -1) for p in key)
    if (key, stamp) in _FITTED:
        return _FITTED[(key, stamp)]
    if not key:
        raise MoesimError("prefetch 'predictive': no trace to fit the predictor on; pass --predictor-train TRACE")
    from moesim.content import file_sha256
    from moesim.diskcache import cached, code_version

    # on disk by the training traces' contents: the same set under other paths reuses the fit
    try:
        digests = tuple(sorted(file_sha256(p) for p in key))
    except MoesimError:
        digests = None  # a missing or unreadable trace: _fit reports it as reading any trace would
    if digests is None:
        coef, intercept, samples = _fit(key)
    else:
        coef, intercept, samples = cached("predictor", ("fit", code_version(__name__, "moesim.tracer"), digests),
                                          lambda: _fit(key))
    weights = PredictorWeights(coef, intercept, key, samples)
    _FITTED[(key, stamp)] = weights
    return weights


def _fit(key: tuple[str, ...]) -> tuple[tuple[float, ...], float, int]:
    feats, labels = [], []
    for path in key:
        for _, f, y in causal_blocks(read_trace(path)):
            feats.append(f.reshape(-1, f.shape[-1]))
            labels.append(y.reshape(-1))
    if not feats:
        raise MoesimError(f"prefetch 'predictive': the training traces ({', '.join(key)}) have no decode tokens")
    X = np.concatenate(feats).astype(np.float64)
    y = np.concatenate(labels)
    if y.all() or not y.any():
        raise MoesimError("prefetch 'predictive': the training traces give only one class to learn from")
    # Candidates no feature speaks for are many and identical: fit them as two weighted rows.
    zero = ~X.any(axis=1)
    keep = ~zero
    Xk = np.concatenate([X[keep], np.zeros((2, X.shape[1]))])
    yk = np.concatenate([y[keep], [False, True]]).astype(np.float64)
    wk = np.concatenate([np.ones(int(keep.sum())), [float((zero & ~y).sum()), float((zero & y).sum())]])
    from threadpoolctl import threadpool_limits

    # one BLAS thread: a multi-threaded product sums in another order, and the fit would depend on the cores
    # (the same sweep with one worker or several, on a laptop or a cluster, must give the same weights)
    with threadpool_limits(limits=1, user_api="blas"):
        coef, intercept = fit_logistic(Xk, yk, wk)
    return tuple(float(v) for v in coef), float(intercept), int(len(y))


def fit_logistic(X: np.ndarray, y: np.ndarray, w: np.ndarray, l2: float = 1.0, iters: int = 50
                 ) -> tuple[np.ndarray, float]:
    """Weighted L2-regularised logistic regression by Newton's method (the intercept is not penalised).

    Minimises ``sum w_i * logloss_i + l2/2 * |coef|^2`` (scikit-learn's ``C=1/l2`` objective).
    """
    n, d = X.shape
    A = np.hstack([X, np.ones((n, 1))])
    theta = np.zeros(d + 1)
    reg = np.full(d + 1, l2)
    reg[-1] = 0.0
    for _ in range(iters):
        z = A @ theta
        p = 1.0 / (1.0 + np.exp(-z))
        grad = A.T @ (w * (p - y)) + reg * theta
        H = (A * (w * p * (1 - p))[:, None]).T @ A + np.diag(reg) + 1e-9 * np.eye(d + 1)
        step = np.linalg.solve(H, grad)
        theta -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return theta[:d], float(theta[d])


def predict_rows(trace: Trace, weights: PredictorWeights, top: int) -> dict[int, tuple[int, ...]]:
    """Row at layer l -> the predictor's top experts for layer l+1, best first (ties to the lower id).

    Kept on disk by the trace's content and the weights when the trace is a file (as costly as a fit)."""
    if trace.path is None:
        return _predict_rows(trace, weights, top)
    from moesim.content import file_sha256
    from moesim.diskcache import cached, code_version

    try:
        digest = file_sha256(trace.path)
    except MoesimError:  # the file went away after it was read: nothing to key the entry by
        return _predict_rows(trace, weights, top)
    parts = ("predict", code_version(__name__, "moesim.tracer"), digest, weights.coef, weights.intercept, top)
    return cached("predictor", parts, lambda: _predict_rows(trace, weights, top))


def _predict_rows(trace: Trace, weights: PredictorWeights, top: int) -> dict[int, tuple[int, ...]]:
    coef = np.asarray(weights.coef)
    out: dict[int, tuple[int, ...]] = {}
    for rows, features, _ in causal_blocks(trace):
        for row, f in zip(rows.tolist(), features):
            score = f @ coef + weights.intercept
            order = np.lexsort((np.arange(score.size), -score))[:top]
            out[row] = tuple(int(e) for e in order)
    return out


def annotate(workload, predictions: dict[int, tuple[int, ...]]) -> None:
    """Each decode layer-step's ``predicted`` becomes the union of its rows' predictions, best first
    (:func:`moesim.simulator.workload.union_by_rank`, applied as the workload's steps are read)."""
    workload.annotations.predictions = predictions
