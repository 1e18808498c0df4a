"""Routing statistics read straight from router outputs: how skewed expert use is, and how much a token
reuses the experts of the token before it (what an expert cache feeds on)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


class RoutingRecorder:
    """An observer for :func:`moesim.quality.gating.applied_gating`: keeps each layer's selected experts
    (rows in the order the model saw them: window-major, then position)."""

    def __init__(self):
        self.chunks: dict[int, list[np.ndarray]] = {}

    def __call__(self, moe_index: int, logits: torch.Tensor, scores: torch.Tensor, indices: torch.Tensor) -> None:
        chosen = indices.detach().cpu().numpy().astype(np.int16)
        # An expert dropped by adaptive gating (weight 0) is not used: mark it -1.
        chosen = np.where(scores.detach().cpu().numpy() > 0, chosen, -1).astype(np.int16)
        self.chunks.setdefault(moe_index, []).append(chosen)

    def selections(self) -> dict[int, np.ndarray]:
        return {layer: np.concatenate(parts) for layer, parts in sorted(self.chunks.items())}


@dataclass(frozen=True)
class LayerRouting:
    layer: int
    expert_shares: tuple[float, ...]  # share of all expert activations going to each expert
    top_expert_share: float
    reuse_rate: float  # share of a token's experts that the previous token in its window also used
    uniform_reuse_rate: float  # the same for a router choosing top_k experts uniformly at random: k / E


def layer_routing(layer: int, selected: np.ndarray, seq_len: int, num_experts: int) -> LayerRouting:
    """``selected`` [windows * seq_len, k] expert ids (-1 = not used) in window-major order."""
    k = selected.shape[1]
    used = selected[selected >= 0]
    counts = np.bincount(used.astype(np.int64), minlength=num_experts).astype(np.float64)
    shares = counts / counts.sum()
    per_window = selected.reshape(-1, seq_len, k)
    onehot = np.zeros((*per_window.shape[:2], num_experts + 1), dtype=bool)
    np.put_along_axis(onehot, np.where(per_window >= 0, per_window, num_experts).astype(np.int64), True, axis=2)
    onehot = onehot[..., :num_experts]
    shared = (onehot[:, 1:] & onehot[:, :-1]).sum(axis=2)
    active = onehot[:, 1:].sum(axis=2)
    reuse = float(shared.sum() / active.sum()) if active.sum() else 0.0
    return LayerRouting(layer, tuple(float(s) for s in shares), float(shares.max()), reuse, k / num_experts)


def routing_stats(recorder: RoutingRecorder, seq_len: int, num_experts: int) -> list[LayerRouting]:
    return [layer_routing(layer, sel, seq_len, num_experts) for layer, sel in recorder.selections().items()]
