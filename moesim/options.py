"""The command-line options that several commands share, with one parser and one rule per flag.

simulate, sweep, search and validate all read cache sizes, memory sizes, batch sizes, lists and worker
counts through this module, so a value one command accepts another never rejects (or silently clamps,
or replaces by a default). Every parser raises a one-line :class:`MoesimError` naming the flag, the value
and what was expected.
"""

from __future__ import annotations

import os
from typing import Optional

import click

from moesim.errors import MoesimError
from moesim.units import parse_bytes


def split_list(text: Optional[str], flag: str = "") -> list[str]:
    """'a, b,c' -> ['a', 'b', 'c']; None -> []. A value that lists nothing (',') is an error."""
    if text is None:
        return []
    items = [t.strip() for t in str(text).split(",")]
    if not any(items):
        raise MoesimError(f"{flag} '{text}': expected a comma-separated list, got nothing")
    if "" in items:
        raise MoesimError(f"{flag} '{text}': empty item in the comma-separated list")
    return items


def int_list(text: Optional[str], flag: str, minimum: int = 0) -> list[int]:
    """Comma-separated integers or inclusive ranges ('2,4,8' or '0..16'), each at least ``minimum``."""
    out: list[int] = []
    for t in split_list(text, flag):
        if ".." in t:
            lo_text, _, hi_text = t.partition("..")
            lo, hi = _int(lo_text, flag, t), _int(hi_text, flag, t)
            if lo > hi:
                raise MoesimError(f"{flag} '{t}': empty range, expected LOW..HIGH with LOW <= HIGH")
            values = list(range(lo, hi + 1))
        else:
            values = [_int(t, flag, t)]
        for v in values:
            if v < minimum:
                raise MoesimError(f"{flag} {v}: expected integers >= {minimum}")
        out.extend(values)
    return out


def _int(text: str, flag: str, item: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise MoesimError(f"{flag} '{item}': expected comma-separated integers or ranges like 0..16") from None


def one_int(text: Optional[str], flag: str, minimum: int = 0) -> Optional[int]:
    """A single integer flag (same rule as the list form)."""
    if text is None:
        return None
    values = int_list(str(text), flag, minimum)
    if len(values) != 1:
        raise MoesimError(f"{flag} '{text}': expected one integer")
    return values[0]


# ---- cache sizes ---------------------------------------------------------------------------------
def cache_experts_list(text: Optional[str], flag: str = "--cache-experts") -> list[int]:
    """Cache sizes in experts per layer: integers >= 0 or ranges."""
    return int_list(text, flag, minimum=0)


def check_cache_experts(values: list[int], num_experts: int, flag: str = "--cache-experts") -> None:
    """A cache larger than the layer's experts is a mistake (never clamped)."""
    for v in values:
        if v > num_experts:
            raise MoesimError(f"{flag} {v}: the trace has {num_experts} experts per layer, expected 0..{num_experts}")


# ---- byte sizes ----------------------------------------------------------------------------------
def byte_size(text: Optional[str], flag: str) -> Optional[int]:
    """A positive size such as 16GiB or 4000MiB (a bare number is bytes)."""
    if text is None:
        return None
    value = parse_bytes(str(text), flag)
    if value <= 0:
        raise MoesimError(f"{flag} '{text}': expected a positive size, e.g. 16GiB")
    return value


def byte_sizes(text: Optional[str], flag: str) -> list[int]:
    return [byte_size(t, flag) for t in split_list(text, flag)]


# ---- batch sizes ---------------------------------------------------------------------------------
def batch_list(text: Optional[str], flag: str = "--batch") -> list[int]:
    return int_list(text, flag, minimum=1)


def check_batches(values: list[int], requests: int, flag: str = "--batch") -> None:
    """A batch needs that many requests: a larger one would silently equal a smaller one, so it is refused."""
    for b in values:
        if b > requests:
            raise MoesimError(f"{flag} {b}: the trace has {requests} request{'s' if requests != 1 else ''}, so a "
                              f"batch holds at most {requests}; record or import a trace with more requests")


# ---- worker processes ----------------------------------------------------------------------------
def jobs_count(value: Optional[int], flag: str = "--jobs") -> int:
    """Worker processes: 0 means one per core; a negative count is an error."""
    if value is None or value == 0:
        return os.cpu_count() or 1
    if value < 0:
        raise MoesimError(f"{flag} {value}: expected 0 (one per core) or a positive number of processes")
    return int(value)


def _jobs_callback(ctx, param, value):
    text = value
    if text is None:
        return 0
    try:
        n = int(text)
    except ValueError:
        raise MoesimError(f"--jobs '{text}': expected 0 (one per core) or a positive number of processes") from None
    jobs_count(n)
    return n


def jobs_option(help_text: str = "Worker processes (default: one per core)."):
    """The --jobs flag of every command that runs the simulator in parallel."""
    return click.option("--jobs", default=None, callback=_jobs_callback, help=help_text)
