"""The on-disk cache: content-keyed, atomic, corrupt entries recomputed; used by the predictor fit, the
compiled workloads and the cost model's per-(trace, profile) tables."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from moesim import diskcache
from moesim.tracer import write_trace
from tests.conftest import random_cells, tiny_meta, tiny_shape


@pytest.fixture(autouse=True)
def _fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESIM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _trace(path, seed):
    shape = tiny_shape(4, 8, 2)
    write_trace(path, tiny_meta(shape), random_cells(np.random.default_rng(seed), requests=3, prompt=5, decode=8,
                                                     layers=4, experts=8, k=2))
    return path


def _entries(root, namespace):
    return sorted((root / namespace).glob("*/*.pkl"))


def test_a_hit_returns_the_stored_value_and_a_new_key_misses(_fresh_cache):
    calls = []
    make = lambda: calls.append(1) or {"x": np.arange(3)}  # noqa: E731
    a = diskcache.cached("t", ("a", 1), make)
    b = diskcache.cached("t", ("a", 1), make)
    assert len(calls) == 1 and np.array_equal(a["x"], b["x"])
    diskcache.cached("t", ("a", 2), make)
    assert len(calls) == 2 and len(_entries(_fresh_cache, "t")) == 2


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_a_corrupt_entry_is_ignored_and_rewritten(_fresh_cache, damage):
    diskcache.cached("t", ("k",), lambda: list(range(100)))
    (path,) = _entries(_fresh_cache, "t")
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[:-7])
    elif damage == "flip":
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    else:
        path.write_bytes(b"")
    assert diskcache.cached("t", ("k",), lambda: "recomputed") == "recomputed"
    assert diskcache.cached("t", ("k",), lambda: "again") == "recomputed"  # the rewritten entry is good


def test_an_unwritable_cache_still_returns_the_result(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MOESIM_CACHE_DIR", str(blocker / "cache"))
    assert diskcache.cached("t", ("k",), lambda: 42) == 42
    assert not list(tmp_path.glob("**/*.tmp"))


def test_predictor_fit_is_keyed_by_content_not_path(tmp_path, monkeypatch):
    from moesim.simulator import predictor

    a = _trace(tmp_path / "a.parquet", 1)
    fits = []
    real = predictor._fit
    monkeypatch.setattr(predictor, "_fit", lambda key: fits.append(key) or real(key))
    monkeypatch.setattr(predictor, "_FITTED", {})
    first = predictor.fit_predictor([a])
    # the same bytes under another path: a hit, identical weights
    same = tmp_path / "copy.parquet"
    shutil.copyfile(a, same)
    monkeypatch.setattr(predictor, "_FITTED", {})
    hit = predictor.fit_predictor([same])
    assert len(fits) == 1
    assert (hit.coef, hit.intercept, hit.samples) == (first.coef, first.intercept, first.samples)
    # other bytes at the first path: a miss, recomputed
    _trace(a, 2)
    monkeypatch.setattr(predictor, "_FITTED", {})
    other = predictor.fit_predictor([a])
    assert len(fits) == 2 and other.coef != first.coef


def test_cost_model_tables_hit_gives_identical_predictions_and_a_changed_trace_misses(tmp_path, monkeypatch):
    from moesim.costmodel import context
    from moesim.costmodel.context import TraceProfileContext
    from moesim.costmodel.model import CostModel
    from moesim.costmodel.search import build_space, default_space

    monkeypatch.setattr(context, "_STATES", {})
    path = str(_trace(tmp_path / "t.parquet", 3))
    cold = TraceProfileContext(path, "rtx-3060")
    assert cold._size() == 0
    configs = build_space(default_space(cold), cold.E)
    ev_cold = cold.evaluate(configs)
    model = CostModel.load()
    pred_cold = model.predict(cold, configs)
    monkeypatch.setattr(context, "_STATES", {})  # as a new process: from disk only
    warm = TraceProfileContext(path, "rtx-3060")
    assert warm._size() == cold._size() > 0  # loaded, nothing rebuilt
    ev_warm = warm.evaluate(configs)
    for name in ("valid", "ttft_s", "tpot_s", "makespan_s", "peak_gpu_bytes", "hit_rate", "features"):
        np.testing.assert_array_equal(getattr(ev_cold, name), getattr(ev_warm, name))
    assert ev_cold.reason == ev_warm.reason
    monkeypatch.setattr(CostModel, "_predict", lambda *a: pytest.fail("predictions not served from disk"))
    pred_warm = model.predict(warm, configs)
    for name in ("tpot_s", "ttft_s", "tokens_per_s", "peak_gpu_bytes"):
        np.testing.assert_array_equal(getattr(pred_cold, name), getattr(pred_warm, name))
    _trace(tmp_path / "t.parquet", 4)  # the same path, other routing
    changed = TraceProfileContext(path, "rtx-3060")
    assert changed._size() == 0


def test_a_size_bound_deletes_the_least_recently_used_entries_first(_fresh_cache, monkeypatch):
    import os

    payload = lambda tag: lambda: (tag, bytes(3000))  # noqa: E731  (each entry is a little over 3000 bytes)
    for i, tag in enumerate("abc"):
        diskcache.cached("t", (tag,), payload(tag))
        path = diskcache.entry_path("t", diskcache.entry_key((tag,)))
        os.utime(path, (1000.0 + i, 1000.0 + i))  # a, then b, then c: distinct ages on any file system
    assert diskcache.cached("t", ("a",), payload("recomputed"))[0] == "a"  # a hit: a is now the newest
    monkeypatch.setenv("MOESIM_CACHE_MAX_BYTES", "7KiB")
    diskcache.cached("t", ("d",), payload("d"))  # 4 entries of ~3 KiB over 7 KiB: b, then c (the oldest) go
    left = {diskcache.load("t", diskcache.entry_key((tag,)))[0] for tag in "abcd"
            if diskcache.load("t", diskcache.entry_key((tag,))) is not diskcache._MISS}
    assert left == {"a", "d"}
    assert sum(size for _, size, _ in diskcache.entries()) <= 7 * 1024


def test_an_entry_over_the_bound_is_returned_but_not_kept(_fresh_cache, monkeypatch):
    monkeypatch.setenv("MOESIM_CACHE_MAX_BYTES", "1000")
    assert diskcache.cached("t", ("big",), lambda: bytes(5000)) == bytes(5000)
    assert diskcache.entries() == []


def test_a_bad_size_bound_is_a_one_line_error_naming_the_variable(_fresh_cache, monkeypatch):
    from moesim.errors import MoesimError

    monkeypatch.setenv("MOESIM_CACHE_MAX_BYTES", "lots")
    with pytest.raises(MoesimError, match=r"\$MOESIM_CACHE_MAX_BYTES 'lots'"):
        diskcache.cached("t", ("k",), lambda: 1)
