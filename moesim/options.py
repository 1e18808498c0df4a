"""The command-line options that several commands share, with one parser and one rule per flag.

simulate, sweep, search and validate all read cache sizes, memory sizes, batch sizes, lists and worker
counts through this module, so a value one command accepts another never rejects (or silently clamps,
or replaces by a default). Every parser raises a one-line :class:`MoesimError` naming the flag, the value
and what was expected.
"""

from __future__ import annotations

import os
from pathlib import Path
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


# ---- click options shared by several commands ------------------------------------------------------
# Each shared flag is declared here once, with one grammar and one help sentence; a command adds only
# what is its own (its default, what it does with the value).
def _help(base: str, extra: str) -> str:
    return f"{base} {extra}".strip()


def policy_option(many: bool, default: Optional[str] = "lru", extra: str = "", dest: Optional[str] = None):
    """--policy: a preset, or a preset with parts replaced (``lru+prefetch=oracle+scope=global``)."""
    base = ("Comma-separated policies: presets, or presets with parts replaced (lru+prefetch=oracle,fiddler)."
            if many else "Policy: a preset (lru, fiddler, ...), or a preset with parts replaced "
                         "(lru+prefetch=oracle+scope=global).")
    names = ("--policy", dest) if dest else ("--policy",)
    return click.option(*names, default=default, show_default=default is not None, help=_help(base, extra))


def cache_experts_option(many: bool, required: bool = False, extra: str = ""):
    """--cache-experts: experts per MoE layer, 0..E; a list also takes ranges (2,4,8 or 0..16)."""
    base = ("Cache sizes in experts per MoE layer: comma-separated integers 0..E or ranges (2,4,8 or 0..16)."
            if many else "Cache size in experts per MoE layer, 0..E.")
    return click.option("--cache-experts", default=None, required=required, help=_help(base, extra))


def batch_option(many: bool, default: Optional[str] = "1", extra: str = ""):
    """--batch: requests decoded together, at most the trace's requests."""
    base = ("Comma-separated batch sizes (requests decoded together; each at most the trace's requests)."
            if many else "Requests decoded together (at most the trace's requests).")
    names = ("--batch", "batches") if many else ("--batch",)
    return click.option(*names, default=default, show_default=default is not None, help=_help(base, extra))


# ---- output paths --------------------------------------------------------------------------------
# One rule for --out: a command that writes several files takes a FOLDER, a command that writes one
# file takes a FILE; the other kind is refused before any work.
FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".md", ".png", ".txt", ".html")


def check_out_path(value: Optional[str], kind: str, flag: str = "--out") -> Optional[str]:
    """``value`` if it can be the FOLDER / FILE ``kind`` asks for, else a one-line error saying which it is."""
    if value is None:
        return None
    path = Path(value)
    if kind == "folder":
        if path.exists() and not path.is_dir():
            raise click.BadParameter(f"{value} is a file; expected a FOLDER (this command writes several files "
                                     f"into it)", param_hint=f"'{flag}'")
        if not path.exists() and path.suffix.lower() in FILE_SUFFIXES:
            raise click.BadParameter(f"{value} names a {path.suffix} file; expected a FOLDER (this command writes "
                                     f"several files into it)", param_hint=f"'{flag}'")
    elif kind == "file":
        if path.is_dir() or str(value).endswith(("/", os.sep)):
            raise click.BadParameter(f"{value} is a folder; expected a FILE (this command writes one file)",
                                     param_hint=f"'{flag}'")
    else:
        raise ValueError(f"output kind {kind!r}: expected 'folder' or 'file'")
    return value


def out_option(kind: str, help_text: str, default: Optional[str] = None, required: bool = False,
               dest: Optional[str] = None, flag: str = "--out"):
    """An output path flag: ``kind`` "folder" (the command writes several files) or "file" (one file)."""
    metavar = "FOLDER" if kind == "folder" else "FILE"
    lead = "Folder: " if kind == "folder" else "File: "
    names = (flag, dest) if dest else (flag,)
    return click.option(*names, default=default, required=required, show_default=default is not None,
                        metavar=metavar, help=lead + help_text,
                        callback=lambda ctx, param, value: check_out_path(value, kind, flag))
