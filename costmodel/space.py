"""The configuration space the cost model predicts over and ``moesim search`` screens.

A configuration is what ``moesim simulate`` takes for one trace on one profile: a policy preset, its
cache size in experts per MoE layer, the expert and non-expert weight formats and the batch size. A
:class:`ConfigSet` holds many of them as columns (numpy arrays), so predictions are vectorised; it
converts to the sweep's :class:`~moesim.simulator.sweep.SweepPoint` (to simulate) and to the exact
``moesim simulate`` / ``moesim validate`` command lines that reproduce one configuration.

Prompt and output lengths are not knobs here: the simulator replays the trace's own requests, so they
enter the cost model as trace features (see :mod:`moesim.costmodel.features`).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from moesim.errors import MoesimError
from moesim.quant import WeightFormat

# Format choices; None is the trace's own format (its recorded dtype and bytes).
EXPERT_FORMATS: tuple[Optional[str], ...] = (None, "16", "8", "4", "3", "2")
NON_EXPERT_FORMATS: tuple[Optional[str], ...] = (None, "16", "8", "4")
# Presets that read the future of the trace: bounds to compare against, not deployable configurations.
ORACLE_PRESETS = ("belady",)


def format_label(fmt: Optional[str]) -> str:
    return "trace" if fmt is None else WeightFormat.parse(fmt).name


def parse_format_choice(text: str, flag: str) -> Optional[str]:
    """'trace'/'native' -> None, else a format accepted by ``--expert-bits`` (checked)."""
    t = text.strip().lower()
    if t in ("trace", "native"):
        return None
    try:
        WeightFormat.parse(t)
    except MoesimError as exc:
        raise MoesimError(f"{flag} {exc.message}") from None
    return t


@dataclass(frozen=True)
class ConfigSet:
    """Columns of configurations. ``policy`` indexes ``policies``; ``expert_format`` / ``non_expert_format``
    index ``expert_formats`` / ``non_expert_formats`` (None entries: the trace's own format)."""

    policies: tuple[str, ...]
    expert_formats: tuple[Optional[str], ...]
    non_expert_formats: tuple[Optional[str], ...]
    policy: np.ndarray  # int32 [n]
    cache_experts: np.ndarray  # int64 [n] experts per MoE layer
    expert_format: np.ndarray  # int32 [n]
    non_expert_format: np.ndarray  # int32 [n]
    batch: np.ndarray  # int64 [n]

    def __post_init__(self):
        n = len(self.policy)
        for name in ("cache_experts", "expert_format", "non_expert_format", "batch"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"ConfigSet column {name} has {len(getattr(self, name))} rows, expected {n}")

    def __len__(self) -> int:
        return int(len(self.policy))

    @classmethod
    def from_rows(cls, rows: Sequence[tuple[str, int, Optional[str], Optional[str], int]],
                  policies: Optional[Sequence[str]] = None) -> "ConfigSet":
        """From (policy, cache_experts, expert_bits, non_expert_bits, batch) tuples."""
        pols = tuple(policies) if policies is not None else tuple(dict.fromkeys(r[0] for r in rows))
        efs = tuple(dict.fromkeys([None, *EXPERT_FORMATS, *(r[2] for r in rows)]))
        nfs = tuple(dict.fromkeys([None, *NON_EXPERT_FORMATS, *(r[3] for r in rows)]))
        return cls(
            policies=pols, expert_formats=efs, non_expert_formats=nfs,
            policy=np.asarray([pols.index(r[0]) for r in rows], dtype=np.int32),
            cache_experts=np.asarray([int(r[1]) for r in rows], dtype=np.int64),
            expert_format=np.asarray([efs.index(r[2]) for r in rows], dtype=np.int32),
            non_expert_format=np.asarray([nfs.index(r[3]) for r in rows], dtype=np.int32),
            batch=np.asarray([int(r[4]) for r in rows], dtype=np.int64),
        )

    def take(self, index) -> "ConfigSet":
        idx = np.asarray(index)
        return ConfigSet(self.policies, self.expert_formats, self.non_expert_formats, self.policy[idx],
                         self.cache_experts[idx], self.expert_format[idx], self.non_expert_format[idx],
                         self.batch[idx])

    def row(self, i: int) -> tuple[str, int, Optional[str], Optional[str], int]:
        return (self.policies[int(self.policy[i])], int(self.cache_experts[i]),
                self.expert_formats[int(self.expert_format[i])],
                self.non_expert_formats[int(self.non_expert_format[i])], int(self.batch[i]))

    def rows(self) -> list[tuple[str, int, Optional[str], Optional[str], int]]:
        return [self.row(i) for i in range(len(self))]

    def policy_names(self) -> np.ndarray:
        return np.asarray(self.policies, dtype=object)[self.policy]


def enumerate_space(policies: Sequence[str], cache_sizes: Sequence[int], expert_formats: Sequence[Optional[str]],
                    non_expert_formats: Sequence[Optional[str]], batches: Sequence[int]) -> ConfigSet:
    """The full grid, in a fixed order (policy, cache size, expert format, non-expert format, batch)."""
    pols = tuple(policies)
    efs = tuple(dict.fromkeys(expert_formats))
    nfs = tuple(dict.fromkeys(non_expert_formats))
    grids = np.meshgrid(np.arange(len(pols)), np.asarray(sorted(set(int(c) for c in cache_sizes))),
                        np.arange(len(efs)), np.arange(len(nfs)), np.asarray(sorted(set(int(b) for b in batches))),
                        indexing="ij")
    p, c, e, n, b = (g.reshape(-1) for g in grids)
    return ConfigSet(pols, efs, nfs, p.astype(np.int32), c.astype(np.int64), e.astype(np.int32),
                     n.astype(np.int32), b.astype(np.int64))


def default_cache_sizes(num_experts: int) -> list[int]:
    """Every size from 0 to all experts per layer."""
    return list(range(0, num_experts + 1))


def sweep_point(trace: str, profile: str, row: tuple, gpu_mem_bytes: Optional[int] = None):
    from moesim.simulator.sweep import SweepPoint

    policy, cache, ebits, nbits, batch = row
    return SweepPoint(trace, profile, policy, int(cache), gpu_mem_bytes, ebits, nbits, int(batch))


def _flag(name: str, value) -> list[str]:
    return [] if value is None else [name, str(value)]


def simulate_command(trace: str, profile: str, row: tuple, gpu_mem: Optional[str] = None) -> str:
    """The exact ``moesim simulate`` command for one configuration."""
    policy, cache, ebits, nbits, batch = row
    args = ["moesim", "simulate", "--trace", trace, "--profile", profile, "--policy", policy,
            "--cache-experts", str(int(cache))]
    args += _flag("--expert-bits", ebits) + _flag("--non-expert-bits", nbits)
    if int(batch) != 1:
        args += ["--batch", str(int(batch))]
    args += _flag("--gpu-mem", gpu_mem)
    return " ".join(shlex.quote(a) for a in args)


VALIDATE_FORMATS = {"16": "bf16", "8": "int8", "4": "int4"}  # the engine's real expert kernels


def validate_command(trace: str, profile: str, row: tuple, model_config: Optional[str] = None,
                     device: Optional[str] = None, out: str = "out/validate") -> str:
    """The ``moesim validate`` command for the same policy, cache size and expert bits.

    The engine has real kernels for 16-, 8- and 4-bit experts only; a narrower format is checked at 4 bits,
    and :func:`validate_gap` says so (the command never silently drops the format).
    """
    policy, cache, ebits, _, _ = row
    args = ["moesim", "validate", "--trace", trace, "--policy", policy, "--cache-experts", str(int(cache))]
    if ebits is not None:
        bits = WeightFormat.parse(ebits).bits
        args += ["--expert-bits", str(bits) if str(bits) in VALIDATE_FORMATS else "4"]
    args += _flag("--model-config", model_config) + _flag("--device", device)
    args += ["--profile", profile, "--out", out]
    return " ".join(shlex.quote(a) for a in args)


def validate_gap(row: tuple) -> Optional[str]:
    """Why the validate command cannot run exactly this configuration, or None."""
    ebits = row[2]
    if ebits is None:
        return None
    bits = WeightFormat.parse(ebits).bits
    if str(bits) in VALIDATE_FORMATS:
        return None
    return (f"the real engine has no {bits}-bit expert kernel (it has {', '.join(VALIDATE_FORMATS)}), so the validate "
            f"command checks the same configuration with 4-bit experts")


def quality_caveat(row: tuple, has_quality_table: bool) -> Optional[str]:
    """A chosen format below 4 bits costs quality the latency search does not see without a quality table."""
    ebits = row[2]
    if ebits is None or has_quality_table:
        return None
    bits = WeightFormat.parse(ebits).bits
    if bits >= 4:
        return None
    return (f"{bits}-bit experts usually cost noticeable quality (perplexity), which this search did not measure; "
            f"run `moesim quality --expert-bits 16,4,{bits}` and search again with --quality-table FILE --max-ppl P, "
            f"or exclude it with --expert-bits trace,16,8,4")


def unique_in_order(items: Iterable) -> list:
    return list(dict.fromkeys(items))
