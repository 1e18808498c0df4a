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


def cache_dir() -> Path:
    env = os.environ.get("MOESIM_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "moesim"


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
    try:
        data = entry_path(namespace, key).read_bytes()
    except OSError:
        return _MISS
    head = len(MAGIC) + 32
    if len(data) < head or not data.startswith(MAGIC):
        return _MISS
    payload = data[head:]
    if hashlib.sha256(payload).digest() != data[len(MAGIC):head]:
        return _MISS  # cut short or altered: recompute
    try:
        return pickle.loads(payload)
    except Exception:  # an entry pickled by an incompatible library version
        return _MISS


def store(namespace: str, key: str, value: Any) -> bool:
    """Write an entry atomically; False (and nothing left behind) when the cache folder is not writable."""
    path = entry_path(namespace, key)
    payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key[:16]}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + hashlib.sha256(payload).digest() + payload)
        os.replace(tmp, path)
        return True
    except OSError:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        return False


def cached(namespace: str, parts: Iterable[Any], compute: Callable[[], Any]) -> Any:
    """``compute()``, or its stored result for the same ``parts``."""
    key = entry_key(parts)
    value = load(namespace, key)
    if value is _MISS:
        value = compute()
        store(namespace, key, value)
    return value
