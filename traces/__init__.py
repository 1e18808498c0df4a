"""Bundled real routing traces (see PROVENANCE.md beside this file)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEFAULT_TRACE = "qwen3-30b-a3b-bigmoeonedge"


def bundled_traces() -> dict[str, Path]:
    """Bundled trace files by name (file stem)."""
    root = resources.files("moesim.traces")
    return {p.name[: -len(".parquet")]: Path(str(p)) for p in root.iterdir() if p.name.endswith(".parquet")}


def resolve_trace(name_or_path: str | None) -> Path:
    """A bundled trace name, or a path; ``None`` gives the default bundled trace."""
    from moesim.errors import MoesimError

    bundled = bundled_traces()
    key = name_or_path or DEFAULT_TRACE
    if key in bundled:
        return bundled[key]
    path = Path(key)
    if path.exists():
        return path
    raise MoesimError(f"trace '{key}': not a file and not a bundled trace ({', '.join(sorted(bundled)) or 'none bundled'})")
