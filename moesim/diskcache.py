"""An on-disk cache for results that are costly and deterministic (the ``predictive`` predictor's fit, the
cost model's per-(trace, profile) tables, compiled workloads).

An entry's name is the SHA-256 of what the result depends on: the *contents* of the input files (never their
names or times), the parameters, and a hash of the sources of the code that computes it, so an edited trace,
profile or module misses the cache instead of returning a stale result. Entries live under
``$MOESIM_CACHE_DIR`` (else ``~/.cache/moesim``); the cost model's simulated runs live in its ``costmodel/``.

Every entry is written to a private temp file and renamed into place, so readers never see a partial file and
concurrent writers of one entry simply replace each other's identical bytes. An entry carries the SHA-256 of
its payload; one that is truncated, corrupt or unreadable is ignored and recomputed. The cache only ever
speeds things up: a cache folder that cannot be written is skipped silently and the result still returned.

``$MOESIM_CACHE_MAX_BYTES`` (e.g. ``2GiB``) bounds the entries' total size: after a write, the least recently
used entries (a hit refreshes an entry's time) are deleted until the rest fit; an entry larger than the
bound is not kept. Unset, the cache grows without bound.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import pickle
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

MAGIC = b"moesim-cache-1\n"
_MISS = object()
MAX_BYTES_VARIABLE = "MOESIM_CACHE_MAX_BYTES"


def cache_dir() -> Path:
    env = os.environ.get("MOESIM_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "moesim"


def max_bytes() -> int | None:
    """The bound on the entries' total size from ``$MOESIM_CACHE_MAX_BYTES``, or None when unset."""
    text = os.environ.get(MAX_BYTES_VARIABLE, "").strip()
    if not text:
        return None
    from moesim.units import parse_bytes

    return parse_bytes(text, f"${MAX_BYTES_VARIABLE}")


@lru_cache(maxsize=None)
def code_version(*modules: str) -> str:
    """SHA-256 of the named modules' source files (a package counts as all its ``.py`` files)."""
    h = hashlib.sha256()
    for name in modules:
        mod = importlib.import_module(name)
        path = Path(mod.__file__)
        files = sorted(path.parent.glob("*.py")) if path.name == "__init__.py" else [path]
        for f in files:
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def entry_key(parts: Iterable[Any]) -> str:
    """SHA-256 of ``parts`` (strings, numbers, tuples of them): the caller passes content hashes, not paths."""
    return hashlib.sha256(repr(tuple(parts)).encode()).hexdigest()


def entry_path(namespace: str, key: str) -> Path:
    return cache_dir() / namespace / key[:2] / f"{key}.pkl"


def load(namespace: str, key: str) -> Any:
    """The stored value, or ``_MISS`` when absent, corrupt or unreadable."""
    path = entry_path(namespace, key)
    try:
        data = path.read_bytes()
    except OSError:
        return _MISS
    head = len(MAGIC) + 32
    if len(data) < head or not data.startswith(MAGIC):
        return _MISS
    payload = memoryview(data)[head:]  # a view: a large entry (a compiled workload) is not copied
    if hashlib.sha256(payload).digest() != data[len(MAGIC):head]:
        return _MISS  # cut short or altered: recompute
    try:
        value = pickle.loads(payload)
    except Exception:  # an entry pickled by an incompatible library version
        return _MISS
    try:
        os.utime(path)  # recently used: the last to go when the cache is over its bound
    except OSError:
        pass
    return value


def store(namespace: str, key: str, value: Any) -> bool:
    """Write an entry atomically; False (and nothing left behind) when the cache folder is not writable.
    With ``$MOESIM_CACHE_MAX_BYTES`` set, least recently used entries are then deleted to fit the bound."""
    limit = max_bytes()
    path = entry_path(namespace, key)
    payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key[:16]}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + hashlib.sha256(payload).digest())
            f.write(payload)  # written after the header, not joined to it: one copy of a large entry, not two
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        return False
    if limit is not None:
        return shrink_to(limit, keep=path)
    return True


def entries() -> list[tuple[float, int, Path]]:
    """(last use, size, path) of every entry under the cache folder (entries only: the cost model's own
    store in ``costmodel/`` and other files are not this module's to delete)."""
    out = []
    for path in cache_dir().glob("*/??/*.pkl"):
        if len(path.stem) != 64 or path.parent.name != path.stem[:2]:
            continue
        try:
            st = path.stat()
        except OSError:  # deleted by a concurrent writer's shrink
            continue
        out.append((st.st_mtime, st.st_size, path))
    return out


def shrink_to(limit: int, keep: Path | None = None) -> bool:
    """Delete least recently used entries until their total is at most ``limit`` bytes; ``keep`` (the entry
    just written) goes last, and goes too if it alone is over the bound. True when ``keep`` is still there."""
    found = entries()
    total = sum(size for _, size, _ in found)
    found.sort(key=lambda e: (e[2] == keep, e[0], str(e[2])))
    kept = True
    for _, size, path in found:
        if total <= limit:
            break
        try:
            path.unlink()
        except OSError:
            continue
        total -= size
        kept = kept and path != keep
    return kept


def cached(namespace: str, parts: Iterable[Any], compute: Callable[[], Any]) -> Any:
    """``compute()``, or its stored result for the same ``parts``."""
    max_bytes()  # a bad bound is an error before the work, not after it
    key = entry_key(parts)
    value = load(namespace, key)
    if value is _MISS:
        value = compute()
        store(namespace, key, value)
    return value
