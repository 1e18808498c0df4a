"""Parse the sizes and durations users type on the command line ('16GiB', '3000MiB', '0.5s', '200ms')."""

from __future__ import annotations

import re
from fractions import Fraction

from moesim.errors import MoesimError

_BYTE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30,
}
_TIME_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "min": 60.0}


# a number as users type it: '16', '0.5', '1e3', '2.5E-3'; the sign is read apart to say what is wrong with it
_NUMBER = r"\s*(-?)([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*"


def parse_bytes(text: str | int, what: str = "size") -> int:
    """'16GiB' -> 17179869184; a bare number is bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(_NUMBER, str(text))
    if m and m.group(1) and m.group(3).lower() in _BYTE_UNITS:
        raise MoesimError(f"{what} '{text}': expected a size of 0 or more")
    if not m or m.group(3).lower() not in _BYTE_UNITS:
        raise MoesimError(f"{what} '{text}': expected a number with an optional unit (B, KiB, MiB, GiB, MB, GB)")
    # Exact decimal arithmetic: a float loses whole bytes above 2**53 ('4611686019GB' came out 512 B short).
    return int(Fraction(m.group(2)) * _BYTE_UNITS[m.group(3).lower()])


def parse_seconds(text: str | float, what: str = "duration") -> float:
    """'0.5s' -> 0.5, '200ms' -> 0.2; a bare number is seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(_NUMBER, str(text))
    if m and m.group(1) and m.group(3).lower() in _TIME_UNITS:
        raise MoesimError(f"{what} '{text}': expected a duration of 0 or more")
    if not m or m.group(3).lower() not in _TIME_UNITS:
        raise MoesimError(f"{what} '{text}': expected a number with an optional unit (s, ms, us)")
    return float(m.group(2)) * _TIME_UNITS[m.group(3).lower()]


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
