"""Perplexity of a causal LM over token windows, and the unigram baseline on the same predicted tokens.

Each window of ``seq_len`` tokens is scored on its own (no carried context), predicting tokens 1..L-1 from
their prefixes, the usual WikiText-2 protocol with non-overlapping windows. Perplexity is
exp(total NLL / predicted tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from moesim.errors import MoesimError


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll_sum: float  # natural-log NLL summed over predicted tokens
    predicted_tokens: int
    windows: int
    # NLL summed per window, to compare two settings window by window (paired differences).
    window_nll: np.ndarray = field(default=None, repr=False, compare=False)

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.predicted_tokens


def paired_nll_difference(a: PerplexityResult, b: PerplexityResult) -> tuple[float, float]:
    """Mean NLL per token of ``b`` minus ``a`` on the same windows, and its standard error across windows.

    A difference within about two standard errors is not distinguishable from which windows were scored.
    """
    if a.window_nll is None or b.window_nll is None or a.window_nll.shape != b.window_nll.shape:
        raise ValueError("paired difference needs per-window NLL of the same windows")
    per_token = (b.window_nll - a.window_nll) / (a.predicted_tokens / a.windows)
    se = float(per_token.std(ddof=1) / math.sqrt(len(per_token))) if len(per_token) > 1 else float("nan")
    return float(per_token.mean()), se


def _batch_size_for(seq_len: int, vocab_size: int, budget_bytes: int = 1 << 30) -> int:
    # Logits of one window in float32 dominate memory for small models.
    per_window = max(1, seq_len * vocab_size * 4 * 2)
    return max(1, min(64, budget_bytes // per_window))


def evaluate_perplexity(model, windows: np.ndarray, batch_size: int | None = None) -> PerplexityResult:
    """Score ``windows`` [n, seq_len] (token ids) with ``model``; routing hooks active on the model apply."""
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise MoesimError(f"token windows of shape {windows.shape}: expected [windows, seq_len >= 2]")
    n, seq_len = windows.shape
    vocab = int(model.config.get_text_config().vocab_size)
    if int(windows.max()) >= vocab:
        raise MoesimError(f"token id {int(windows.max())} is outside the model's vocabulary ({vocab})")
    bs = batch_size or _batch_size_for(seq_len, vocab)
    per_window = np.zeros(n, dtype=np.float64)
    with torch.inference_mode():
        for start in range(0, n, bs):
            batch = torch.from_numpy(windows[start:start + bs]).long()
            logits = model(input_ids=batch, use_cache=False).logits.float()
            targets = batch[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
            )
            per_window[start:start + batch.shape[0]] = nll.reshape(batch.shape[0], -1).double().sum(dim=1).numpy()
    predicted = n * (seq_len - 1)
    nll_sum = float(per_window.sum())
    return PerplexityResult(math.exp(nll_sum / predicted), nll_sum, predicted, n, per_window)


def unigram_perplexity(train_ids: np.ndarray, windows: np.ndarray, vocab_size: int) -> PerplexityResult:
    """Add-one-smoothed unigram model fitted on ``train_ids``, scored on the tokens the LM predicts."""
    counts = np.bincount(np.asarray(train_ids, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    if counts.shape[0] > vocab_size:
        raise MoesimError(f"training token ids exceed the vocabulary size {vocab_size}")
    log_p = np.log(counts + 1.0) - math.log(counts.sum() + vocab_size)
    targets = windows[:, 1:].reshape(-1)
    nll_sum = float(-log_p[targets].sum())
    return PerplexityResult(math.exp(nll_sum / targets.size), nll_sum, int(targets.size), int(windows.shape[0]))
