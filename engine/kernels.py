"""Expert weights in one format, as flat tensors that can be copied between host and device.

Quantization and packing are calibration's own (:class:`moesim.calib.kernels.Linear`), so the engine
runs exactly the kernels the profile timed: ``bf16`` through ``F.linear``, ``int8`` through
``torch._weight_int8pack_mm`` (W8A16) or ``torch._int_mm`` (W8A8, calib's ``Linear._int_mm``), ``int4``
through tinygemm (``torch._weight_int4pack_mm``, or its CPU variant). What differs from calibration is
only where the tensors live: an expert here is a fixed set of tensors (:class:`ExpertTensors`) so that
an expert slot on the device can be overwritten in place by a copy from the host and then computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F

from moesim.calib.kernels import INT4_GROUP, INT8_LIBRARIES, Linear
from moesim.errors import MoesimError

KERNELS = ("bf16", "int8", "int4")
# Linear's attributes that hold one matrix in each format (calibration's own layout)
_ATTRS = {"bf16": ("w",), "int8/pack": ("q", "scale"), "int8/int_mm": ("qt", "scale"),
          "int4": ("packed", "scales_and_zeros")}


@dataclass(frozen=True)
class ExpertFormat:
    """A weight format with a real kernel: ``kernel`` is the profile's key, ``int8_mode`` calib's choice."""

    kernel: str = "bf16"
    int8_mode: str = "pack"  # "pack" (W8A16) or "int_mm" (W8A8); only for int8

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise MoesimError(f"--expert-format '{self.kernel}': expected one of {', '.join(KERNELS)} "
                              f"(formats with a real kernel in torch)")
        if self.int8_mode not in INT8_LIBRARIES:
            raise MoesimError(f"int8 mode '{self.int8_mode}': expected one of {', '.join(INT8_LIBRARIES)}")

    @property
    def variant(self) -> str:
        return f"int8/{self.int8_mode}" if self.kernel == "int8" else self.kernel

    @property
    def trace_dtype(self) -> str:
        """The dtype string the fitted trace records (``simulator.run.trace_format`` maps it to the kernel)."""
        return {"bf16": "bfloat16", "int8": "int8", "int4": "int4"}[self.kernel]

    @classmethod
    def for_profile(cls, kernel: str, profile) -> "ExpertFormat":
        """The format the profile timed for ``kernel`` (for int8: the implementation calibration chose)."""
        if kernel != "int8":
            return cls(kernel)
        model = getattr(profile, "expert_models", {}).get("int8")
        library = model.library if model is not None else ""
        for mode, text in INT8_LIBRARIES.items():
            if library == text:
                return cls("int8", mode)
        return cls("int8", "pack")


class ExpertTensors:
    """One expert's weights (fused gate+up, then down) as an ordered tuple of tensors, and its FFN.

    ``forward`` reads the tensors when called, so after ``copy_from`` overwrote them in place the
    slot computes the newly loaded expert.
    """

    __slots__ = ("fmt", "tensors", "intermediate", "act_fn", "act_dtype", "_gate_up", "_down")

    def __init__(self, fmt: ExpertFormat, tensors: tuple[torch.Tensor, ...], intermediate: int,
                 act_fn: Callable = F.silu, act_dtype: torch.dtype = torch.bfloat16):
        self.fmt = fmt
        self.tensors = tensors
        self.intermediate = intermediate
        self.act_fn = act_fn
        self.act_dtype = act_dtype
        half = len(tensors) // 2
        self._gate_up = _matmul(fmt, tensors[:half], act_dtype)
        self._down = _matmul(fmt, tensors[half:], act_dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu = self._gate_up(x)
        inter = self.intermediate
        return self._down(self.act_fn(gu[:, :inter]) * gu[:, inter:])

    def empty_like(self, device: torch.device, pin_memory: bool = False) -> "ExpertTensors":
        ts = tuple(torch.empty(t.shape, dtype=t.dtype, device=device, pin_memory=pin_memory) for t in self.tensors)
        return ExpertTensors(self.fmt, ts, self.intermediate, self.act_fn, self.act_dtype)

    def to(self, device: torch.device, pin_memory: bool = False) -> "ExpertTensors":
        out = self.empty_like(device, pin_memory)
        for d, s in zip(out.tensors, self.tensors):
            d.copy_(s)
        return out


class _Matmul:
    """``x @ W.T`` for one matrix in one format, calling the kernel calibration timed."""

    __slots__ = ("variant", "ts", "act_dtype", "_shim")

    def __init__(self, variant: str, ts: tuple[torch.Tensor, ...], act_dtype: torch.dtype):
        self.variant = variant
        self.ts = ts
        self.act_dtype = act_dtype
        # calib's W8A8 path is a method of Linear; it reads qt (a column-major view), scale and act_dtype
        self._shim = SimpleNamespace(qt=ts[0].t(), scale=ts[1], act_dtype=act_dtype) if variant == "int8/int_mm" \
            else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        v = self.variant
        if v == "bf16":
            return F.linear(x, self.ts[0])
        if v == "int8/pack":
            return torch._weight_int8pack_mm(x, self.ts[0], self.ts[1])
        if v == "int8/int_mm":
            return Linear._int_mm(self._shim, x)
        if x.device.type == "cuda":
            return torch._weight_int4pack_mm(x, self.ts[0], INT4_GROUP, self.ts[1])
        return torch._weight_int4pack_mm_for_cpu(x, self.ts[0], INT4_GROUP, self.ts[1])


def _matmul(fmt: ExpertFormat, ts: tuple[torch.Tensor, ...], act_dtype: torch.dtype) -> _Matmul:
    return _Matmul(fmt.variant, ts, act_dtype)


def pack_expert(gate_up: torch.Tensor, down: torch.Tensor, fmt: ExpertFormat, act_dtype: torch.dtype,
                act_fn: Callable = F.silu) -> ExpertTensors:
    """Quantize and pack one expert on ``gate_up``'s device with calibration's :class:`Linear`.

    ``gate_up`` is ``[2 * intermediate, hidden]`` (gate rows first, as transformers stores it), ``down``
    ``[hidden, intermediate]``. int4 packing is device specific (tinygemm's CUDA and CPU layouts differ),
    so pack on the device that will run the kernel.
    """
    tensors: list[torch.Tensor] = []
    for w in (gate_up, down):
        try:
            lin = Linear(w, fmt.kernel, act_dtype, fmt.int8_mode)
        except RuntimeError as exc:  # e.g. int4 needs K divisible by its group and tile sizes
            raise MoesimError(f"--expert-format {fmt.kernel}: cannot pack a {tuple(w.shape)} matrix on "
                              f"{w.device.type} ({str(exc).splitlines()[0][:160]})") from None
        for attr in _ATTRS[fmt.variant]:
            t = getattr(lin, attr)
            if attr == "qt":  # a column-major view of q [N, K]: keep q itself, the kernel takes q.t()
                t = t.t()
            tensors.append(t.contiguous())
        del lin
    return ExpertTensors(fmt, tuple(tensors), int(down.shape[1]), act_fn, act_dtype)
