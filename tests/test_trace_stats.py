"""`moesim trace stats`: the one-pass LRU curves against a direct LRU replay at every capacity, the routing
statistics against the numbers the bundled traces' source reports, and the command's output and errors."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import random_cells, tiny_meta, tiny_shape
from moesim.cli import cli
from moesim.errors import MoesimError
from moesim.tracer import DECODE, PREFILL, Trace, read_trace, write_trace
from moesim.tracer.stats import (
    byte_budget_lru_hits,
    format_text,
    lru_hit_curve,
    stack_distances,
    to_json_dict,
    trace_stats,
)
from moesim.traces import resolve_trace

MiB = 2**20


def run_cli(*args: str):
    return CliRunner().invoke(cli, ["trace", "stats", *args], catch_exceptions=False)


# ------------------------------------------------------------------------------------------------
# Direct LRU replays (the definition the one-pass algorithm must reproduce)
# ------------------------------------------------------------------------------------------------
def replay_cells(cells, capacity=None, budget=None, size=None):
    """Per cell: look every key up against the cache as it was before the cell, then promote or insert the keys
    in order, then evict from the LRU end until at most ``capacity`` entries (or ``budget`` bytes) remain."""
    cache: OrderedDict = OrderedDict()
    used = 0
    out = []
    for cell in cells:
        out.append([key in cache for key in cell])
        for key in cell:
            if key in cache:
                cache.move_to_end(key)
            else:
                cache[key] = size[key] if size else 1
                used += cache[key]
        limit = capacity if capacity is not None else budget
        while used > limit:
            used -= cache.popitem(last=False)[1]
    return out


def replay_trace(trace: Trace, capacity: int, scope: str) -> np.ndarray:
    """Hit of every routed expert: one LRU of ``capacity`` experts per layer, or one shared by all layers."""
    hits = np.zeros(trace.experts.shape, dtype=bool)
    rows_of = {}
    for i, layer in enumerate(trace.layer.tolist()):
        rows_of.setdefault(layer if scope == "layer" else "all", []).append(i)
    for rows in rows_of.values():
        cells = [[(int(trace.layer[i]), e) for e in trace.experts[i].tolist()] for i in rows]
        hits[rows] = replay_cells(cells, capacity=capacity)
    return hits


def skewed_trace(rng, requests=3, prompt=5, decode=8, layers=3, experts=8, k=2, skew=1.1) -> Trace:
    cells = random_cells(rng, requests=requests, prompt=prompt, decode=decode, layers=layers, experts=experts, k=k)
    p = 1.0 / np.arange(1, experts + 1) ** skew
    cells.experts = np.stack([rng.choice(experts, size=k, replace=False, p=p / p.sum())
                              for _ in range(len(cells))]).astype(np.int16)
    cells = cells.take(cells.execution_order())
    return Trace(meta=tiny_meta(tiny_shape(layers, experts, k)), cells=cells)


@pytest.fixture(scope="module")
def bundled():
    return {name: read_trace(resolve_trace(name)) for name in
            ("qwen3-30b-a3b-bigmoeonedge", "gemma-4-26b-a4b-bigmoeonedge", "gpt-oss-120b-bigmoeonedge")}


# ------------------------------------------------------------------------------------------------
# Exactness
# ------------------------------------------------------------------------------------------------
def test_stack_distances_equal_replay_at_every_capacity_and_budget(rng):
    """Random cells, repeated keys inside a cell and k > capacity included."""
    for _ in range(150):
        n_cells, k, n_keys = int(rng.integers(1, 30)), int(rng.integers(1, 5)), int(rng.integers(1, 10))
        cells = [rng.integers(0, n_keys, size=k).tolist() for _ in range(n_cells)]
        keys = np.array([x for c in cells for x in c])
        starts = np.repeat(np.arange(n_cells) * k, k)
        d = stack_distances(keys, starts)
        for capacity in range(n_keys + 2):
            hits = np.array(replay_cells(cells, capacity=capacity)).reshape(-1)
            assert np.array_equal(hits, (d >= 0) & (d < capacity)), (cells, capacity)
        size = {x: int(rng.integers(1, 6)) for x in range(n_keys)}
        w = np.array([size[x] for x in keys])
        db = stack_distances(keys, starts, weights=w)
        for budget in range(0, 25):
            hits = np.array(replay_cells(cells, budget=budget, size=size)).reshape(-1)
            assert np.array_equal(hits, (db >= 0) & (db + w <= budget)), (cells, size, budget)


def test_lookup_all_k_first_differs_from_one_at_a_time():
    # cache of 2 holding {a, b} (b most recent); cell (c, a): looked up together, a hits; inserting c first
    # would evict a before it is looked up
    cells = [["a"], ["b"], ["c", "a"]]
    d = stack_distances(np.array([0, 1, 2, 0]), np.array([0, 1, 2, 2]))
    assert replay_cells(cells, capacity=2)[2] == [False, True] and d[3] == 1
    one_at_a_time = replay_cells([["a"], ["b"], ["c"], ["a"]], capacity=2)
    assert one_at_a_time[3] == [False]


@pytest.mark.parametrize("phase", ["decode", "prefill", "all"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_lru_hit_curve_equals_replay_on_random_traces(rng, phase, k):
    trace = skewed_trace(rng, k=k, experts=9)
    counted = {"decode": trace.phase == DECODE, "prefill": trace.phase == PREFILL,
               "all": np.ones(len(trace), bool)}[phase]
    for scope, max_c in (("layer", 9), ("global", 27)):
        curve = lru_hit_curve(trace, scope, phase)
        assert curve.accesses == counted.sum() * k and curve.max_capacity == max_c
        for c in range(max_c + 1):
            hits = replay_trace(trace, c, scope)
            assert curve.hits[c] == hits[counted].sum(), (scope, c)
            per_layer = [hits[counted & (trace.layer == layer)].sum() for layer in range(3)]
            assert curve.layer_hits[:, c].tolist() == per_layer
        assert curve.hits[max_c] == curve.accesses - curve.cold_misses


def test_lru_hit_curve_equals_replay_on_real_traces(bundled):
    gpt = bundled["gpt-oss-120b-bigmoeonedge"]
    curve = lru_hit_curve(gpt, "layer", "decode")
    dec = gpt.phase == DECODE
    for c in range(gpt.meta.num_experts + 1):  # one cache per layer, every capacity
        assert curve.hits[c] == replay_trace(gpt, c, "layer")[dec].sum(), c
    # one cache across layers, every capacity up to beyond the keys there are, on the first 6 layers
    six = gpt.select(gpt.layer < 6)
    curve = lru_hit_curve(six, "global", "all")
    keys = len({(int(layer), e) for layer, row in zip(six.layer, six.experts.tolist()) for e in row})
    for c in range(keys + 2):
        assert curve.hits[c] == replay_trace(six, c, "global").sum(), c
    assert curve.hits[keys + 1] == curve.accesses - curve.cold_misses
    # the whole Qwen3 trace, global, at capacities around k x layers and the engine's budget
    qwen = bundled["qwen3-30b-a3b-bigmoeonedge"]
    curve = lru_hit_curve(qwen, "global", "decode")
    dec = qwen.phase == DECODE
    for c in (1, 47, 287, 288, 289, 500, 1468, 3000):
        assert curve.hits[c] == replay_trace(qwen, c, "global")[dec].sum(), c


def test_byte_budget_lru_equals_replay_and_the_recorded_engine(bundled):
    for name, trace in bundled.items():
        eng = trace.meta.recorded_engine
        cells = [[(int(layer), e) for e in row] for layer, row in zip(trace.layer.tolist(), trace.experts.tolist())]
        size = {(layer, e): trace.meta.expert_bytes[layer] for layer in range(trace.meta.num_layers)
                for e in range(trace.meta.num_experts)}
        for budget in (eng.cache_budget_bytes // 7, eng.cache_budget_bytes):
            direct = np.array(replay_cells(cells, budget=budget, size=size))
            assert np.array_equal(byte_budget_lru_hits(trace, budget), direct), (name, budget)
        st = trace_stats(trace, "decode")
        assert st.recorded_engine.agreement == 1.0
        assert st.recorded_engine.replay_hit_rate == st.recorded_engine.recorded_hit_rate


# ------------------------------------------------------------------------------------------------
# Routing statistics
# ------------------------------------------------------------------------------------------------
def test_statistics_match_the_source_findings(bundled):
    """Helldez/BigMoeOnEdge findings.md (via traces-raw PROVENANCE.md), decode phase."""
    st = {name.split("-bigmoe")[0]: trace_stats(t, "decode") for name, t in bundled.items()}
    # "previous token's k" predictor: qwen 38.0%, gemma 35.7%, gptoss 17.9%
    assert [round(st[m].reuse_prev * 100, 1) for m in ("qwen3-30b-a3b", "gemma-4-26b-a4b", "gpt-oss-120b")] == \
        [38.0, 35.7, 17.9]
    qwen = st["qwen3-30b-a3b"]
    used = [ls.distinct for ls in qwen.layers]
    assert (round(np.mean(used)), min(used), max(used)) == (64, 33, 107)  # "qwen 64 (min 33, max 107)"
    top8 = [np.sort(ls.counts)[::-1][:8].sum() / ls.accesses for ls in qwen.layers]
    assert (round(top8[0] * 100, 1), round(top8[5] * 100, 1), round(np.mean(top8) * 100, 1)) == (21.5, 43.2, 44.5)
    assert [round(s.recorded_engine.recorded_hit_rate * 100, 1) for s in st.values()] == [80.3, 81.9, 44.8]
    assert all(abs(ls.entropy - 1) < 1 and 0 < ls.hot_k_share < 1 for ls in qwen.layers)


def test_reuse_and_next_layer_guess_on_a_known_trace(tmp_path, rng):
    cells = random_cells(rng, requests=1, prompt=2, decode=4, layers=2, experts=8, k=2)
    cells = cells.take(cells.execution_order())
    dec = np.flatnonzero(cells.phase == DECODE)
    # layer 0 decode: {0,1}, {1,2}, {1,2}, {5,6}: t-1 overlaps 1, 2, 0 of 2 each
    layer0 = dec[cells.layer[dec] == 0]
    cells.experts[layer0] = [[0, 1], [2, 1], [1, 2], [5, 6]]
    guess = np.full(cells.experts.shape, -1, dtype=np.int16)
    layer1 = {int(cells.position[i]): i for i in np.flatnonzero(cells.layer == 1)}
    for i in np.flatnonzero(cells.layer == 0):
        guess[i] = cells.experts[layer1[int(cells.position[i])]]
        if cells.phase[i] == DECODE and cells.position[i] == 3:
            guess[i, 1] = (guess[i, 0] + 1) % 8 if (guess[i, 0] + 1) % 8 not in guess[i] else (guess[i, 0] + 2) % 8
    cells.next_layer_guess = guess
    trace = read_trace(write_trace(tmp_path / "t.parquet", tiny_meta(tiny_shape(2, 8, 2)), cells))
    st = trace_stats(trace, "decode")
    assert st.layers[0].reuse_prev == pytest.approx(3 / 6)
    assert st.layers[0].next_layer_guess == pytest.approx(7 / 8) and st.layers[1].next_layer_guess is None
    assert st.next_layer_guess == pytest.approx(7 / 8)
    assert st.recorded_engine is None and st.layers[0].recorded_hit is None
    assert "next-layer guess accuracy         87.5%" in format_text(st)


# ------------------------------------------------------------------------------------------------
# Command
# ------------------------------------------------------------------------------------------------
def test_readme_command_reads_well():
    r = run_cli("qwen3-30b-a3b-bigmoeonedge")
    assert r.exit_code == 0, r.output
    out = r.output
    for fragment in ("qwen3-30b-a3b, 48 MoE layers x 128 experts, top-6", "used at position t-1 too          38.0%",
                     "recorded engine hit rate          80.3%", "agreeing with the record on 100.00%",
                     "LRU hit rate vs cache size", "Per layer (decode)"):
        assert fragment in out, fragment
    assert run_cli().output == out  # the default trace


def test_json_is_deterministic_and_complete(tmp_path):
    a = run_cli("gpt-oss-120b-bigmoeonedge", "--json", "-")
    b = run_cli("gpt-oss-120b-bigmoeonedge", "--json", "-")
    assert a.exit_code == 0 and a.output == b.output
    d = json.loads(a.output)
    assert list(d)[:3] == ["trace", "source", "model"]
    assert len(d["layers"]) == 36 and len(d["lru"]["per_layer"]["hits"]) == 129
    assert len(d["lru"]["global"]["hits"]) == 36 * 128 + 1
    assert d["recorded_engine"]["agreement"] == 1.0
    assert d == json.loads(json.dumps(to_json_dict(trace_stats(read_trace(resolve_trace("gpt-oss-120b-bigmoeonedge")),
                                                                "decode", name="gpt-oss-120b-bigmoeonedge"))))


def test_plot_is_written_atomically(tmp_path):
    out = tmp_path / "sub" / "curve.png"
    r = run_cli("gpt-oss-120b-bigmoeonedge", "--phase", "all", "--plot", str(out))
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["curve.png"]


def test_bad_inputs_are_one_line_exit_2(tmp_path):
    def one_line(result, fragment):
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("moesim: error:") and fragment in lines[0], result.output

    one_line(run_cli("no-such-trace"), "no-such-trace")
    one_line(run_cli("gpt-oss-120b-bigmoeonedge", "--phase", "both"), "--phase")
    one_line(run_cli("gpt-oss-120b-bigmoeonedge", "--plot", str(tmp_path / "x.txt")), "--plot")
    junk = tmp_path / "junk.parquet"
    junk.write_text("not a trace")
    one_line(run_cli(str(junk)), "junk.parquet")
    rng = np.random.default_rng(0)
    cells = random_cells(rng, requests=1, prompt=0, decode=3)
    decode_only = write_trace(tmp_path / "d.parquet", tiny_meta(), cells)
    one_line(run_cli(str(decode_only), "--phase", "prefill"), "no prefill rows")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.parquet", "junk.parquet"]
    with pytest.raises(MoesimError):
        lru_hit_curve(read_trace(decode_only), "cluster")
