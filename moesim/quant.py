"""Weight formats: how many bytes a quantized weight takes, shared by simulator, calib, engine and quality.

Group-wise quantization stores, per group of ``group_size`` weights, a scale and a zero point of
``meta_bits`` bits each. HQQ as Mixtral-Offloading configures it (2-bit, group 16, scale and zero
themselves quantized to 8 bit) is ``WeightFormat(2, 16, meta_bits=8)``: 2 + 2*8/16 = 3.0 bits per weight.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from moesim.errors import MoesimError

SUPPORTED_BITS = (16, 8, 4, 3, 2)


@dataclass(frozen=True)
class WeightFormat:
    bits: int = 16
    group_size: int = 64
    meta_bits: int = 16  # bits of each per-group scale and zero point

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise MoesimError(f"weight bits {self.bits}: expected one of {', '.join(map(str, SUPPORTED_BITS))}")
        if self.bits < 16 and self.group_size <= 0:
            raise MoesimError(f"group size {self.group_size}: expected a positive integer")

    @property
    def is_quantized(self) -> bool:
        return self.bits < 16

    @property
    def bits_per_param(self) -> float:
        if not self.is_quantized:
            return 16.0
        return self.bits + 2.0 * self.meta_bits / self.group_size

    def bytes_for(self, params: int) -> int:
        return int(math.ceil(params * self.bits_per_param / 8.0))

    @property
    def kernel(self) -> str:
        """The profile's kernel key for this format: 'bf16', 'int8', 'int4', 'int3' or 'int2'."""
        return "bf16" if not self.is_quantized else f"int{self.bits}"

    @property
    def name(self) -> str:
        if not self.is_quantized:
            return "bf16"
        suffix = "" if self.meta_bits == 16 else f"-m{self.meta_bits}"
        return f"int{self.bits}-g{self.group_size}{suffix}"

    @classmethod
    def parse(cls, text: str | int) -> "WeightFormat":
        """'16', 'bf16', 'fp16', '4', 'int4', 'int4-g64', 'int2-g16-m8'."""
        s = str(text).strip().lower()
        if s in ("16", "bf16", "fp16", "float16", "bfloat16"):
            return cls(16)
        m = re.fullmatch(r"(?:int)?(\d+)(?:-g(\d+))?(?:-m(\d+))?", s)
        if not m:
            raise MoesimError(f"weight format '{text}': expected bits (16, 8, 4, 3, 2) or a name like int4-g64")
        bits = int(m.group(1))
        return cls(bits, int(m.group(2) or 64), int(m.group(3) or 16))
