"""Adaptive gating (AdapMoE): in decode, a token skips its second expert when that expert's weight is small.

AdapMoE (``run.py --adapgate``, ``custom_layers.py``) normalizes the top-2 routing weights and drops the
second expert when its weight is below a per-layer threshold ``sqrt(0.005 / s_l)``, where ``s_l`` is a
per-layer sensitivity the authors measured (hard-coded in their repository; 46.7 for layer 0 falling to
about 0.02 for layer 31, per /work/shared/research/offloading-systems.md §4). Prefill is untouched.

Modes
    ``off``      every routed expert runs
    ``uniform``  one threshold for every layer (``threshold``)
    ``adapmoe``  per-layer thresholds ``sqrt(0.005 / s_l)`` with ``s_l`` interpolated log-linearly
                 between AdapMoE's first- and last-layer sensitivities over this model's layers. Only the
                 two end points are recorded in our notes, so the curve in between is an approximation.

For top-k > 2 every expert after the first whose normalized weight is under the threshold is dropped
(for top-2 this is AdapMoE's rule exactly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moesim.errors import MoesimError

GATING_MODES = ("off", "uniform", "adapmoe")
ADAPMOE_SENSITIVITY_FIRST = 46.7
ADAPMOE_SENSITIVITY_LAST = 0.02
ADAPMOE_BUDGET = 0.005


@dataclass(frozen=True)
class GatingSpec:
    mode: str = "off"
    threshold: float = 0.0  # for mode "uniform"

    def __post_init__(self):
        if self.mode not in GATING_MODES:
            raise MoesimError(f"gating mode '{self.mode}': expected one of {', '.join(GATING_MODES)}")
        if self.mode == "uniform" and not 0.0 <= self.threshold <= 1.0:
            raise MoesimError(f"gating threshold {self.threshold}: expected a number between 0 and 1")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def thresholds(self, num_layers: int) -> np.ndarray:
        if self.mode == "off":
            return np.zeros(num_layers)
        if self.mode == "uniform":
            return np.full(num_layers, float(self.threshold))
        frac = np.linspace(0.0, 1.0, num_layers) if num_layers > 1 else np.zeros(1)
        log_s = (1 - frac) * math.log(ADAPMOE_SENSITIVITY_FIRST) + frac * math.log(ADAPMOE_SENSITIVITY_LAST)
        return np.sqrt(ADAPMOE_BUDGET / np.exp(log_s))

    @property
    def label(self) -> str:
        if self.mode == "uniform":
            return f"uniform-{self.threshold:g}"
        return self.mode


def keep_mask(weights: np.ndarray, layers: np.ndarray, decode: np.ndarray, spec: GatingSpec,
              num_layers: int) -> np.ndarray:
    """Bool [rows, k]: which routed experts run. ``decode`` is a bool [rows] mask of decode rows."""
    keep = np.ones(weights.shape, dtype=bool)
    if not spec.enabled or weights.shape[1] < 2:
        return keep
    w = np.abs(weights.astype(np.float64))
    total = w.sum(axis=1, keepdims=True)
    norm = np.divide(w, total, out=np.zeros_like(w), where=total > 0)
    thr = spec.thresholds(num_layers)[layers.astype(np.int64)][:, None]
    drop = norm < thr
    drop[:, 0] = False
    drop &= decode[:, None]
    keep &= ~drop
    return keep
