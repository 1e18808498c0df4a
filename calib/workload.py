"""How much arithmetic and memory traffic each calibrated operation does, for any model shape.

The fitted cost models are roofline-shaped (a fixed latency plus the larger of compute time and
memory time), so they need the floating-point operations and the bytes moved of a query. These
formulas are the single place that defines them; measurement, fitting and prediction all use them,
which is what lets a profile measured at one model's shape predict another's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.modelspec import ModelShape

ACT_BYTES = 2.0  # activations and the KV cache are 16-bit in every calibrated kernel


@dataclass(frozen=True)
class Work:
    """FLOPs and bytes of one operation (arrays broadcast together).

    ``attention_flops`` is the share of ``flops`` spent attending over the KV cache (zero for operations
    without attention). It is kept apart because on some devices (a CPU above all) attention runs far
    below the rate of the layer's matrix products, so a model that gives it its own rate predicts what
    one shared roofline cannot. (The KV cache's bytes stay in ``nbytes``.)
    """

    flops: np.ndarray
    nbytes: np.ndarray
    attention_flops: np.ndarray | float = 0.0

    def attention_share(self) -> np.ndarray:
        """``attention_flops`` broadcast to the shape of ``flops``."""
        return np.array(np.broadcast_arrays(np.asarray(self.flops, dtype=np.float64),
                                            np.asarray(self.attention_flops, dtype=np.float64))[1])


def expert_work(shape: ModelShape, tokens, weight_bits_per_param: float) -> Work:
    """One routed expert's FFN: gate, up and down projections for ``tokens`` rows.

    Every expert parameter takes part in one multiply-add per token, hence 2 FLOPs per parameter per
    token. Bytes: the weights once (at the kernel's own bits per parameter) plus activations in and out
    and the intermediate gate/up/act tensors.
    """
    t = np.asarray(tokens, dtype=np.float64)
    h, inter = shape.hidden_size, shape.expert_intermediate_size
    flops = 2.0 * shape.expert_params * t
    weights = shape.expert_params * weight_bits_per_param / 8.0
    acts = t * (2 * h + 4 * inter) * ACT_BYTES
    return Work(flops, weights + acts)


def attention_params(shape: ModelShape) -> int:
    """Parameters of one layer's attention, router and the two norms (no experts): the attention block as
    counted on the built model when the shape records it (multi-head latent attention has low-rank q and kv
    projections), else q, k, v and o projections of the heads."""
    h = shape.hidden_size
    if shape.attention_params:
        attention = shape.attention_params
    else:
        q = h * shape.num_attention_heads * shape.head_dim
        kv = 2 * h * shape.num_key_value_heads * shape.head_dim
        o = shape.num_attention_heads * shape.head_dim * h
        attention = q + kv + o
    router = h * shape.num_experts
    return attention + router + 2 * h


def score_flops_per_key(shape: ModelShape) -> float:
    """FLOPs of QK^T and AV for one query row against one cached key, over all heads."""
    qk = shape.qk_head_dim or shape.head_dim
    v = shape.v_head_dim or shape.head_dim
    return 2.0 * shape.num_attention_heads * (qk + v)


def kv_bytes_per_token(shape: ModelShape) -> float:
    per = shape.kv_bytes_per_token_per_layer_fp16
    return float(per or 2 * shape.num_key_value_heads * shape.head_dim * ACT_BYTES)


def decode_work(shape: ModelShape, batch, context, weight_bits: float = 16.0) -> Work:
    """One decoder layer without its experts, ``batch`` sequences each adding one token at KV length ``context``;
    its weights read at ``weight_bits`` per parameter (activations and KV cache stay 16-bit)."""
    b = np.asarray(batch, dtype=np.float64)
    c = np.asarray(context, dtype=np.float64)
    p = attention_params(shape)
    qk_av = score_flops_per_key(shape) * c  # QK^T and AV for one query row
    kv = b * c * kv_bytes_per_token(shape)
    flops = b * (2.0 * p + qk_av)
    nbytes = p * weight_bits / 8.0 + kv + b * 4 * shape.hidden_size * ACT_BYTES
    return Work(flops, nbytes, b * qk_av)


def prefill_work(shape: ModelShape, tokens, weight_bits: float = 16.0) -> Work:
    """One decoder layer without its experts over a ``tokens``-long prompt (causal attention); weights at
    ``weight_bits`` per parameter."""
    t = np.asarray(tokens, dtype=np.float64)
    p = attention_params(shape)
    qk_av = score_flops_per_key(shape) * t * (t + 1) / 2.0
    kv = t * kv_bytes_per_token(shape)
    flops = 2.0 * p * t + qk_av
    nbytes = p * weight_bits / 8.0 + kv + t * 6 * shape.hidden_size * ACT_BYTES
    return Work(flops, nbytes, qk_av)


def head_work(shape: ModelShape, tokens) -> Work:
    """Final norm and lm_head for ``tokens`` rows (the embedding lookup is a gather, bytes only)."""
    t = np.asarray(tokens, dtype=np.float64)
    vh = float(shape.vocab_size) * shape.hidden_size
    flops = 2.0 * vh * t
    nbytes = vh * ACT_BYTES + t * (shape.vocab_size * 4 + 3 * shape.hidden_size * ACT_BYTES)
    return Work(flops, nbytes)
