"""Property-based tests (hypothesis): importers, the trace reader, the profile reader, the flag parsers and
the cache policies hold their rules on generated inputs, not only on the examples elsewhere (#15)."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import random_cells, tiny_meta
from moesim.errors import MoesimError
from moesim.options import batch_list, byte_size, int_list, split_list
from moesim.simulator.cache import CacheCapacity, CacheGeometry, FutureIndex, make_cache
from moesim.tracer import read_trace, write_trace
from moesim.units import parse_bytes

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                             HealthCheck.function_scoped_fixture])


# ---- cache policies ------------------------------------------------------------------------------
def _hits(rule: str, seq: list[int], capacity: int) -> int:
    cache = make_cache(rule, CacheGeometry(1, 16, (1,)), CacheCapacity("layer", "experts", (capacity,)))
    if rule == "belady":
        uses: dict[int, list[int]] = {}
        for clock, e in enumerate(seq):
            uses.setdefault(e, []).append(clock)
        cache.attach_future(FutureIndex(uses))
    return sum(bool(cache.access(0, [e], clock).hits) for clock, e in enumerate(seq))


sequences = st.lists(st.integers(0, 15), min_size=1, max_size=120)


@SETTINGS
@given(seq=sequences, capacity=st.integers(1, 12))
def test_belady_is_never_worse_than_any_rule(seq, capacity):
    best = _hits("belady", seq, capacity)
    for rule in ("lru", "lfu", "fifo", "mrs"):
        assert best >= _hits(rule, seq, capacity), rule


@SETTINGS
@given(seq=sequences, capacity=st.integers(1, 15))
def test_lru_misses_never_grow_with_capacity(seq, capacity):
    # LRU is a stack algorithm: a larger cache holds a superset, so it never misses more
    assert _hits("lru", seq, capacity + 1) >= _hits("lru", seq, capacity)


@SETTINGS
@given(seq=sequences, capacity=st.integers(1, 15))
def test_belady_misses_never_grow_with_capacity(seq, capacity):
    assert _hits("belady", seq, capacity + 1) >= _hits("belady", seq, capacity)


# ---- flag parsers --------------------------------------------------------------------------------
@SETTINGS
@given(values=st.lists(st.integers(0, 10_000), min_size=1, max_size=8))
def test_int_lists_round_trip(values):
    assert int_list(",".join(map(str, values)), "--x") == values


@SETTINGS
@given(lo=st.integers(0, 50), span=st.integers(0, 50))
def test_ranges_expand_inclusively(lo, span):
    assert int_list(f"{lo}..{lo + span}", "--x") == list(range(lo, lo + span + 1))


@SETTINGS
@given(text=st.text(max_size=30))
def test_parsers_either_parse_or_raise_a_one_line_error_naming_the_flag(text):
    for parse in (lambda t: int_list(t, "--cache-experts"), lambda t: batch_list(t),
                  lambda t: byte_size(t, "--gpu-mem"), lambda t: split_list(t, "--policy")):
        try:
            parse(text)
        except MoesimError as exc:
            assert "\n" not in exc.message and exc.message.startswith("--")


@SETTINGS
@given(n=st.integers(1, 2**40), unit=st.sampled_from(["", "B", "KiB", "MiB", "GiB", "KB", "MB", "GB"]))
def test_byte_sizes_scale_by_their_unit(n, unit):
    factor = {"": 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9}[unit]
    assert parse_bytes(f"{n}{unit}") == n * factor


# ---- the trace reader ----------------------------------------------------------------------------
@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), requests=st.integers(1, 3), prompt=st.integers(1, 4),
       decode=st.integers(0, 4))
def test_traces_round_trip_through_the_file(seed, requests, prompt, decode):
    cells = random_cells(np.random.default_rng(seed), requests=requests, prompt=prompt, decode=decode)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.parquet"
        write_trace(path, tiny_meta(), cells)
        back = read_trace(path)
    order = cells.execution_order()
    for col in ("request", "phase", "position", "layer", "experts", "weights"):
        np.testing.assert_array_equal(getattr(back.cells, col), getattr(cells.take(order), col))


@SETTINGS
@given(data=st.binary(max_size=400), cut=st.integers(0, 10_000))
def test_damaged_trace_files_give_a_one_line_error(data, cut):
    cells = random_cells(np.random.default_rng(1))
    with tempfile.TemporaryDirectory() as d:
        good = Path(d) / "good.parquet"
        write_trace(good, tiny_meta(), cells)
        raw = good.read_bytes()
        bad = Path(d) / "bad.parquet"
        # a cut-short file with garbage appended, or garbage alone
        bad.write_bytes(raw[: cut % len(raw)] + data)
        assume(bad.read_bytes() != raw)
        with pytest.raises(MoesimError) as err:
            read_trace(bad)
        assert "\n" not in err.value.message and str(bad) in err.value.message


# ---- the profile reader --------------------------------------------------------------------------
def _bundled_profile() -> dict:
    from moesim.calib.profile import bundled_profiles

    return json.loads(bundled_profiles()["rtx-3060"].read_text())


def _paths(d, prefix=()):
    for k, v in d.items():
        yield prefix + (k,)
        if isinstance(v, dict):
            yield from _paths(v, prefix + (k,))


PROFILE = _bundled_profile()
PROFILE_PATHS = sorted(_paths(PROFILE))
json_values = st.one_of(st.none(), st.booleans(), st.integers(-10, 10), st.floats(allow_nan=True),
                        st.text(max_size=5), st.lists(st.integers(), max_size=2), st.just({}))


@SETTINGS
@given(path=st.sampled_from(PROFILE_PATHS), value=json_values, delete=st.booleans())
def test_a_damaged_profile_loads_or_gives_a_one_line_error(path, value, delete):
    from moesim.calib.profile import load_profile

    d = json.loads(json.dumps(PROFILE))
    parent = d
    for k in path[:-1]:
        parent = parent[k]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "p.json"
        f.write_text(json.dumps(d))
        try:
            p = load_profile(str(f))
        except MoesimError as exc:
            assert "\n" not in exc.message
            return
    # what loads must be usable: the numbers the simulator reads are finite and positive
    assert p.device.memory_bytes > 0
    h2d = p.copy_models.get("h2d/pinned/alone")
    if h2d is not None:
        assert math.isfinite(p.copy_time(2**20)) and p.copy_time(2**20) > 0


# ---- the vllm importer ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixtral_config(tmp_path_factory):
    from test_importers import TINY_MIXTRAL

    path = tmp_path_factory.mktemp("cfg") / "tiny-mixtral.json"
    path.write_text(json.dumps(TINY_MIXTRAL))
    return str(path)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), drops=st.integers(0, 3), data=st.data())
def test_any_line_order_of_a_dump_gives_the_same_trace(mixtral_config, seed, drops, data):
    from test_importers import L, cells_by_key, decode_only_dump, write_jsonl

    from moesim.tracer.importers import ImportOptions, import_trace

    rng = np.random.default_rng(seed)
    steps = 6
    dropped = {(int(rng.integers(2)), int(rng.integers(1, steps)), int(rng.integers(L))) for _ in range(drops)}
    records, _ = decode_only_dump(rng, [0, 1], steps, dropped=dropped)
    order_a = data.draw(st.permutations(range(len(records))))
    order_b = data.draw(st.permutations(range(len(records))))
    results = []
    with tempfile.TemporaryDirectory() as d:
        for name, order in (("a", order_a), ("b", order_b), ("sorted", sorted(range(len(records)), key=lambda i: (
                records[i]["problem_id"], records[i]["layer"], records[i]["token_idx"])))):
            res = import_trace("vllm-jsonl", write_jsonl(Path(d) / f"{name}.jsonl", [records[i] for i in order]),
                               ImportOptions(model_config=mixtral_config))
            problems = [r["problem_id"] for r in res.meta.source.details["requests"]]
            results.append({(problems[k[0]],) + k[1:]: v for k, v in cells_by_key(res.cells).items()})
    assert results[0] == results[1] == results[2]
