"""Expert FFN kernels that really run here, one per weight format, and a probe that proves it.

An expert is ``down(act(gate(x)) * up(x))`` with the gate and up projections fused into one matrix as
transformers stores Mixtral-style experts. Each format uses a real library kernel:

* ``bf16``: ``torch.nn.functional.linear`` (cuBLAS on CUDA, oneDNN on CPU); fp16 on GPUs without bf16.
* ``int8``: weight-only int8 with per-output-channel scales, ``torch._weight_int8pack_mm`` (CPU, and CUDA
  where this torch build has it); otherwise on CUDA ``torch._int_mm`` (cuBLASLt int8 GEMM) with the
  activations quantized per token on the fly (W8A8).
* ``int4``: weight-only 4-bit with a bf16 scale and zero per group of 128, ``torch._weight_int4pack_mm``
  (tinygemm, CUDA compute capability >= 8.0) or ``torch._weight_int4pack_mm_for_cpu``.

No 3- or 2-bit kernel ships with torch; formats without a real kernel are not offered (the probe is
the list of what ran and matched a dequantized reference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

INT4_GROUP = 128
INT4_INNER_K_TILES = 8


@dataclass(frozen=True)
class KernelInfo:
    kernel: str
    library: str
    weight_bits_per_param: float
    int8_mode: str = "pack"  # for int8: "pack" (weight-only) or "int_mm" (W8A8)


def _quant_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: (int8 weights [N, K], float32 scales [N])."""
    scale = w.float().abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def _quant_int4_groups(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit per group along K, in tinygemm's convention w = (q - 8) * scale + zero.

    Returns (int32 codes [N, K] in 0..15, scales [N, K/group], zeros [N, K/group]).
    """
    n, k = w.shape
    wg = w.float().reshape(n, k // group, group)
    lo = wg.amin(dim=-1)
    hi = wg.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-8)
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(n, k)
    zero = lo + 8.0 * scale
    return q, scale, zero


def _dequant_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    n, k = q.shape
    return ((q.reshape(n, k // group, group).float() - 8.0) * scale[..., None] + zero[..., None]).reshape(n, k)


class Linear:
    """One weight matrix [N, K] in a given format; ``__call__(x)`` computes ``x @ w.T`` with the real kernel."""

    def __init__(self, w: torch.Tensor, kernel: str, act_dtype: torch.dtype, int8_mode: str = "pack",
                 keep_reference: bool = False):
        # The dequantized fp32 reference is for checking the kernel (the probe, tests); building it for a
        # Mixtral-sized expert took longer than quantizing, so timing runs go without.
        self.kernel = kernel
        self.reference: torch.Tensor | None = None
        self.act_dtype = act_dtype
        self.n, self.k = w.shape
        device = w.device
        if kernel == "bf16":
            self.w = w.to(act_dtype).contiguous()
            if keep_reference:
                self.reference = self.w.float()
            self._fn: Callable = lambda x: F.linear(x, self.w)
        elif kernel == "int8":
            q, scale = _quant_int8_per_channel(w)
            if keep_reference:
                self.reference = q.float() * scale[:, None]
            if int8_mode == "pack":
                self.q = q.contiguous()
                self.scale = scale.to(act_dtype)
                self._fn = lambda x: torch._weight_int8pack_mm(x, self.q, self.scale)
            else:  # W8A8 through cuBLASLt; _int_mm needs more than 16 rows, so short inputs are padded
                self.qt = q.contiguous().t()  # a column-major [K, N] view, the layout cuBLASLt wants
                self.scale = scale.to(torch.float32)
                self._fn = self._int_mm
        elif kernel == "int4":
            q, scale, zero = _quant_int4_groups(w, INT4_GROUP)
            if keep_reference:
                self.reference = _dequant_int4(q, scale, zero, INT4_GROUP)
            sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(act_dtype)  # [K/g, N, 2]
            self.scales_and_zeros = sz
            if device.type == "cuda":
                packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
                self.packed = torch._convert_weight_to_int4pack(packed.contiguous(), INT4_INNER_K_TILES)
                self._fn = lambda x: torch._weight_int4pack_mm(x, self.packed, INT4_GROUP, self.scales_and_zeros)
            else:
                self.packed = torch._convert_weight_to_int4pack_for_cpu(q.contiguous(), INT4_INNER_K_TILES)
                self._fn = lambda x: torch._weight_int4pack_mm_for_cpu(x, self.packed, INT4_GROUP,
                                                                      self.scales_and_zeros)
        else:
            raise ValueError(f"no real kernel for '{kernel}'")
        if self.reference is not None:
            self.reference = self.reference.to(device)

    def _int_mm(self, x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        xs = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
        xq = torch.round(x.float() / xs).clamp(-127, 127).to(torch.int8)
        if m <= 16:
            xq = F.pad(xq, (0, 0, 0, 32 - m))
        acc = torch._int_mm(xq, self.qt)
        return (acc[:m].float() * xs * self.scale[None, :]).to(self.act_dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)


class ExpertFFN:
    """A routed expert (fused gate+up, SiLU-gated product, down) in one weight format."""

    def __init__(self, hidden: int, intermediate: int, kernel: str, device: torch.device, act_dtype: torch.dtype,
                 seed: int = 0, int8_mode: str = "pack", keep_reference: bool = False):
        g = torch.Generator(device="cpu").manual_seed(seed)
        std = hidden ** -0.5
        gate_up = (torch.randn(2 * intermediate, hidden, generator=g) * std).to(device)
        down = (torch.randn(hidden, intermediate, generator=g) * intermediate ** -0.5).to(device)
        self.intermediate = intermediate
        self.gate_up = Linear(gate_up, kernel, act_dtype, int8_mode, keep_reference)
        self.down = Linear(down, kernel, act_dtype, int8_mode, keep_reference)
        del gate_up, down

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gu = self.gate_up(x)
        gate, up = gu[:, : self.intermediate], gu[:, self.intermediate:]
        return self.down(F.silu(gate) * up)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        gu = x.float() @ self.gate_up.reference.t()
        gate, up = gu[:, : self.intermediate], gu[:, self.intermediate:]
        return (F.silu(gate) * up) @ self.down.reference.t()


INT8_LIBRARIES = {
    "pack": "torch._weight_int8pack_mm (W8A16, per-channel scales)",
    "int_mm": "torch._int_mm (cuBLASLt int8 GEMM, W8A8, activations quantized per token)",
}


def int8_modes_for(device: torch.device) -> tuple[str, ...]:
    """int8 kernels to try on ``device``, preferred first (calibration keeps the faster that runs)."""
    return ("pack",) if device.type == "cpu" else ("pack", "int_mm")


def library_for(kernel: str, device: torch.device, act_dtype: torch.dtype, int8_mode: str = "pack") -> str:
    if kernel == "bf16":
        lib = "cuBLAS" if device.type == "cuda" else "oneDNN/MKL"
        return f"torch.nn.functional.linear ({lib}), {str(act_dtype).replace('torch.', '')} weights and activations"
    if kernel == "int8":
        return INT8_LIBRARIES[int8_mode]
    if kernel == "int4":
        if device.type == "cuda":
            return f"torch._weight_int4pack_mm (tinygemm, W4A16, group {INT4_GROUP})"
        return f"torch._weight_int4pack_mm_for_cpu (W4A16, group {INT4_GROUP})"
    raise ValueError(kernel)


def bits_per_param(kernel: str, hidden: int) -> float:
    if kernel == "bf16":
        return 16.0
    if kernel == "int8":
        return 8.0 + 16.0 / hidden  # one scale per output row of K=hidden inputs (approximately)
    if kernel == "int4":
        return 4.0 + 2 * 16.0 / INT4_GROUP
    raise ValueError(kernel)


def probe_kernels(device: torch.device, act_dtype: torch.dtype) -> tuple[dict[str, list[KernelInfo]], dict[str, str]]:
    """Run every candidate kernel on a small expert and keep those that run and match the reference.

    Returns (kernel key -> the implementations that work, preferred first; reasons for the others).
    """
    ok: dict[str, list[KernelInfo]] = {}
    failed: dict[str, str] = {}
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=act_dtype)
    for kernel in ("bf16", "int8", "int4"):
        for mode in (int8_modes_for(device) if kernel == "int8" else ("pack",)):
            name = f"{kernel}/{mode}" if kernel == "int8" else kernel
            try:
                ffn = ExpertFFN(256, 512, kernel, device, act_dtype, seed=3, int8_mode=mode, keep_reference=True)
                y = ffn(x).float()
                ref = ffn.reference(x.float())
                err = float((y - ref).norm() / ref.norm())
            except Exception as exc:  # a kernel this torch build or device does not have
                failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                continue
            if not err < 0.08:
                failed[name] = f"ran but differs from the dequantized reference (relative error {err:.3f})"
                continue
            ok.setdefault(kernel, []).append(KernelInfo(kernel, library_for(kernel, device, act_dtype, mode),
                                                        bits_per_param(kernel, 4096), mode))
    for kernel in ("int3", "int2"):
        failed[kernel] = "no 3/2-bit matmul kernel in torch; not simulated here"
    return ok, failed
