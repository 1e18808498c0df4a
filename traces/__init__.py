"""Bundled real routing traces (see PROVENANCE.md beside this file).

The bundled set is fixed and checksummed: :data:`BUNDLED_SHA256` names every bundled trace and the SHA-256
of its file. A file a user writes into this folder (``moesim trace --out traces/mine.parquet``) is an
ordinary trace path, never a bundled one: it neither resolves by name nor joins the predictive
prefetcher's default training set, so it cannot change results on the bundled traces. A bundled file whose
bytes no longer match is refused rather than used. ``python traces/convert_bundled.py`` regenerates the
files; update the hashes here when it changes them.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEFAULT_TRACE = "qwen3-30b-a3b-bigmoeonedge"

BUNDLED_SHA256: dict[str, str] = {
    "gemma-4-26b-a4b-bigmoeonedge": "8c4e832208dcdc62f3135384f87a24210a95078194568c92e09ba142f2b2a882",
    "gpt-oss-120b-bigmoeonedge": "30fee25a9cc1edcd98f3e5e0cd5ecc8d02a9816bc0b63b9c4c29701d56793a5a",
    "qwen3-30b-a3b-bigmoeonedge": "410ffa4e8364ec1a09fa4d7521f918fe6b18f5e8aa053d45776ace65e077443a",
}


def bundled_traces() -> dict[str, Path]:
    """The bundled trace files by name: exactly the names of :data:`BUNDLED_SHA256`, whatever else is here."""
    root = resources.files("moesim.traces")
    return {name: Path(str(root / f"{name}.parquet")) for name in sorted(BUNDLED_SHA256)}


def verified_bundled_trace(name: str) -> Path:
    """The path of bundled trace ``name`` after checking its bytes are the shipped ones."""
    from moesim.content import file_sha256
    from moesim.errors import MoesimError

    path = bundled_traces()[name]
    if not path.is_file():
        raise MoesimError(f"bundled trace '{name}': {path} is missing; reinstall moesim")
    if file_sha256(path) != BUNDLED_SHA256[name]:
        raise MoesimError(f"bundled trace '{name}': {path} differs from the shipped file (SHA-256 mismatch); "
                          f"reinstall moesim or restore it with git")
    return path


def resolve_trace(name_or_path: str | None) -> Path:
    """A bundled trace name, or a path; ``None`` gives the default bundled trace."""
    from moesim.errors import MoesimError

    key = name_or_path or DEFAULT_TRACE
    if key in BUNDLED_SHA256:
        return verified_bundled_trace(key)
    path = Path(key)
    if path.is_file():
        from moesim.atomic import note_input

        note_input(path)  # named as an input: no output of this command may replace it
        return path
    if path.exists():
        raise MoesimError(f"trace '{key}': is a folder, expected a trace file or a bundled name")
    raise MoesimError(f"trace '{key}': not a file and not a bundled trace ({', '.join(sorted(BUNDLED_SHA256))})")
