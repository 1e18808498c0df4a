"""Quantize-dequantize expert weights, so perplexity is measured with the exact rounding a format implies.

Quantizers (one registry, ``QUANTIZERS``):

``rtn``  group-wise asymmetric round-to-nearest in torch, the layout :class:`moesim.quant.WeightFormat`
         prices: each run of ``group_size`` consecutive weights along the input dim gets a min-max scale
         and zero point, both stored as fp16 (WeightFormat's default meta_bits=16). Dependency-free.
``hqq``  the ``hqq`` package's Half-Quadratic Quantizer (``hqq.core.quantize.Quantizer``, optimize=True),
         as Mixtral-Offloading and AdapMoE quantize experts: axis 0 (the only axis their kernels take),
         zero rounded at 4 bit as ``hqq_base_quant_config`` does, scale and zero kept at 16 bit (their
         8-bit meta quantization is not modelled). Optional: needs ``pip install hqq``.

Bits 16 means bfloat16: weights are rounded to bf16 (a no-op for a bf16 checkpoint).
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Callable, Iterator

import torch

from moesim.errors import MoesimError
from moesim.quant import WeightFormat
from moesim.quality.moe import MoELayer, expert_matrices

FakeQuantizer = Callable[[torch.Tensor, WeightFormat, int], torch.Tensor]


def _as_bf16(weight: torch.Tensor) -> torch.Tensor:
    return weight.to(torch.bfloat16).to(weight.dtype)


def rtn_fake_quantize(weight: torch.Tensor, fmt: WeightFormat, input_dim: int = -1) -> torch.Tensor:
    """Group-wise asymmetric min-max RTN along ``input_dim``; returns dequantized weights, same dtype/shape.

    A trailing partial group (input dim not a multiple of the group size) is its own smaller group.
    """
    if not fmt.is_quantized:
        return _as_bf16(weight)
    if fmt.meta_bits != 16:
        raise MoesimError(f"quantizer rtn: meta_bits {fmt.meta_bits} is not supported (scale and zero are fp16)")
    w = weight.detach().movedim(input_dim, -1).to(torch.float32)
    n_in = w.shape[-1]
    g = min(fmt.group_size, n_in)
    pad = (-n_in) % g
    if pad:
        # Repeating the last column leaves the last group's min and max unchanged.
        w = torch.cat([w, w[..., -1:].expand(*w.shape[:-1], pad)], dim=-1)
    groups = w.reshape(*w.shape[:-1], -1, g)
    lo = groups.amin(dim=-1, keepdim=True)
    hi = groups.amax(dim=-1, keepdim=True)
    qmax = float(2**fmt.bits - 1)
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # Scale and zero point are stored at 16 bit, so round them as the stored format does.
    scale = scale.to(torch.float16).to(torch.float32)
    zero = (-lo / scale).to(torch.float16).to(torch.float32)
    q = torch.clamp(torch.round(groups / scale + zero), 0.0, qmax)
    deq = ((q - zero) * scale).reshape(*w.shape[:-1], -1)[..., :n_in]
    return deq.movedim(-1, input_dim).to(weight.dtype).contiguous()


def hqq_fake_quantize(weight: torch.Tensor, fmt: WeightFormat, input_dim: int = -1) -> torch.Tensor:
    """HQQ quantize-dequantize of each expert matrix ([out, in] layout, HQQ's default axis 0)."""
    if not fmt.is_quantized:
        return _as_bf16(weight)
    if fmt.meta_bits != 16:
        raise MoesimError(f"quantizer hqq: meta_bits {fmt.meta_bits} is not supported here (16-bit scale and zero)")
    try:
        from hqq.core.quantize import Quantizer
    except ImportError:
        raise MoesimError("--quantizer hqq: the hqq package is not installed (pip install hqq)") from None
    w = weight.detach().movedim(input_dim, -1).to(torch.float32)  # [..., out, in]
    flat = w.reshape(-1, w.shape[-2], w.shape[-1])
    out = torch.empty_like(flat)
    for i in range(flat.shape[0]):
        if flat[i].numel() % fmt.group_size:
            raise MoesimError(
                f"--group-size {fmt.group_size}: hqq needs it to divide the expert matrix size {flat[i].numel()}"
            )
        w_q, meta = Quantizer.quantize(
            flat[i], nbits=fmt.bits, group_size=fmt.group_size, optimize=True, round_zero=fmt.bits == 4, axis=0,
            bitpack=False, compute_dtype=torch.float32, device="cpu",
        )
        out[i] = Quantizer.dequantize(w_q, meta).reshape(flat.shape[1:]).to(torch.float32)
    return out.reshape(w.shape).movedim(-1, input_dim).to(weight.dtype).contiguous()


QUANTIZERS: dict[str, FakeQuantizer] = {
    "rtn": rtn_fake_quantize,
    "hqq": hqq_fake_quantize,
}


def get_quantizer(name: str) -> FakeQuantizer:
    """The quantizer called ``name``; checks its optional package is importable (before any model loads)."""
    try:
        fake = QUANTIZERS[name]
    except KeyError:
        raise MoesimError(f"--quantizer {name}: expected one of {', '.join(QUANTIZERS)}") from None
    if name == "hqq" and importlib.util.find_spec("hqq") is None:
        raise MoesimError("--quantizer hqq: the hqq package is not installed (pip install hqq)")
    return fake


@contextlib.contextmanager
def quantized_experts(layers: list[MoELayer], fmt: WeightFormat, quantizer: str = "rtn") -> Iterator[None]:
    """Replace every expert weight with its quantize-dequantize image; restore the originals on exit.

    Each expert is quantized on its own: groups never span two experts, since they lie along the input dim.
    """
    fake = get_quantizer(quantizer)
    saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for layer in layers:
                for matrix in expert_matrices(layer):
                    original = matrix.param.detach().clone()
                    saved.append((matrix.param, original))
                    matrix.param.copy_(fake(original, fmt, matrix.input_dim))
        yield
    finally:
        with torch.no_grad():
            for param, original in saved:
                param.copy_(original)
