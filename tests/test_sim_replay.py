"""The simulator against real traces: BigMoeOnEdge's recorded cache hits, LRU hit curves, Belady's bound."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.simulator.compose import build_policy
from moesim.simulator.config import SimConfig
from moesim.simulator.run import load_trace_cached, simulate
from moesim.tracer import DECODE
from moesim.tracer.stats import lru_hit_curve
from moesim.traces import bundled_traces
from test_sim_support import round_profile

BUNDLED = ("qwen3-30b-a3b-bigmoeonedge", "gemma-4-26b-a4b-bigmoeonedge", "gpt-oss-120b-bigmoeonedge")
PROFILE = round_profile()  # timings do not matter here; the cache decisions do


def bundled(name: str):
    paths = bundled_traces()
    if name not in paths:
        pytest.skip(f"bundled trace {name} not present")
    return load_trace_cached(paths[name])


@pytest.mark.parametrize("name", BUNDLED)
def test_global_lru_with_the_engines_byte_budget_reproduces_its_recorded_hits(name):
    trace = bundled(name)
    engine = trace.meta.recorded_engine
    assert engine is not None and engine.cache_policy == "global-lru-bytes"
    # the simulator's own LRU cache object, driven by the engine, sized by the engine's byte budget
    config = SimConfig(build_policy("lru", scope="global"), cache_bytes=engine.cache_budget_bytes,
                       gpu_mem_bytes=1 << 40)
    result, hits = simulate(trace, PROFILE, config, record_hits=True)
    decode = trace.phase == DECODE
    rows_agree = (hits[decode] == trace.recorded_hit[decode]).all(axis=1)
    assert rows_agree.mean() >= 0.999, f"{name}: {rows_agree.mean():.5f} of decode rows agree"
    recorded_rate = trace.recorded_hit[decode].mean()
    assert result.hit_rate == pytest.approx(recorded_rate, abs=1e-3)


@pytest.mark.parametrize("name", ["gemma-4-26b-a4b-bigmoeonedge", "gpt-oss-120b-bigmoeonedge"])
def test_per_layer_lru_hits_equal_the_one_pass_hit_curve_and_never_fall_with_capacity(name):
    trace = bundled(name)
    curve = lru_hit_curve(trace, scope="layer", phase="decode")
    E = trace.meta.num_experts
    misses = []
    for c in (1, 2, 4, 8, 16, 32, 64, E):
        r = simulate(trace, PROFILE, SimConfig(build_policy("lru"), cache_experts=c, gpu_mem_bytes=1 << 40))
        hits = round(r.hit_rate * curve.accesses)
        assert hits == curve.hits_at(c), f"capacity {c}"
        misses.append(curve.accesses - hits)
    assert all(a >= b for a, b in zip(misses, misses[1:])), misses
    assert misses[-1] == curve.cold_misses


def test_global_lru_hits_equal_the_one_pass_global_hit_curve():
    trace = bundled("gpt-oss-120b-bigmoeonedge")  # every layer's experts have the same size
    curve = lru_hit_curve(trace, scope="global", phase="decode")
    L = trace.meta.num_layers
    for per_layer in (1, 2, 3, 6, 12):
        r = simulate(trace, PROFILE, SimConfig(build_policy("lru", scope="global"), cache_experts=per_layer,
                                               gpu_mem_bytes=1 << 40))
        assert r.cache_slots == per_layer * L
        assert round(r.hit_rate * curve.accesses) == curve.hits_at(per_layer * L), per_layer


@pytest.mark.parametrize("name", ["gemma-4-26b-a4b-bigmoeonedge", "gpt-oss-120b-bigmoeonedge"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_belady_hits_at_least_as_often_as_every_other_eviction_rule(name, scope):
    trace = bundled(name)
    k = trace.meta.top_k
    for capacity in (k, 4 * k):
        rates = {}
        for eviction in ("belady", "lru", "lfu", "fifo", "static", "mrs"):
            policy = build_policy("lru", eviction=eviction, scope=scope)
            r = simulate(trace, PROFILE, SimConfig(policy, cache_experts=capacity, gpu_mem_bytes=1 << 40))
            rates[eviction] = r.hit_rate
        for eviction, rate in rates.items():
            assert rates["belady"] >= rate, (capacity, rates)
        assert rates["belady"] > rates["lru"], (capacity, rates)


def test_replay_is_deterministic_to_the_bit():
    trace = bundled("gpt-oss-120b-bigmoeonedge")
    config = SimConfig(build_policy("moe-infinity", prefetch="eam"), cache_experts=8)
    a = simulate(trace, "rtx-3060", config).to_row()
    b = simulate(trace, "rtx-3060", config).to_row()
    assert repr(a) == repr(b)


def test_decode_hit_rates_per_layer_cover_every_layer():
    trace = bundled("gpt-oss-120b-bigmoeonedge")
    r = simulate(trace, PROFILE, SimConfig(build_policy("lru"), cache_experts=4, gpu_mem_bytes=1 << 40))
    assert len(r.hit_rate_per_layer) == trace.meta.num_layers
    decode = trace.phase == DECODE
    per_layer_accesses = np.bincount(trace.layer[decode], minlength=trace.meta.num_layers) * trace.meta.top_k
    weighted = sum(h * a for h, a in zip(r.hit_rate_per_layer, per_layer_accesses)) / per_layer_accesses.sum()
    assert weighted == pytest.approx(r.hit_rate)
