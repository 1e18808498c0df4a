"""Content identities: what a stored result depends on, as hashes of bytes rather than names or paths.

A result keyed by a file's *name* comes back stale after the file is rewritten in place (a recalibrated
profile, a re-recorded trace); keyed by the file's *content*, it is recomputed. The simulator's identity is
the hash of its sources, so a changed simulator recomputes too.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from functools import lru_cache
from pathlib import Path

from moesim.errors import MoesimError

_BY_STAT: dict[tuple, str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (memoised per path, size and modification time, so a rewrite is seen)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise MoesimError(f"{p}: cannot read ({exc.strerror or exc})") from None
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    digest = _BY_STAT.get(key)
    if digest is None:
        h = hashlib.sha256()
        try:
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except OSError as exc:
            raise MoesimError(f"{p}: cannot read ({exc.strerror or exc})") from None
        digest = h.hexdigest()
        _BY_STAT[key] = digest
    return digest


def _package_dir(module: str) -> Path:
    return Path(importlib.import_module(module).__file__).resolve().parent


NOT_SIMULATOR = ("cli.py", "sweep.py", "sweep_ray.py")


@lru_cache(maxsize=1)
def simulator_version() -> str:
    """moesim's version plus the simulator's sources and the weight-format arithmetic (``moesim/quant.py``).

    The simulator's command-line module only parses flags and the sweep's modules only share the points out
    among processes (each row is a simulation's own); they produce no number, so they are left out, and a
    change to how a sweep is run does not make every stored row and the cost model stale.
    """
    from moesim import __version__

    h = hashlib.sha256(__version__.encode())
    files = sorted(f for f in _package_dir("moesim.simulator").glob("*.py") if f.name not in NOT_SIMULATOR)
    files += [_package_dir("moesim") / "quant.py"]
    for f in files:
        if f.exists():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()
