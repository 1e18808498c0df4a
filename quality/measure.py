"""Measure perplexity for a grid of settings (expert format x gating x top-k) on one loaded model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from moesim.errors import MoesimError
from moesim.quant import WeightFormat
from moesim.quality.data import EvalText
from moesim.quality.gating import ExpertUsage, GatingSetting, Sensitivities, applied_gating
from moesim.quality.moe import LoadedModel
from moesim.quality.perplexity import PerplexityResult, evaluate_perplexity
from moesim.quality.quantize import get_quantizer, quantized_experts
from moesim.quality.table import QualityRow, make_row


@dataclass(frozen=True)
class QualitySetting:
    fmt: WeightFormat
    quantizer: str
    gating: GatingSetting


def settings_grid(
    bits: list[int],
    group_size: int,
    quantizer: str,
    thresholds: list[float],
    top_ks: list[int | None],
    sensitivities: Sensitivities | None,
    model_top_k: int,
) -> list[QualitySetting]:
    """Every expert format with every gating: no adaptive gating at each top-k, and each AdapMoE threshold
    at top-k 2 (AdapMoE is defined for two experts; thresholds are not combined with other top-k)."""
    get_quantizer(quantizer)
    formats = [WeightFormat(b, group_size) for b in bits]
    for t in thresholds:
        if not 0.0 < t < 1.0:
            raise MoesimError(f"--adaptive-gating {t:g}: expected a threshold between 0 and 1 (exclusive)")
    effective = [k if k is not None else model_top_k for k in top_ks]
    if thresholds and 2 not in effective:
        raise MoesimError(
            f"--adaptive-gating needs top-k 2 (AdapMoE drops the second of two experts); top-k is "
            f"{', '.join(map(str, effective))}"
        )
    gatings = []
    for k in top_ks:
        gatings.append(GatingSetting(top_k=k))
        if (k if k is not None else model_top_k) == 2:
            gatings.extend(GatingSetting(top_k=k, threshold=t, sensitivities=sensitivities) for t in thresholds)
    return [QualitySetting(fmt, quantizer, g) for fmt in formats for g in gatings]


def measure_quality(
    loaded: LoadedModel,
    text: EvalText,
    windows: np.ndarray,
    settings: list[QualitySetting],
    on_row: Callable[[QualityRow, PerplexityResult], None] | None = None,
    batch_size: int | None = None,
    progress=None,
) -> list[QualityRow]:
    """Perplexity for each setting; experts are quantized once per format, gating varied under it.
    ``progress`` (anything with ``update()``) counts the settings measured."""
    model_top_k = loaded.layers[0].top_k
    rows = []
    by_format: dict[WeightFormat, list[QualitySetting]] = {}
    for s in settings:
        by_format.setdefault(s.fmt, []).append(s)
    for fmt, group in by_format.items():
        with quantized_experts(loaded.layers, fmt, group[0].quantizer):
            for setting in group:
                usage = ExpertUsage(len(loaded.layers))
                with applied_gating(loaded.layers, setting.gating, usage=usage):
                    result = evaluate_perplexity(loaded.model, windows, batch_size=batch_size)
                g = setting.gating
                row = make_row(
                    model_id=loaded.model_id, checkpoint_sha256=loaded.checkpoint_sha256, quantizer=setting.quantizer,
                    expert_bits=fmt.bits, group_size=fmt.group_size, gating_threshold=float(g.threshold),
                    gating_sensitivity=g.sensitivity_name, top_k=g.top_k if g.top_k is not None else model_top_k,
                    model_top_k=model_top_k, data=text.name, data_sha256=text.sha256, seq_len=int(windows.shape[1]),
                    windows=result.windows, predicted_tokens=result.predicted_tokens, perplexity=result.perplexity,
                    mean_nll=result.mean_nll, experts_per_token=usage.experts_per_token,
                )
                rows.append(row)
                if on_row is not None:
                    on_row(row, result)
                if progress is not None:
                    progress.update(1)
    return rows
