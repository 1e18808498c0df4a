"""Presets, prefetchers, placements, gating, sizing and the SimPy lanes."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
import simpy

from moesim.errors import MoesimError
from moesim.quant import WeightFormat
from moesim.simulator.compose import build_policy
from moesim.simulator.config import SimConfig
from moesim.simulator.costs import CostTables
from moesim.simulator.gating import GatingSpec, keep_mask
from moesim.simulator.memory import dp_cache_sizes
from moesim.simulator.placement import HybriMoEPlacement, PlacementSpec
from moesim.simulator.presets import PRESETS, get_preset
from moesim.simulator.run import simulate
from moesim.simulator.timeline import Timeline
from moesim.simulator.transfer import Lane
from moesim.tracer import DECODE, PREFILL
from test_sim_support import EXPERT_BYTES, round_profile, tiny_shape, write_tiny_trace

MS = 1e-3
BW = EXPERT_BYTES / MS


def profile(**kw):
    kw.setdefault("h2d_bytes_per_s", BW)
    kw.setdefault("d2h_bytes_per_s", BW)
    return round_profile(**kw)


def test_every_issue_preset_exists_documents_itself_and_composes_its_system():
    required = {"lru", "lfu", "mixtral-offloading", "mixtral-offloading-paper", "moe-infinity", "fiddler",
                "adapmoe", "hybrimoe", "predictive", "static", "belady", "all-gpu", "accelerate"}
    assert required <= set(PRESETS.names())
    for name in PRESETS.names():
        assert len(PRESETS.get(name).__doc__ or "") > 40, name
    mo = get_preset("mixtral-offloading")
    assert (mo.cache.policy, mo.cache.scope, mo.cache.initial) == ("lru", "layer", "last-experts")
    assert (mo.transfer.mode, mo.transfer.write_back, mo.transfer.staging_experts) == ("swap", True, 4)
    assert mo.prefetch.policy == "none"
    assert get_preset("mixtral-offloading-paper").prefetch.policy == "next-layer"
    mi = get_preset("moe-infinity")
    assert (mi.cache.policy, mi.cache.scope, mi.cache.unit) == ("lfu", "global", "bytes")
    assert mi.transfer.mode == "stream" and mi.transfer.demand_priority and mi.memory_fraction == 0.9
    assert mi.prefetch.policy == "none"
    fd = get_preset("fiddler")
    assert (fd.cache.policy, fd.cache.initial, fd.placement.policy, fd.transfer.mode) == (
        "static", "popular", "fiddler", "sync")
    assert not fd.transfer.pinned and fd.memory_fraction == 0.95
    ad = get_preset("adapmoe")
    assert (ad.cache.sizing, ad.prefetch.policy, ad.gating.mode) == ("dp", "first-non-resident", "adapmoe")
    assert ad.transfer.mode == "stream" and not ad.transfer.write_back and ad.transfer.staging_experts == 6
    hy = get_preset("hybrimoe")
    assert (hy.cache.policy, hy.cache.alpha, hy.cache.top_p, hy.placement.policy) == ("mrs", 0.5, 12, "hybrimoe")
    assert get_preset("accelerate").transfer.mode == "layer"
    assert get_preset("all-gpu").all_resident
    lc = get_preset("llama-cpp")
    assert (lc.cache.policy, lc.cache.initial, lc.placement.policy) == ("static", "last-layers", "cpu")


def test_parts_can_be_replaced_from_their_registries():
    p = build_policy("lru", eviction="belady", scope="global", prefetch="oracle", placement="fiddler",
                     placement_rule="code", transfer="swap", gating="0.2")
    assert (p.cache.policy, p.cache.scope, p.prefetch.policy, p.placement.policy, p.placement.rule) == (
        "belady", "global", "oracle", "fiddler", "code")
    assert p.transfer.mode == "swap" and p.gating == GatingSpec("uniform", 0.2)
    for bad in ({"eviction": "arc"}, {"prefetch": "psychic"}, {"placement": "tpu"}, {"transfer": "carrier-pigeon"}):
        with pytest.raises(MoesimError, match="expected one of"):
            build_policy("lru", **bad)


def test_dp_sizes_spend_the_budget_where_misses_fall_most():
    # layer 0 gains a lot from a second slot, layer 1 nothing
    curves = np.array([[10, 8, 0, 0], [10, 2, 2, 2]])
    assert dp_cache_sizes(curves, 3) == [2, 1]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 5, size=(3, 4)).cumsum(axis=1)[:, ::-1]  # non-increasing miss curves
    for total in range(0, 10):
        sizes = dp_cache_sizes(raw, total)
        best = min(sum(raw[l, s] for l, s in enumerate(c)) for c in itertools.product(range(4), repeat=3)
                   if sum(c) <= total)
        assert sum(raw[l, s] for l, s in enumerate(sizes)) == best and sum(sizes) <= total


def test_adaptive_gating_drops_only_small_second_experts_in_decode():
    thr = GatingSpec("adapmoe").thresholds(32)
    assert thr[0] == pytest.approx(np.sqrt(0.005 / 46.7)) and thr[-1] == pytest.approx(0.5)
    assert np.all(np.diff(thr) > 0)
    weights = np.array([[0.9, 0.1], [0.6, 0.4], [0.9, 0.1]], dtype=np.float32)
    layers = np.array([31, 31, 31])
    decode = np.array([True, True, False])
    keep = keep_mask(weights, layers, decode, GatingSpec("uniform", 0.2), 32)
    assert keep.tolist() == [[True, False], [True, True], [True, True]]
    assert keep_mask(weights, layers, decode, GatingSpec(), 32).all()


def test_gating_removes_activations_and_bytes(tmp_path):
    tokens = [[[0, 1]], [[2, 3]], [[1, 0]]]
    weights = [[[0.5, 0.5]], [[0.95, 0.05]], [[0.5, 0.5]]]
    path = write_tiny_trace(tmp_path / "t.parquet", tokens, prompt=1, top_k=2, weights=weights)
    off = simulate(path, profile(), SimConfig(get_preset("lru"), cache_experts=4))
    on = simulate(path, profile(), SimConfig(build_policy("lru", gating="0.1"), cache_experts=4))
    assert off.gated_fraction == 0.0 and on.gated_fraction == pytest.approx(0.25)
    assert on.h2d_bytes == off.h2d_bytes - EXPERT_BYTES
    assert on.tpot_mean_s < off.tpot_mean_s


def test_hybrimoe_split_sends_the_small_tail_to_the_cpu():
    tables = CostTables(
        gpu_expert=[0.0] + [1 * MS] * 8, cpu_expert=[0.0] + [t * 1.5 * MS for t in range(1, 9)],
        act_d2h=[0.0] * 9, act_h2d=[0.0] * 9, act_d2h_conc=[0.0] * 9, act_h2d_conc=[0.0] * 9,
        h2d_by_layer=[5 * MS], h2d_conc_by_layer=[5 * MS],
        h2d_pageable_by_layer=[10 * MS], d2h_by_layer=[5 * MS], d2h_conc_by_layer=[5 * MS],
        prefill_non_expert={}, decode_non_expert={}, head={}, layer_overhead_s=0, step_overhead_s=0,
        dense_layers=0, shared_experts=0, expert_kernel="bf16", cpu_kernel="bf16", non_expert_kernel="bf16",
        expert_bytes_by_layer=[1],
    )
    hsm = HybriMoEPlacement(tables, PlacementSpec("hybrimoe"), tables.h2d_by_layer)
    resident = {0, 1}
    flags = hsm.place(0, DECODE, [0, 1, 2, 3], [4, 3, 2, 1], lambda l, e: e in resident)
    # GPU: residents 0 and 1 (1 ms each); expert 2 would need a 5 ms copy; the CPU does 3 (1.5 ms), then 2 (3 ms)
    assert flags == [False, False, True, True]
    assert hsm.place(0, PREFILL, [0, 1, 2, 3], [4, 3, 2, 1], lambda l, e: e in resident) is None


def test_eam_prefetch_learns_from_earlier_requests(tmp_path):
    # three requests with the same cyclic routing: later ones match the earlier ones' activation matrices
    L, E = 4, 8
    tokens = [[[0] for _ in range(L)]] + [[[(3 * layer + t % 3) % E] for layer in range(L)] for t in range(12)]
    path = write_tiny_trace(tmp_path / "t.parquet", tokens, prompt=1, num_experts=E, requests=3)
    for capacity in (2, 3):
        plain = simulate(path, profile(), SimConfig(get_preset("moe-infinity"), cache_experts=capacity))
        eam = simulate(path, profile(), SimConfig(build_policy("moe-infinity", prefetch="eam"),
                                                  cache_experts=capacity))
        assert plain.prefetch_issued == 0
        assert eam.prefetch_issued > 0 and eam.prefetch_precision > 0
        assert eam.hit_rate > plain.hit_rate
        assert eam.tpot_mean_s < plain.tpot_mean_s


def test_predictive_prefetch_is_fitted_on_other_traces(tmp_path):
    from moesim.simulator.predictor import fit_predictor
    from moesim.traces import bundled_traces

    paths = bundled_traces()
    others = [paths["gemma-4-26b-a4b-bigmoeonedge"], paths["gpt-oss-120b-bigmoeonedge"]]
    w = fit_predictor(others)
    assert w.coef[0] > 0 and w.samples > 100_000  # transition evidence raises the score
    r = simulate(paths["qwen3-30b-a3b-bigmoeonedge"], round_profile(),
                 SimConfig(get_preset("predictive"), cache_experts=24, gpu_mem_bytes=1 << 40))
    base = simulate(paths["qwen3-30b-a3b-bigmoeonedge"], round_profile(),
                    SimConfig(get_preset("lru"), cache_experts=24, gpu_mem_bytes=1 << 40))
    assert r.prefetch_issued > 0 and 0 < r.prefetch_precision <= 1 and 0 < r.prefetch_recall <= 1
    assert r.hit_rate > base.hit_rate
    with pytest.raises(MoesimError, match="trace file not found|not a file"):
        simulate(paths["qwen3-30b-a3b-bigmoeonedge"], round_profile(),
                 SimConfig(build_policy("predictive", predictor_train=(str(tmp_path / "none.parquet"),)),
                           cache_experts=4, gpu_mem_bytes=1 << 40))


def test_the_predictor_fit_does_not_depend_on_the_blas_threads():
    # a multi-threaded matrix product sums in another order: on two threads the weights differed in their last
    # bits, so one sweep's rows depended on the machine's cores and on the worker count
    from threadpoolctl import threadpool_limits

    from moesim.simulator.predictor import _fit
    from moesim.traces import bundled_traces

    paths = bundled_traces()
    key = (str(paths["gemma-4-26b-a4b-bigmoeonedge"]), str(paths["gpt-oss-120b-bigmoeonedge"]))
    fits = []
    for threads in (1, 2):
        with threadpool_limits(limits=threads, user_api="blas"):
            fits.append(_fit(key))
    assert fits[0] == fits[1]


def test_accelerate_copies_every_offloaded_layer_whole_each_step(tmp_path):
    tokens = [[[0], [0], [0]], [[1], [1], [1]], [[2], [2], [2]]]
    path = write_tiny_trace(tmp_path / "t.parquet", tokens, prompt=1)
    # room for one layer's 4 experts: layer 0 stays, layers 1 and 2 are copied (pageable, 2 ms each)
    acc = get_preset("accelerate").with_parts(runtime="none")  # the copies alone, without per-parameter syncs
    r = simulate(path, profile(), SimConfig(acc, cache_bytes=4 * EXPERT_BYTES))
    assert r.cache_slots == 4
    assert r.h2d_bytes == 3 * 2 * 4 * EXPERT_BYTES
    assert r.tpot_mean_s == pytest.approx(3 * (2 * MS + MS) + 2 * 8 * MS, rel=1e-9)


def test_moe_infinity_sizes_its_global_cache_from_ninety_percent_of_memory(tmp_path):
    path = write_tiny_trace(tmp_path / "t.parquet", [[[0], [1]], [[1], [2]]], prompt=1)
    prof = profile(memory_bytes=10 * 2**20)
    r = simulate(path, prof, SimConfig(get_preset("moe-infinity")))
    m = r.memory
    # GetSparseCacheLimit: the pool (ratio x device memory) minus the dense weights only
    assert m.cache_bytes == min(int(10 * 2**20 * 0.9) - m.non_expert_bytes, 2 * 4 * EXPERT_BYTES)


def test_lane_serves_demand_before_queued_prefetches_and_promotes():
    env = simpy.Environment()
    lane = Lane(env, "PCIe H2D")
    done = {}

    def driver():
        a = lane.submit(1.0, label="prefetch a", background=True)
        b = lane.submit(1.0, label="prefetch b", background=True)
        yield env.timeout(0.5)
        c = lane.submit(1.0, label="demand c")
        for name, job in (("a", a), ("b", b), ("c", c)):
            job.done.callbacks.append(lambda ev, n=name: done.__setitem__(n, env.now))

    env.process(driver())
    env.run()
    # a had already started when c came; c overtakes the queued b
    assert done == {"a": 1.0, "c": 2.0, "b": 3.0}
    assert lane.busy_s == 3.0 and lane.jobs == 3


def test_timeline_has_cpu_lane_events_for_cpu_experts(tmp_path):
    path = write_tiny_trace(tmp_path / "t.parquet", [[[0]], [[1]]], prompt=1)
    tl = Timeline()
    simulate(path, profile(), SimConfig(build_policy("lru", placement="fiddler", placement_rule="code"),
                                        cache_experts=0), timeline=tl)
    tids = {e[0] for e in tl.events}
    assert 1 in tids and 4 in tids  # GPU and CPU lanes


def test_next_layer_prefetch_without_a_recorded_guess_uses_a_stated_guess_model(tmp_path):
    # No next_layer_guess column and 2 slots per layer (>= top-k 1): the previous token's experts are always
    # resident, so the old fallback issued no prefetch and mixtral-offloading-paper equalled plain LRU.
    rng = np.random.default_rng(3)
    tokens = [[[int(rng.integers(4))] for _ in range(3)] for _ in range(40)]
    path = write_tiny_trace(tmp_path / "t.parquet", tokens, prompt=1)
    cfg = lambda name, **kw: SimConfig(policy=build_policy(name, **kw), cache_experts=2)  # noqa: E731
    paper = simulate(path, profile(), cfg("mixtral-offloading-paper"))
    assert paper.guess_source == "accuracy-0.75"
    assert paper.prefetch_issued > 0
    assert 0 < paper.prefetch_precision <= 1 and 0 < paper.prefetch_recall <= 1
    exact = simulate(path, profile(), cfg("mixtral-offloading-paper", guess="accuracy:1"))
    assert exact.prefetch_precision == 1.0  # a perfect guess prefetches only experts that are then used
    old = simulate(path, profile(), cfg("mixtral-offloading-paper", guess="previous-token"))
    assert old.guess_source == "previous-token" and old.prefetch_issued == 0
    with pytest.raises(MoesimError, match="--guess"):
        build_policy("mixtral-offloading-paper", guess="accuracy:2")


def test_presets_speak_their_systems_knobs(tmp_path):
    from moesim.simulator.knobs import apply_knobs, parse_knobs

    path = write_tiny_trace(tmp_path / "t.parquet", [[[0], [1]], [[1], [2]]], prompt=1)
    base = SimConfig(get_preset("mixtral-offloading"))
    assert apply_knobs(base, parse_knobs(["offload_per_layer=3"]), 4).cache_experts == 1
    prof = profile(memory_bytes=10 * 2**20)
    cfg = apply_knobs(SimConfig(get_preset("moe-infinity")), parse_knobs(["device-memory-ratio=0.5"]), 4)
    m = simulate(path, prof, cfg).memory
    assert m.cache_bytes == min(int(10 * 2**20 * 0.5) - m.non_expert_bytes, 2 * 4 * EXPERT_BYTES)
    with pytest.raises(MoesimError, match="not of preset 'lru'"):
        apply_knobs(SimConfig(get_preset("lru")), parse_knobs(["offload_per_layer=2"]), 4)
    with pytest.raises(MoesimError, match="integer 0..4"):
        apply_knobs(base, parse_knobs(["offload_per_layer=9"]), 4)
    with pytest.raises(MoesimError, match="NAME=VALUE"):
        parse_knobs(["cache=2"])


def test_llama_cpp_runs_the_first_n_layers_experts_on_the_cpu_and_copies_none(tmp_path):
    from moesim.simulator.knobs import apply_knobs, parse_knobs

    path = write_tiny_trace(tmp_path / "t.parquet", [[[0], [1], [2]], [[1], [2], [3]], [[2], [3], [0]]], prompt=1)
    from moesim.simulator.runtime import LAUNCH_S, RUNTIMES

    eager = get_preset("llama-cpp").with_parts(runtime="none")  # the placement alone, on the profile's costs
    base = SimConfig(eager)
    cfg = apply_knobs(base, parse_knobs(["n_cpu_moe=2"]), 4, [EXPERT_BYTES] * 3)
    assert cfg.cache_bytes == 4 * EXPERT_BYTES  # the last layer's four experts
    r = simulate(path, profile(), cfg)
    assert (r.cache_slots, r.memory.cache_bytes) == (4, 4 * EXPERT_BYTES)
    assert r.hit_rate == pytest.approx(1 / 3) and r.cpu_expert_fraction == pytest.approx(2 / 3)
    assert r.h2d_bytes < EXPERT_BYTES  # activations only: no expert is ever copied
    # per token: 3 layers' non-expert work (2 ms), the GPU layer's expert (1 ms), the two CPU layers' experts
    # (4 ms each) with their activations down and up
    assert r.tpot_mean_s == pytest.approx(3 * 2 * MS + MS + 2 * 4 * MS, rel=1e-3)
    # llama.cpp's own runtime: each layer's fused kernels cost their launches instead of the profile's eager
    # layer call (here all latency); an engine's run of the preset (released_code_costs off) keeps the eager costs
    graph = simulate(path, profile(), replace(cfg, policy=get_preset("llama-cpp")))
    launches = RUNTIMES["llama-cpp"].layer_kernels * LAUNCH_S
    activations = r.tpot_mean_s - (3 * 2 * MS + MS + 2 * 4 * MS)  # the two CPU layers' copies, microseconds
    assert graph.tpot_mean_s == pytest.approx(3 * launches + MS + 2 * 4 * MS + activations, rel=1e-9)
    engine = simulate(path, profile(), replace(cfg, policy=get_preset("llama-cpp").with_parts(
        released_code_costs=False)))
    assert engine.tpot_mean_s == pytest.approx(r.tpot_mean_s, rel=1e-12)
    every = simulate(path, profile(), apply_knobs(base, parse_knobs(["n_cpu_moe=9"]), 4, [EXPERT_BYTES] * 3))
    assert (every.cache_slots, every.cpu_expert_fraction) == (0, 1.0)  # past the layer count: every layer
    none = simulate(path, profile(), apply_knobs(base, parse_knobs(["n_cpu_moe=0"]), 4, [EXPERT_BYTES] * 3))
    assert (none.hit_rate, none.cpu_expert_fraction) == (1.0, 0.0)
    # a cache size fills whole layers from the last one back (llama.cpp keeps the first layers on the host)
    sized = simulate(path, profile(), SimConfig(get_preset("llama-cpp"), cache_experts=3))
    assert sized.cache_slots == 8 and sized.hit_rate == pytest.approx(2 / 3)
    for bad, match in (("n_cpu_moe=-1", "0 or more"), ("n_cpu_moe=1.5", "whole number")):
        with pytest.raises(MoesimError, match=match):
            apply_knobs(base, parse_knobs([bad]), 4, [EXPERT_BYTES] * 3)
    with pytest.raises(MoesimError, match="not of preset 'accelerate'"):
        apply_knobs(SimConfig(get_preset("accelerate")), parse_knobs(["n_cpu_moe=1"]), 4, [EXPERT_BYTES] * 3)


def test_llama_cpp_and_ktransformers_run_a_layers_host_experts_as_one_op(tmp_path, monkeypatch):
    """ggml's MUL_MAT_ID (and KTransformers' CPUInfer task) runs all of a layer's host experts in one op: one
    dispatch and one copy of the activations each way per layer, where the engine pays them per expert."""
    from moesim.simulator import runtime as rt
    from moesim.simulator.knobs import apply_knobs, parse_knobs

    tokens = [[[0, 1], [1, 2], [2, 3]], [[1, 2], [2, 3], [3, 0]], [[2, 3], [3, 0], [0, 1]]]
    path = write_tiny_trace(tmp_path / "t.parquet", tokens, prompt=1, top_k=2)
    every_layer = parse_knobs(["n_cpu_moe=3"])

    def run(preset, **parts):
        policy = get_preset(preset).with_parts(**parts) if parts else get_preset(preset)
        return simulate(path, profile(), apply_knobs(SimConfig(policy), every_layer, 4, [EXPERT_BYTES] * 3))

    one_op = run("llama-cpp")
    assert one_op.cpu_expert_fraction == 1.0 and one_op.h2d_bytes < EXPERT_BYTES
    monkeypatch.setitem(rt.RUNTIMES, "llama-cpp", replace(rt.RUNTIMES["llama-cpp"], cpu_layer_op=False))
    per_expert = run("llama-cpp")
    monkeypatch.undo()
    # the test profile's CPU expert is all dispatch (4 ms): per layer one op pays it once, not twice; the two
    # experts' one-token activations are one token's copy each way
    tables = build_cost_tables_for(path)
    copies = tables.act_d2h[1] + tables.act_h2d[1]
    assert per_expert.tpot_mean_s - one_op.tpot_mean_s == pytest.approx(3 * (4 * MS + copies), rel=1e-9)
    # an engine's run of the preset computes expert by expert, as moesim's engine does
    engine = run("llama-cpp", released_code_costs=False)
    assert engine.tpot_mean_s == pytest.approx(per_expert.tpot_mean_s + 3 * 2 * MS - 3 * rt.RUNTIMES[
        "llama-cpp"].layer_kernels * rt.LAUNCH_S, rel=1e-9)
    # KTransformers: the same placement and one op per layer, its step one CUDA graph (no launch per layer)
    kt = run("ktransformers")
    assert kt.tpot_mean_s == pytest.approx(one_op.tpot_mean_s - 3 * rt.RUNTIMES["llama-cpp"].layer_kernels
                                           * rt.LAUNCH_S, rel=1e-9)
    # at top-1 there is nothing to merge
    single = [[[e[0]] for e in layers] for layers in tokens]
    path1 = write_tiny_trace(tmp_path / "t1.parquet", single, prompt=1, top_k=1)
    a = simulate(path1, profile(), apply_knobs(SimConfig(get_preset("llama-cpp")), every_layer, 4, [EXPERT_BYTES] * 3))
    monkeypatch.setitem(rt.RUNTIMES, "llama-cpp", replace(rt.RUNTIMES["llama-cpp"], cpu_layer_op=False))
    b = simulate(path1, profile(), apply_knobs(SimConfig(get_preset("llama-cpp")), every_layer, 4, [EXPERT_BYTES] * 3))
    assert a.tpot_mean_s == pytest.approx(b.tpot_mean_s, rel=1e-12)


def build_cost_tables_for(path):
    from moesim.simulator.costs import build_cost_tables
    from moesim.tracer import read_trace

    shape = read_trace(path).meta.model
    return build_cost_tables(profile(), shape, [EXPERT_BYTES] * shape.num_moe_layers, "bf16", "bf16", 4, {1}, {1},
                             8, needs_cpu=True)


def test_runtime_costs_add_the_released_codes_launches_and_syncs(tmp_path):
    from moesim.simulator.runtime import FITTED_UNIT_COSTS, LAUNCH_S, SYNC_S

    # one decode token, one layer, one resident expert: the runtime adds its per-expert and per-layer terms
    # (MoE-Infinity's per-expert term includes its fitted dispatch cost)
    path = write_tiny_trace(tmp_path / "t.parquet", [[[0]], [[0]]], prompt=1)
    cfg = lambda runtime: SimConfig(get_preset("moe-infinity").with_parts(runtime=runtime),  # noqa: E731
                                    cache_experts=2)
    bare = simulate(path, profile(), cfg("none"))
    real = simulate(path, profile(), cfg("moe-infinity"))
    fitted = FITTED_UNIT_COSTS["moe-infinity.expert_overhead_s"]
    assert fitted > 0
    assert real.tpot_mean_s - bare.tpot_mean_s == pytest.approx(5 * LAUNCH_S + 2 * SYNC_S + fitted + SYNC_S)
    # HQQ experts move 5x their packed bytes: Mixtral-Offloading's int2 expert call costs more than int4's kernel
    mo = SimConfig(get_preset("mixtral-offloading"), cache_experts=2, expert_format=WeightFormat.parse("int2-g16-m8"))
    mo_bare = replace(mo, policy=mo.policy.with_parts(runtime="none"))
    assert simulate(path, profile(), mo).tpot_mean_s > simulate(path, profile(), mo_bare).tpot_mean_s
    with pytest.raises(MoesimError, match="runtime 'x'"):
        get_preset("lru").with_parts(runtime="x")


def test_moe_infinitys_fitted_cost_is_charged_on_each_gpu_expert_call_of_its_runtime_only(monkeypatch):
    from moesim.simulator import runtime

    tables = CostTables(
        gpu_expert=[0.0, 1 * MS, 2 * MS], cpu_expert=[0.0, 5 * MS], act_d2h=[0.0] * 3, act_h2d=[0.0] * 3,
        act_d2h_conc=[0.0] * 3, act_h2d_conc=[0.0] * 3, h2d_by_layer=[5 * MS], h2d_conc_by_layer=[5 * MS],
        h2d_pageable_by_layer=[10 * MS], d2h_by_layer=[5 * MS], d2h_conc_by_layer=[5 * MS],
        prefill_non_expert={}, decode_non_expert={}, head={}, layer_overhead_s=0, step_overhead_s=0,
        dense_layers=0, shared_experts=0, expert_kernel="bf16", cpu_kernel="bf16", non_expert_kernel="bf16",
        expert_bytes_by_layer=[1],
    )
    monkeypatch.setitem(runtime.FITTED_UNIT_COSTS, "moe-infinity.expert_overhead_s", 0.4 * MS)
    mi = runtime.runtime_costs("moe-infinity")
    fixed = mi.expert_kernels * runtime.LAUNCH_S + mi.expert_syncs * runtime.SYNC_S
    out = runtime.apply_runtime(tables, mi, expert_hqq=False, attention_hqq=False)
    assert out.gpu_expert == pytest.approx([0.0, 1 * MS + fixed + 0.4 * MS, 2 * MS + fixed + 0.4 * MS])
    assert out.cpu_expert == tables.cpu_expert
    for other in ("mixtral-offloading", "fiddler", "accelerate"):
        assert runtime.runtime_costs(other).expert_fitted_s == 0.0


def test_mixtral_offloadings_hqq_expert_call_costs_one_tile_per_16_tokens():
    """The released Triton matmul tiles rows by 16 (a one-token input is padded to a tile; grid cdiv(M, 16) x
    cdiv(N, 32), component-costs 1.6): a prefill call of up to 16 tokens costs what one token's does, 17 tokens
    two tiles. The profile's kernel class (here linear past one token) still times other presets, 16-bit
    experts, and an engine's run of the preset."""
    from moesim.simulator import runtime

    gpu = [0.0] + [t * MS for t in range(1, 34)]  # 1 ms per token
    tables = CostTables(
        gpu_expert=gpu, cpu_expert=[0.0] * 34, act_d2h=[0.0] * 34, act_h2d=[0.0] * 34,
        act_d2h_conc=[0.0] * 34, act_h2d_conc=[0.0] * 34, h2d_by_layer=[5 * MS], h2d_conc_by_layer=[5 * MS],
        h2d_pageable_by_layer=[10 * MS], d2h_by_layer=[5 * MS], d2h_conc_by_layer=[5 * MS],
        prefill_non_expert={}, decode_non_expert={}, head={}, layer_overhead_s=0, step_overhead_s=0,
        dense_layers=0, shared_experts=0, expert_kernel="int4", cpu_kernel="", non_expert_kernel="bf16",
        expert_bytes_by_layer=[1],
    )
    mo = runtime.runtime_costs("mixtral-offloading")
    assert mo.hqq_tile_rows == 16
    out = runtime.apply_runtime(tables, mo, expert_hqq=True, attention_hqq=False).gpu_expert
    per_call = out[1] - 1 * MS  # the call's launches, syncs and HQQ scale/zero traffic
    assert per_call > 0
    assert [out[n] - per_call for n in (1, 2, 16, 17, 32, 33)] == pytest.approx([MS, MS, MS, 2 * MS, 2 * MS, 3 * MS])
    sixteen_bit = runtime.apply_runtime(tables, mo, expert_hqq=False, attention_hqq=False).gpu_expert
    engine = runtime.apply_runtime(tables, runtime.runtime_costs("mixtral-offloading", fitted=False),
                                   expert_hqq=True, attention_hqq=False).gpu_expert
    for other in (sixteen_bit, engine):
        assert other[16] - other[1] == pytest.approx(15 * MS)


def test_an_engine_run_of_a_preset_leaves_out_the_released_codes_fitted_costs(tmp_path):
    """moesim validate predicts its own engine, which has no MoE-Infinity dispatcher and no accelerate hooks."""
    from moesim.simulator import runtime

    for name in ("moe-infinity", "accelerate"):
        assert runtime.runtime_costs(name, fitted=False).expert_fitted_s == 0.0
        assert runtime.runtime_costs(name, fitted=False).weight_overhead_s == 0.0
    assert runtime.runtime_costs("moe-infinity").expert_fitted_s > 0
    assert runtime.runtime_costs("accelerate").weight_overhead_s > 0
    path = write_tiny_trace(tmp_path / "t.parquet", [[[0]], [[0]]], prompt=1)
    spec = get_preset("moe-infinity")
    released = simulate(path, profile(), SimConfig(spec, cache_experts=2))
    engine = simulate(path, profile(), SimConfig(spec.with_parts(released_code_costs=False), cache_experts=2))
    fitted = runtime.FITTED_UNIT_COSTS["moe-infinity.expert_overhead_s"]
    assert released.tpot_mean_s - engine.tpot_mean_s == pytest.approx(fitted)  # one expert call per token


def test_llama_cpp_brings_its_own_4bit_gpu_kernels_to_a_turing_card(tmp_path):
    """PyTorch's 4-bit kernel (tinygemm) needs sm80, so a T4's spec profile has no int4 class and a 4-bit expert
    is timed with its int8 kernel; llama.cpp's run uses ggml's own quantized kernels, which Turing runs: its
    experts and trunk stream their 4-bit bytes (at the int8 and 16-bit classes' rates). Other presets, and an
    engine's run of llama-cpp (PyTorch kernels), keep the profile's classes."""
    from moesim.calib.profile import load_profile
    from moesim.simulator.knobs import apply_knobs, parse_knobs

    tokens = [[[0, 1], [1, 2], [2, 3]], [[1, 2], [2, 3], [3, 0]], [[2, 3], [3, 0], [0, 1]]]
    path = write_tiny_trace(tmp_path / "t.parquet", tokens, prompt=1, top_k=2)
    t4 = load_profile("t4")
    assert "int4" not in t4.expert_kernels
    four = WeightFormat.parse("int4")

    def run(preset, **parts):
        policy = get_preset(preset).with_parts(**parts) if parts else get_preset(preset)
        config = SimConfig(policy, expert_format=four, non_expert_format=four)
        if preset == "llama-cpp":
            config = apply_knobs(config, parse_knobs(["n_cpu_moe=1"]), 4, [four.bytes_for(tiny_shape().expert_params)] * 3)
        return simulate(path, t4, config)

    own = run("llama-cpp")
    assert (own.expert_kernel, own.non_expert_kernel) == ("int4", "int4")
    assert own.label.profile == "t4"  # the run is labelled with the profile it was given
    engine = run("llama-cpp", released_code_costs=False)
    assert (engine.expert_kernel, engine.non_expert_kernel) == ("int8 (for int4)", "bf16 (for int4)")
    lru = run("lru")
    assert lru.expert_kernel == "int8 (for int4)"
    assert own.tpot_mean_s < engine.tpot_mean_s
    # an sm80 card's own int4 class is left as it is
    from moesim.simulator.runtime import runtime_costs, runtime_profile
    a6000 = load_profile("a6000")
    assert runtime_profile(a6000, runtime_costs("llama-cpp")) is a6000
    derived = runtime_profile(t4, runtime_costs("llama-cpp"))
    assert derived is runtime_profile(t4, runtime_costs("llama-cpp"))  # made once per profile
    assert "mul_mat_vec_q" in derived.expert_models["int4"].library


def test_ktransformers_splits_each_host_expert_over_the_sockets(tmp_path):
    """KTransformers' dual-socket mode holds the experts once per NUMA node and splits each expert between the
    sockets: a host expert costs its dispatch plus one socket's time over 1 + gain (the fitted gain of the second
    socket; 1: half of it). llama.cpp (no NUMA placement) and an engine's run keep one socket's time; a
    one-socket host changes nothing."""
    from moesim.calib.hosts import compose_profile
    from moesim.reproduce.fit import REGISTRY, values
    from moesim.simulator.runtime import FITTED_UNIT_COSTS, apply_runtime, runtime_costs

    dual = compose_profile("rtx-4090d", "xeon-gold-6454s-x2")
    assert dual.host.facts["sockets"] == 2
    assert compose_profile("rtx-4090d", "xeon-gold-6454s").host.facts["sockets"] == 1
    tokens = [[[0, 1], [1, 2], [2, 3]], [[1, 2], [2, 3], [3, 0]]]
    tables = build_cost_tables_for(write_tiny_trace(tmp_path / "t.parquet", tokens, prompt=1, top_k=2))
    tables = replace(tables, cpu_expert=[0.0, 5 * MS, 7 * MS], cpu_expert_latency_s=1 * MS)
    two = replace(tables, host_sockets=2)
    kt = runtime_costs("ktransformers")
    one_socket = apply_runtime(tables, kt, False, False).cpu_expert
    with values({"ktransformers.numa_split_gain": 1.0}):
        split = apply_runtime(two, kt, False, False).cpu_expert
    assert [a - b for a, b in zip(one_socket, split)] == pytest.approx([0.0, 2 * MS, 3 * MS], abs=1e-15)
    with values({"ktransformers.numa_split_gain": 0.25}):  # the second socket adds a quarter: 1.25x
        split = apply_runtime(two, kt, False, False).cpu_expert
    assert [a - b for a, b in zip(one_socket, split)] == pytest.approx([0.0, 0.8 * MS, 1.2 * MS], abs=1e-15)
    assert REGISTRY["ktransformers.numa_split_gain"].read() == FITTED_UNIT_COSTS["ktransformers.numa_split_gain"]
    for runtime in (runtime_costs("llama-cpp"), runtime_costs("ktransformers", fitted=False)):
        assert apply_runtime(two, runtime, False, False).cpu_expert == apply_runtime(tables, runtime, False,
                                                                                      False).cpu_expert


def test_the_fitted_server_int4_rates_scale_only_server_hosts_cpu_int4_class(monkeypatch):
    """The streaming rate (fitted on decode) scales only what the int4 class streams, the computing rate (fitted on
    prefill) only what it computes; a host that is not a server socket keeps the stated rates."""
    from moesim.calib import hosts
    from moesim.reproduce.fit import REGISTRY, values

    def quant(host):
        eff = hosts.compose_profile("rtx-4090d", host).efficiency
        return eff["host_memory_quantized"]["value"], eff["cpu_quant_per_core_flops"]["value"]

    base_mem = hosts.CPU_QUANT_MEMORY_EFFICIENCY.value
    stated_flops = hosts.CPU_QUANT_LANES["amx"] * 2 * 2.0e9
    with values({"server.cpu_int4_rate": 0.5, "server.cpu_int4_compute_rate": 0.25}):
        mem, flops = quant("xeon-gold-6454s")
        assert mem == pytest.approx(0.5 * base_mem)
        assert flops == pytest.approx(0.25 * stated_flops)
        assert quant("xeon-gold-6454s-x2") == (mem, flops)
        assert quant("threadripper-pro-5965wx") == pytest.approx(
            (base_mem, hosts.CPU_QUANT_LANES["avx2"] * 2 * 2.0e9))
    with values({"server.cpu_int4_rate": 0.5, "server.cpu_int4_compute_rate": 1.0}):
        assert quant("xeon-gold-6454s") == pytest.approx((0.5 * base_mem, stated_flops))
    assert REGISTRY["server.cpu_int4_rate"].read() == hosts.FITTED_CPU_INT4_RATE["server"]
    assert REGISTRY["server.cpu_int4_compute_rate"].read() == hosts.FITTED_CPU_INT4_COMPUTE_RATE["server"]


def test_llama_cpp_runs_a_long_prefill_steps_host_experts_on_the_gpu(tmp_path):
    """llama.cpp's op offload: an op whose weights live in host memory runs on the GPU, its weights uploaded,
    when the batch has at least GGML_OP_OFFLOAD_MIN_BATCH = 32 tokens; a shorter prefill and every decode step
    run the host experts on the CPU. The device holds one layer's experts for the upload. An engine's run of the
    preset (PyTorch, no op offload) keeps them on the CPU. The compiled replay agrees with the event engine."""
    from moesim.simulator.knobs import apply_knobs, parse_knobs

    def trace(prompt):
        tokens = [[[t % 4, (t + 1) % 4]] * 3 for t in range(prompt + 3)]
        return write_tiny_trace(tmp_path / f"p{prompt}.parquet", tokens, prompt=prompt, top_k=2)

    def run(path, **parts):
        policy = get_preset("llama-cpp").with_parts(**parts) if parts else get_preset("llama-cpp")
        config = apply_knobs(SimConfig(policy), parse_knobs(["n_cpu_moe=3"]), 4, [EXPERT_BYTES] * 3)
        fast = simulate(path, profile(), config)
        assert fast == simulate(path, profile(), config, exact_events=True)
        return fast

    long, short = run(trace(32)), run(trace(31))
    # 32 tokens route all 4 experts of each layer: 12 uploads; nothing else crosses host to device but activations
    assert long.h2d_bytes >= 12 * EXPERT_BYTES > short.h2d_bytes
    assert long.memory.staging_bytes == 4 * EXPERT_BYTES  # one whole layer's experts
    assert long.cpu_expert_fraction == short.cpu_expert_fraction == 1.0  # decode stays on the CPU
    engine = run(trace(32), released_code_costs=False)
    assert engine.h2d_bytes < EXPERT_BYTES and engine.memory.staging_bytes == 0


def test_llama_cpp_reserves_the_upload_buffer_only_while_a_layer_stays_on_the_host(tmp_path):
    """Every layer's experts on the GPU: nothing to upload, no op-offload buffer; a layer on the host: one whole
    layer of experts. The cost model's peak memory follows the same rule at every cache size."""
    from moesim.costmodel.memory import memory_parts, peak_bytes
    from moesim.simulator.run import prepare
    from moesim.tracer import read_trace

    tokens = [[[t % 4, (t + 1) % 4]] * 3 for t in range(40)]
    path = write_tiny_trace(tmp_path / "t.parquet", tokens, prompt=36, top_k=2)
    staging = {}
    for cache_experts in (4, 3, 1):  # layers on the GPU: all 3, the last 2, none (4 experts a layer)
        config = SimConfig(get_preset("llama-cpp"), cache_experts=cache_experts)
        result = simulate(path, profile(), config)
        staging[cache_experts] = result.memory.staging_bytes
        prep = prepare(read_trace(path), profile(), config)
        parts = memory_parts(prep.trace.meta.model, prep.workload, prep.plan.breakdown.non_expert_bytes, prep.profile)
        peak = peak_bytes(config.policy, parts, [EXPERT_BYTES] * 3, 4, np.array([cache_experts]))
        assert int(peak[0]) == result.memory.total_bytes
    assert staging == {4: 0, 3: 4 * EXPERT_BYTES, 1: 4 * EXPERT_BYTES}
