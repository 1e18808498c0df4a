"""Hand-computed timings on tiny traces: every number below can be checked with pencil and paper.

The profile (test_sim_support.round_profile) charges 2 ms of non-expert work per layer, 1 ms per expert
FFN (0.5 ms where stated), and copies one tiny expert in exactly 1 ms each way; no overheads.
"""

from __future__ import annotations

import pytest

from moesim.simulator.compose import build_policy
from moesim.simulator.config import SimConfig
from moesim.simulator.presets import get_preset
from moesim.simulator.run import simulate
from test_sim_support import EXPERT_BYTES, _const, replay_path_of, round_profile, write_tiny_trace

MS = 1e-3
BW = EXPERT_BYTES / MS  # one expert per millisecond


def profile(**kw):
    kw.setdefault("h2d_bytes_per_s", BW)
    kw.setdefault("d2h_bytes_per_s", BW)
    return round_profile(**kw)


def approx(x):
    return pytest.approx(x, rel=1e-9, abs=1e-12)


def test_one_miss_at_a_known_bandwidth_gives_an_exact_tpot(tmp_path):
    # one layer; prompt uses expert 0, then decode uses expert 1 twice; one cache slot
    path = write_tiny_trace(tmp_path / "t.parquet", [[[0]], [[1]], [[1]]], prompt=1)
    r = simulate(path, profile(), SimConfig(get_preset("lru"), cache_experts=1))
    assert r.feasible
    # prefill: 2 ms attention, then the miss: 1 ms copy, 1 ms FFN
    assert r.ttft_mean_s == approx(4 * MS)
    # decode: miss (2 + 1 + 1) then hit (2 + 1)
    assert r.tpot_mean_s == approx(3.5 * MS)
    assert r.tpot_p50_s == approx(3.5 * MS)
    assert r.e2e_mean_s == approx(11 * MS)
    assert r.makespan_s == approx(11 * MS)
    assert r.tokens_per_s == approx(3 / (11 * MS))
    assert r.hit_rate == approx(0.5)
    assert r.h2d_bytes == 2 * EXPERT_BYTES and r.d2h_bytes == 0
    assert r.stall_s == approx(2 * MS)
    assert r.gpu_util == approx(9 / 11)
    assert r.h2d_util == approx(2 / 11)


def test_mixtral_offloading_swap_copies_both_ways_on_the_compute_stream(tmp_path):
    # the cache starts full (expert 3 resident), so every miss is a swap: 1 ms in + 1 ms out
    path = write_tiny_trace(tmp_path / "t.parquet", [[[0]], [[1]], [[1]]], prompt=1)
    # the swap mechanics alone: the released runtime's launch/sync costs are tested in test_sim_policies
    mo = get_preset("mixtral-offloading").with_parts(runtime="none")
    r = simulate(path, profile(), SimConfig(mo, cache_experts=1))
    assert r.ttft_mean_s == approx(5 * MS)  # 2 + 1 + 1 + 1
    assert r.tpot_mean_s == approx(4 * MS)  # (5 + 3) / 2
    assert r.h2d_bytes == 2 * EXPERT_BYTES and r.d2h_bytes == 2 * EXPERT_BYTES
    assert r.gpu_util == approx(9 / 13)


def test_copy_stream_overlaps_the_second_copy_with_the_first_ffn(tmp_path):
    path = write_tiny_trace(tmp_path / "t.parquet", [[[0, 1]], [[2, 3]]], prompt=1, top_k=2)
    prof = profile(expert_s=0.5 * MS)
    streamed = simulate(path, prof, SimConfig(get_preset("lru"), cache_experts=2))
    # copies land at 3 and 4 ms; FFN 0 runs 3-3.5, FFN 1 waits for its copy: 4-4.5
    assert streamed.ttft_mean_s == approx(4.5 * MS)
    assert streamed.tpot_mean_s == approx(4.5 * MS)
    serialized = simulate(path, prof, SimConfig(build_policy("lru", transfer="swap"), cache_experts=2))
    # on the compute stream: 2 + 1 + 1 + 0.5 + 0.5, and the decode swaps write the evicted experts back
    assert serialized.ttft_mean_s == approx(5 * MS)
    assert serialized.tpot_mean_s == approx(7 * MS)


def test_shared_hardware_slows_compute_and_copies_where_they_overlap(tmp_path):
    """A CPU standing in for the device: FFNs run at half speed beside a copy, copies at a third beside an FFN."""
    import dataclasses

    path = write_tiny_trace(tmp_path / "t.parquet", [[[0, 1]], [[2, 3]]], prompt=1, top_k=2)
    prof = dataclasses.replace(profile(expert_s=0.5 * MS), compute_slowdown_with_copy=2.0,
                               copy_slowdown_with_compute=3.0)
    r = simulate(path, prof, SimConfig(get_preset("lru"), cache_experts=2))
    # copy 0 lands at 3 ms; FFN 0 starts beside copy 1 (3-4 ms alone): FFN 0 takes 1 ms instead of 0.5,
    # copy 1 gets a third of a millisecond done by 4 and the remaining 2/3 ms alone (ends 4.667); FFN 1 then
    assert r.ttft_mean_s == approx((5 + 1 / 6) * MS)
    assert r.tpot_mean_s == approx((5 + 1 / 6) * MS)
    # copies on the compute stream never overlap compute: the slowdowns change nothing
    serialized = simulate(path, prof, SimConfig(build_policy("lru", transfer="swap"), cache_experts=2))
    assert serialized.ttft_mean_s == approx(5 * MS) and serialized.tpot_mean_s == approx(7 * MS)
    # the profile's factors survive its JSON form
    from moesim.calib.profile import HardwareProfile

    back = HardwareProfile.from_dict(prof.to_dict())
    assert (back.compute_slowdown_with_copy, back.copy_slowdown_with_compute) == (2.0, 3.0)
    assert "interference" not in profile().to_dict()


def test_the_host_issues_a_layer_while_the_gpu_waits_for_the_previous_layers_copy(tmp_path):
    """A profile that times the non-expert layer's kernels apart (0.25 ms) from its host-to-host time (2 ms,
    launch-bound): the host launches the next layer while the GPU waits for a copy, and the router's
    read-back waits for both."""
    import dataclasses

    from moesim.calib.profile import HardwareProfile
    from moesim.tracer import load_shape

    # two layers, one slot each; the prompt and the decode token miss at both layers; a copy takes 5 ms
    path = write_tiny_trace(tmp_path / "t.parquet", [[[0], [0]], [[1], [1]]], prompt=1)
    slow = profile(h2d_bytes_per_s=EXPERT_BYTES / (5 * MS))
    split = dataclasses.replace(slow, non_expert_device_models={
        "bf16": {"prefill": _const(0.25 * MS), "decode": _const(0.25 * MS)}})
    config = SimConfig(get_preset("lru"), cache_experts=1)
    base = simulate(path, slow, config)
    # attention 2, copy 5, FFN 1, attention 2, copy 5, FFN 1
    assert base.ttft_mean_s == approx(16 * MS) and base.tpot_mean_s == approx(16 * MS)
    r = simulate(path, split, config)
    # layer 0 as before (the host launches it: 2 ms; copy 2-7, FFN 7-8); the host launched layer 1 from 2 to
    # 4 ms, so its kernels run right after the FFN: 8-8.25; copy 8.25-13.25, FFN to 14.25
    assert r.ttft_mean_s == approx(14.25 * MS) and r.tpot_mean_s == approx(14.25 * MS)
    assert replay_path_of(path, split, config) == "compiled"  # the numbers above are the compiled replay's
    on_engine = simulate(path, split, config, compiled=False)
    assert on_engine.ttft_mean_s == approx(14.25 * MS) and on_engine.tpot_mean_s == approx(14.25 * MS)
    assert r.hit_rate == base.hit_rate and r.h2d_bytes == base.h2d_bytes
    # kernels as long as the launches: nothing to hide, the same times as without the split
    same = dataclasses.replace(slow, non_expert_device_models={
        "bf16": {"prefill": _const(2 * MS), "decode": _const(2 * MS)}})
    assert simulate(path, same, config).tpot_mean_s == approx(base.tpot_mean_s)
    # the split survives the profile's JSON; a profile without one writes no field for it
    back = HardwareProfile.from_dict(split.to_dict())
    assert back.non_expert_device_models.keys() == {"bf16"} and "non_expert_device" not in slow.to_dict()
    assert back.non_expert_time(load_shape(str(path)), "decode", 1, 16, device_only=True) == approx(0.25 * MS)


def test_cpu_expert_costs_activations_both_ways_plus_the_cpu_ffn(tmp_path):
    path = write_tiny_trace(tmp_path / "t.parquet", [[[0]], [[1]]], prompt=1)
    prof = profile()
    r = simulate(path, prof, SimConfig(build_policy("lru", placement="fiddler", placement_rule="code"),
                                       cache_experts=0))
    act = 64 * 2  # one token of hidden size 64 at 16 bit
    cpu_layer = act / BW + 4 * MS + act / BW
    assert r.ttft_mean_s == approx(2 * MS + cpu_layer)
    assert r.tpot_mean_s == approx(2 * MS + cpu_layer)
    assert r.cpu_expert_fraction == approx(1.0)
    assert r.h2d_bytes == act * 2 and r.d2h_bytes == act * 2


def test_fiddler_profile_rule_copies_when_the_cpu_is_slower(tmp_path):
    path = write_tiny_trace(tmp_path / "t.parquet", [[[0]], [[1]]], prompt=1)
    slow_cpu = simulate(path, profile(cpu_expert_s=5 * MS),
                        SimConfig(build_policy("lru", placement="fiddler"), cache_experts=1))
    assert slow_cpu.cpu_expert_fraction == 0.0  # 5 ms on the CPU > 1 ms copy
    fast_cpu = simulate(path, profile(cpu_expert_s=0.2 * MS),
                        SimConfig(build_policy("lru", placement="fiddler"), cache_experts=1))
    assert fast_cpu.cpu_expert_fraction == 1.0


def test_batch_decodes_requests_together_and_prefills_them_in_turn(tmp_path):
    path = write_tiny_trace(tmp_path / "t.parquet", [[[0]], [[1]], [[1]]], prompt=1, requests=2)
    r = simulate(path, profile(), SimConfig(get_preset("lru"), cache_experts=1, batch=2))
    # prefill r0: miss, 4 ms; prefill r1: hit, 3 ms; decode: miss 4 ms (expert 1 for both), hit 3 ms
    assert r.ttft_mean_s == approx(5.5 * MS)
    assert r.tpot_mean_s == approx((7 + 4 + 3 + 3) / 4 * MS)
    assert r.makespan_s == approx(14 * MS)
    assert r.h2d_bytes == 2 * EXPERT_BYTES  # the union is loaded once per step


def test_oracle_prefetch_hides_the_next_layers_copy(tmp_path):
    path = write_tiny_trace(tmp_path / "t.parquet", [[[0], [0]], [[0], [1]]], prompt=1)
    plain = simulate(path, profile(), SimConfig(get_preset("lru"), cache_experts=2))
    oracle = simulate(path, profile(), SimConfig(build_policy("lru", prefetch="oracle"), cache_experts=2))
    assert plain.ttft_mean_s == approx(8 * MS)  # 2+1+1, then 2+1+1
    assert plain.tpot_mean_s == approx(7 * MS)  # 2+1 hit, then 2+1+1 miss
    # the copy of layer 1's expert runs during layer 0 and is ready when layer 1 needs it
    assert oracle.ttft_mean_s == approx(7 * MS)
    assert oracle.tpot_mean_s == approx(6 * MS)
    assert oracle.prefetch_issued == 2
    assert oracle.prefetch_precision == approx(1.0)
    assert oracle.prefetch_recall == approx(1.0)
    assert oracle.hit_rate == approx(1.0)


def test_adapmoe_buffer_prefetch_is_used_only_when_the_guess_is_right(tmp_path):
    tokens = [[[0], [0]], [[0], [1]], [[0], [2]]]
    guesses = [[[0], [-1]], [[1], [-1]], [[3], [-1]]]  # right for token 1, wrong for token 2
    path = write_tiny_trace(tmp_path / "t.parquet", tokens, prompt=1, guesses=guesses)
    policy = build_policy("lru", prefetch="first-non-resident", gating="off")
    r = simulate(path, profile(), SimConfig(policy, cache_experts=1))
    assert r.guess_source == "trace"
    assert r.prefetch_issued == 2
    assert r.prefetch_precision == approx(0.5)
    assert r.prefetch_recall == approx(0.5)
    # token 1: layer 1's copy runs beside layer 0's FFN, so 2+1 then 2+1 = 6 ms;
    # token 2: the guess (expert 3) was wrong, its buffer is released and expert 2 is copied on demand: 7 ms
    assert r.tpot_mean_s == approx(6.5 * MS)
    assert r.tpot_p90_s == approx((6 + 0.9 * 1) * MS)


def test_does_not_fit_is_reported_not_simulated(tmp_path):
    path = write_tiny_trace(tmp_path / "t.parquet", [[[0]], [[1]]], prompt=1)
    r = simulate(path, profile(memory_bytes=EXPERT_BYTES), SimConfig(get_preset("all-gpu")))
    assert not r.feasible
    assert "needs" in r.reason and "MiB" in r.reason
    assert r.tpot_mean_s != r.tpot_mean_s  # NaN: nothing was simulated
    roomy = simulate(path, profile(), SimConfig(get_preset("all-gpu")))
    assert roomy.feasible and roomy.hit_rate == 1.0 and roomy.h2d_bytes == 0


def test_peak_memory_is_the_sum_of_its_parts(tmp_path):
    path = write_tiny_trace(tmp_path / "t.parquet", [[[0], [1]], [[1], [2]]], prompt=1)
    r = simulate(path, profile(reserve_bytes=1000), SimConfig(get_preset("mixtral-offloading"), cache_experts=2))
    m = r.memory
    assert m.cache_bytes == 2 * 2 * EXPERT_BYTES  # 2 slots in each of 2 layers
    assert m.staging_bytes == 4 * EXPERT_BYTES  # buffer_size=4
    assert m.reserve_bytes == 1000
    assert m.non_expert_bytes == 50_000 * 2
    assert m.kv_cache_bytes > 0 and m.activation_bytes > 0
    assert r.peak_gpu_mib == pytest.approx(m.total_bytes / 2**20)


def test_gpu_mem_sizes_the_cache_to_what_is_left(tmp_path):
    path = write_tiny_trace(tmp_path / "t.parquet", [[[0], [1]], [[1], [2]]], prompt=1)
    prof = profile()
    small = simulate(path, prof, SimConfig(get_preset("lru"), cache_experts=0))
    fixed = small.memory.total_bytes
    budget = fixed + 2 * 3 * EXPERT_BYTES + 100  # room for 3 experts in each of 2 layers
    r = simulate(path, prof, SimConfig(get_preset("lru"), gpu_mem_bytes=budget))
    assert r.cache_slots == 6
    assert r.memory.total_bytes <= budget


def test_copies_on_the_legacy_default_stream_never_overlap_compute(tmp_path):
    """MoE-Infinity 2024's cudaMemcpy on the default stream: the second copy no longer hides behind FFN 0."""
    import dataclasses

    path = write_tiny_trace(tmp_path / "t.parquet", [[[0, 1]], [[2, 3]]], prompt=1, top_k=2)
    prof = profile(expert_s=0.5 * MS)
    lru = get_preset("lru")
    default_stream = lru.with_parts(transfer=dataclasses.replace(lru.transfer, default_stream=True))
    r = simulate(path, prof, SimConfig(default_stream, cache_experts=2))
    # copies 2-3 and 3-4 ms; FFN 0 waits for copy 1 in flight (4-4.5), FFN 1 after it: 2 + 1 + 1 + 0.5 + 0.5
    assert r.ttft_mean_s == approx(5 * MS) and r.tpot_mean_s == approx(5 * MS)
    assert r.stall_s == approx(2 * 2 * MS)  # per step: 1 ms waiting for copy 0, 1 ms for copy 1 beside FFN 0
    assert simulate(path, prof, SimConfig(lru, cache_experts=2)).tpot_mean_s == approx(4.5 * MS)
    from moesim.simulator.timeline import Timeline

    timeline = Timeline()
    simulate(path, prof, SimConfig(default_stream, cache_experts=2), timeline=timeline)
    copies = [(s, s + d) for tid, name, s, d in timeline.events if name.startswith("load")]
    kernels = [(s, s + d) for tid, name, s, d in timeline.events if name.startswith("expert")]
    assert len(copies) == 4 and len(kernels) == 4  # the timeline draws them taking turns too
    assert all(ke <= cs + 1e-12 or ce <= ks + 1e-12 for cs, ce in copies for ks, ke in kernels)
