"""The exactness contract of the event-free copy path: for every preset, on every bundled trace (and a batched
synthetic trace, and profiles where copies and compute contend or where every time is a round number, so
simultaneous events are common), the clocked lanes give the SimResult of the engine with a SimPy event per
copy (``exact_events=True``, kept for one release as the oracle): hit rates, bytes and decision counts
identical, times within 1e-9 relative, and the same timeline."""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import numpy as np
import pytest

from moesim.simulator.config import SimConfig
from moesim.simulator.presets import PRESETS, get_preset
from moesim.simulator.run import load_profile_cached, load_trace_cached, simulate
from moesim.simulator.timeline import Timeline
from moesim.tracer import DECODE, PREFILL, Trace
from moesim.tracer.routing import read_routing
from moesim.tracer.synth import synthetic_trace
from moesim.traces import bundled_traces
from test_sim_support import EXPERT_BYTES, _const, replay_path_of, round_profile, write_tiny_trace

BUNDLED = ("qwen3-30b-a3b-bigmoeonedge", "gemma-4-26b-a4b-bigmoeonedge", "gpt-oss-120b-bigmoeonedge")
DECODE_TOKENS = 32  # the head of each bundled trace: every preset's paths, in a test-suite budget
REL = 1e-9


def head(trace: Trace, decode_tokens: int) -> Trace:
    """The prompt and the first ``decode_tokens`` decode tokens, as an in-memory trace (no path: the
    compiled-workload disk cache must not serve the whole file's workload for it)."""
    prompt_end = int(trace.position[trace.phase == PREFILL].max(initial=-1)) + 1
    keep = np.flatnonzero(trace.position < prompt_end + decode_tokens)
    return Trace(meta=trace.meta, cells=trace.cells.take(keep))


@functools.lru_cache(maxsize=None)
def bundled_head(name: str) -> Trace:
    """One object per trace for the whole module, so per-trace memos (the predictor's output) are reused."""
    paths = bundled_traces()
    if name not in paths:
        pytest.skip(f"bundled trace {name} not present")
    return head(load_trace_cached(paths[name]), DECODE_TOKENS)


def differences(old, new) -> list[str]:
    """The fields where ``new`` breaks the contract against ``old``."""
    out = []
    for f in dataclasses.fields(old):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a == b:
            continue
        pairs = list(zip(a, b)) if isinstance(a, tuple) and len(a) == len(b) else [(a, b)]
        if all(isinstance(x, float) and isinstance(y, float)
               and ((math.isnan(x) and math.isnan(y)) or abs(x - y) <= REL * max(abs(x), abs(y)))
               for x, y in pairs):
            continue
        out.append(f"{f.name}: events {a!r} != clocked {b!r}")
    return out


def assert_same(trace, profile, config: SimConfig) -> None:
    tl_old, tl_new = Timeline(), Timeline()
    old = simulate(trace, profile, config, timeline=tl_old, exact_events=True)
    new = simulate(trace, profile, config, timeline=tl_new)
    assert differences(old, new) == [], config.policy.name
    assert [e[:2] for e in tl_old.events] == [e[:2] for e in tl_new.events]
    times_old = np.array([e[2:] for e in tl_old.events], dtype=float).reshape(-1, 2)
    times_new = np.array([e[2:] for e in tl_new.events], dtype=float).reshape(-1, 2)
    np.testing.assert_allclose(times_new, times_old, rtol=REL, atol=0)


@pytest.mark.parametrize("trace_name", BUNDLED)
@pytest.mark.parametrize("preset", PRESETS.names())
def test_clocked_lanes_equal_the_event_engine_on_every_preset_and_bundled_trace(trace_name, preset):
    trace = bundled_head(trace_name)
    for cache_experts in (2, 6):
        assert_same(trace, load_profile_cached("rtx-3060"), SimConfig(get_preset(preset), cache_experts=cache_experts))


@pytest.mark.parametrize("preset", PRESETS.names())
def test_clocked_lanes_equal_the_event_engine_where_events_tie_or_contend(preset):
    # round numbers: copies and experts end at the same instants, so the order of simultaneous events decides
    # which queued copy a lane serves next; cpu-calibrated: copies and compute stretch each other
    trace = bundled_head("gpt-oss-120b-bigmoeonedge")
    for profile in (round_profile(), load_profile_cached("cpu-calibrated")):
        for cache_experts in (1, 4):
            config = SimConfig(get_preset(preset), cache_experts=cache_experts, gpu_mem_bytes=1 << 40)
            assert_same(trace, profile, config)


@pytest.mark.parametrize("preset", ["lru", "adapmoe", "fiddler", "hybrimoe", "moe-infinity", "mixtral-offloading"])
def test_clocked_lanes_equal_the_event_engine_on_batched_requests(preset):
    routing = read_routing("mixtral-8x7b-published")
    trace = synthetic_trace(routing, np.full(6, 5), np.array([12, 9, 12, 4, 7, 12]), seed=3)
    assert int((trace.phase == DECODE).sum()) > 0
    for batch in (1, 3):
        config = SimConfig(get_preset(preset), cache_experts=3, gpu_mem_bytes=1 << 40, batch=batch)
        assert_same(trace, load_profile_cached("rtx-4090"), config)
        assert_same(trace, round_profile(), config)


def dyadic_profile():
    """Every duration a power of two (a copy, an expert, a CPU expert, a layer's attention): sums are exact in
    floating point, so lanes and the compute stream keep finishing at the same instants."""
    return round_profile(h2d_bytes_per_s=EXPERT_BYTES * 1024.0, d2h_bytes_per_s=EXPERT_BYTES * 2048.0,
                         expert_s=2.0 ** -10, cpu_expert_s=2.0 ** -9, non_expert_s=2.0 ** -11, pageable_factor=2.0)


@pytest.mark.parametrize("preset", PRESETS.names())
def test_clocked_lanes_keep_simpys_order_of_simultaneous_events(preset, tmp_path):
    rng = np.random.default_rng(11)
    profile = dyadic_profile()
    for seed in range(6):
        tokens = [[sorted(rng.choice(4, size=2, replace=False).tolist()) for _ in range(3)] for _ in range(14)]
        guesses = [[rng.choice(4, size=2, replace=False).tolist() for _ in range(3)] for _ in range(14)]
        path = write_tiny_trace(tmp_path / f"t{seed}.parquet", tokens, prompt=2, top_k=2, guesses=guesses,
                                requests=2)
        trace = load_trace_cached(path)
        for cache_experts in (1, 2, 3):
            for batch in (1, 2):
                config = SimConfig(get_preset(preset), cache_experts=cache_experts, gpu_mem_bytes=1 << 40,
                                   batch=batch)
                assert_same(trace, profile, config)


def test_simulate_engine_events_writes_the_same_json_and_timeline(tmp_path):
    from click.testing import CliRunner

    from moesim.cli import cli

    out = {}
    for engine in ("clocked", "events"):
        js, tl = tmp_path / f"{engine}.json", tmp_path / f"{engine}.tl.json"
        res = CliRunner().invoke(cli, ["simulate", "--trace", "gpt-oss-120b-bigmoeonedge", "--policy", "hybrimoe",
                                       "--cache-experts", "4", "--profile", "rtx-3060", "--engine", engine,
                                       "--json", str(js), "--timeline", str(tl)], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        out[engine] = (js.read_text(), tl.read_text())
    assert out["clocked"] == out["events"]


# ---- the compiled replay (simulator/kernel.py) against the engine it replaces --------------------------------
# The presets it covers; a preset dropped from the kernel (or a run it gets wrong) fails here.
COMPILED = ("lru", "lfu", "fifo", "static", "all-gpu", "accelerate", "mixtral-offloading", "moe-infinity", "fiddler",
            "hybrimoe", "belady", "mixtral-offloading-paper", "adapmoe", "predictive", "moe-infinity-2024",
            "moe-infinity-2024+prefetch=none", "llama-cpp", "ktransformers")


def preset_spec(name: str):
    """A preset, or a preset with a part replaced (``name+part=value``)."""
    from moesim.simulator.compose import build_policy

    return build_policy(name) if "+" in name else get_preset(name)


def value_types(result) -> list:
    out = []
    for f in dataclasses.fields(result):
        value = getattr(result, f.name)
        out.append((f.name, type(value), tuple(type(x) for x in value) if isinstance(value, tuple) else ()))
    return out


def assert_compiled_same(trace, profile, config: SimConfig) -> str:
    """The compiled replay's result equals the engine's; returns which path the default run took."""
    old = simulate(trace, profile, config, compiled=False)
    new = simulate(trace, profile, config)
    assert differences(old, new) == [], config.policy.name
    assert value_types(new) == value_types(old), config.policy.name  # a numpy scalar would print differently
    return replay_path_of(trace, profile, config)


def check_path(preset: str, path: str) -> None:
    if path == "does not fit":
        return
    assert (path == "compiled") == (preset in COMPILED), (preset, path)


@pytest.mark.parametrize("trace_name", BUNDLED)
@pytest.mark.parametrize("preset", PRESETS.names() + ["moe-infinity-2024+prefetch=none"])
def test_compiled_replay_equals_the_engine_on_every_preset_and_bundled_trace_head(trace_name, preset):
    trace = bundled_head(trace_name)
    for cache_experts in (1, 2, 6):
        config = SimConfig(preset_spec(preset), cache_experts=cache_experts)
        check_path(preset, assert_compiled_same(trace, load_profile_cached("rtx-3060"), config))


@pytest.mark.parametrize("trace_name", BUNDLED)
@pytest.mark.parametrize("preset", COMPILED)
def test_compiled_replay_equals_the_engine_on_whole_bundled_traces(trace_name, preset):
    paths = bundled_traces()
    if trace_name not in paths:
        pytest.skip(f"bundled trace {trace_name} not present")
    trace = load_trace_cached(paths[trace_name])
    for cache_experts in (2, 6):
        config = SimConfig(preset_spec(preset), cache_experts=cache_experts, gpu_mem_bytes=1 << 40)
        assert assert_compiled_same(trace, load_profile_cached("rtx-4090"), config) == "compiled"


@functools.lru_cache(maxsize=None)
def mixtral_shaped() -> Trace:
    """Mixtral-8x7B's shape (32 layers, 8 experts, top-2), 4 requests x 250 decode tokens: 64,000 activations."""
    routing = read_routing("mixtral-8x7b-published")
    return synthetic_trace(routing, np.full(4, 16), np.full(4, 250), seed=5)


@pytest.mark.parametrize("preset", COMPILED)
def test_compiled_replay_equals_the_engine_on_a_64k_activation_mixtral_workload_batched(preset):
    trace = mixtral_shaped()
    assert int((trace.phase == DECODE).sum()) * trace.meta.top_k == 64_000
    for batch in (1, 4):
        for cache_experts in (2, 5):
            config = SimConfig(preset_spec(preset), cache_experts=cache_experts, gpu_mem_bytes=1 << 40, batch=batch)
            assert assert_compiled_same(trace, load_profile_cached("rtx-4090"), config) == "compiled"


@pytest.mark.parametrize("preset", PRESETS.names() + ["moe-infinity-2024+prefetch=none"])
def test_compiled_replay_keeps_simpys_order_of_simultaneous_events(preset, tmp_path):
    # power-of-two durations: copies land at the instant the compute stream stops to look, where the order of
    # the clocked lane's events (not the times) decides a stall; round numbers and a global pool of bytes too
    rng = np.random.default_rng(12)
    for seed in range(4):
        tokens = [[sorted(rng.choice(4, size=2, replace=False).tolist()) for _ in range(3)] for _ in range(14)]
        path = write_tiny_trace(tmp_path / f"t{seed}.parquet", tokens, prompt=2, top_k=2, requests=2)
        trace = load_trace_cached(path)
        for profile in (dyadic_profile(), round_profile()):
            for cache_experts in (1, 2, 3):
                for batch in (1, 2):
                    config = SimConfig(preset_spec(preset), cache_experts=cache_experts, gpu_mem_bytes=1 << 40,
                                       batch=batch)
                    check_path(preset, assert_compiled_same(trace, profile, config))


@functools.lru_cache(maxsize=1)
def h100_validation_profile():
    """The H100 profile of validation/ (calibrated before the GPU runs): it times the non-expert layer's kernels
    apart from its launches, so the host issues a layer while the GPU works through its backlog."""
    from moesim.calib.profile import load_profile

    profile = load_profile(str(Path(__file__).resolve().parents[1] / "validation" / "profile-cuda-validate.json"))
    assert profile.non_expert_device_models
    return profile


@pytest.mark.parametrize("preset", PRESETS.names() + ["moe-infinity-2024+prefetch=none"])
def test_compiled_replay_equals_the_engine_where_the_host_issues_ahead(preset, tmp_path):
    profile = h100_validation_profile()
    trace = bundled_head("qwen3-30b-a3b-bigmoeonedge")
    for cache_experts in (1, 2, 6):
        config = SimConfig(preset_spec(preset), cache_experts=cache_experts, gpu_mem_bytes=1 << 40)
        check_path(preset, assert_compiled_same(trace, profile, config))
    # batched decode, and tiny traces with round kernel times (0.25 of a 2 ms launch-bound layer)
    routing = read_routing("mixtral-8x7b-published")
    batched = synthetic_trace(routing, np.full(3, 5), np.array([12, 9, 7]), seed=3)
    config = SimConfig(preset_spec(preset), cache_experts=3, gpu_mem_bytes=1 << 40, batch=3)
    check_path(preset, assert_compiled_same(batched, profile, config))

    split = dataclasses.replace(round_profile(), non_expert_device_models={
        "bf16": {"prefill": _const(0.5e-3), "decode": _const(0.5e-3)}})
    rng = np.random.default_rng(13)
    tokens = [[sorted(rng.choice(4, size=2, replace=False).tolist()) for _ in range(3)] for _ in range(10)]
    tiny = load_trace_cached(write_tiny_trace(tmp_path / "t.parquet", tokens, prompt=2, top_k=2, requests=2))
    for cache_experts in (1, 2):
        config = SimConfig(preset_spec(preset), cache_experts=cache_experts, gpu_mem_bytes=1 << 40, batch=2)
        check_path(preset, assert_compiled_same(tiny, split, config))


def test_runs_the_compiled_replay_cannot_reproduce_take_the_engine():
    from moesim.simulator.run import build_policy_objects, prepare, replay_path

    trace = bundled_head("gpt-oss-120b-bigmoeonedge")
    prep = prepare(trace, load_profile_cached("rtx-3060"), SimConfig(get_preset("lru"), cache_experts=2))
    objs = build_policy_objects(prep)
    assert replay_path(prep, objs) == "compiled"
    assert replay_path(prep, objs, timeline=Timeline()) == "engine: a timeline is recorded"
    assert replay_path(prep, objs, record_hits=True) == "engine: per-row hits are recorded"
    assert replay_path(prep, objs, exact_events=True) == "engine: the event engine was asked for"
    contended = prepare(trace, load_profile_cached("cpu-calibrated"),
                        SimConfig(get_preset("lru"), cache_experts=2, gpu_mem_bytes=1 << 40))
    assert replay_path(contended, build_policy_objects(contended)).startswith("engine: copies and compute contend")
    from moesim.simulator.compose import build_policy

    for policy, why in (("lru+prefetch=oracle", "prefetch 'oracle'"),
                        ("lfu+prefetch=next-layer", "prefetch into cache 'lfu'"),
                        ("moe-infinity+prefetch=next-layer", "prefetch into cache 'lfu'"),
                        ("lru+eviction=lfu-forget", "cache 'lfu-forget'"),
                        ("moe-infinity-2024+eviction=lfu-forget", "cache 'lfu-forget'"),
                        ("static+prefetch=eam-all", "prefetch into cache 'static'"),
                        ("lru+prefetch=eam-all", "prefetch 'eam-all' whose queue is not replaced at each layer call")):
        other = prepare(trace, load_profile_cached("rtx-3060"), SimConfig(build_policy(policy), cache_experts=2))
        assert replay_path(other, build_policy_objects(other)) == f"engine: {why}", policy
        assert assert_compiled_same(trace, load_profile_cached("rtx-3060"),
                                    SimConfig(build_policy(policy), cache_experts=2)) == f"engine: {why}"
    # eam-all's match sums over more layers or experts than the kernel's pairwise sum reproduces: the engine
    import moesim.simulator.kernel as kernel_module

    wide = prepare(trace, load_profile_cached("rtx-3060"), SimConfig(get_preset("moe-infinity-2024"), cache_experts=2))
    assert replay_path(wide, build_policy_objects(wide)) == "compiled"
    limit = kernel_module.EAM_PAIRWISE_LIMIT
    try:
        kernel_module.EAM_PAIRWISE_LIMIT = min(wide.workload.num_experts, wide.workload.num_layers) - 1
        assert replay_path(wide, build_policy_objects(wide)).startswith("engine: prefetch 'eam-all' over more than")
    finally:
        kernel_module.EAM_PAIRWISE_LIMIT = limit
    # the hit records of a run the kernel would cover come from the engine, and agree with its counters
    result, hits = simulate(trace, "rtx-3060", SimConfig(get_preset("lru"), cache_experts=2), record_hits=True)
    assert differences(simulate(trace, "rtx-3060", SimConfig(get_preset("lru"), cache_experts=2)), result) == []
    assert hits.any()


def test_a_first_run_on_a_terminal_says_the_replay_is_being_compiled(monkeypatch, capsys):
    import io

    import moesim.simulator.kernel as kernel_module

    trace = bundled_head("qwen3-30b-a3b-bigmoeonedge")
    simulate(trace, "rtx-3060", SimConfig(get_preset("lru"), cache_experts=2))  # compiled, or loaded from disk
    assert kernel_module.compiled_on_disk()

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for cached, said in ((False, True), (True, False)):
        terminal = Terminal()
        monkeypatch.setattr(kernel_module.sys, "stderr", terminal)
        monkeypatch.setattr(kernel_module, "compiled_on_disk", lambda: cached)
        monkeypatch.setattr(kernel_module, "_REPLAY", None)
        kernel_module._compiled()
        assert ("compiling the simulator's replay kernel" in terminal.getvalue()) is said


def test_importing_the_simulator_or_asking_for_help_does_not_import_numba():
    import subprocess
    import sys

    probe = ("import sys\nimport moesim.simulator.run, moesim.simulator.kernel\nfrom moesim.cli import main\n"
             "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\nprint('NUMBA', 'numba' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "NUMBA False" in res.stdout


@pytest.mark.parametrize("preset", ["lru", "moe-infinity", "mixtral-offloading", "fiddler", "hybrimoe",
                                    "moe-infinity-2024"])
def test_simulate_json_is_byte_identical_on_the_compiled_replay_and_the_engine(preset, tmp_path):
    from click.testing import CliRunner

    from moesim.cli import cli

    out = {}
    for engine in ("clocked", "python"):
        js = tmp_path / f"{engine}.json"
        res = CliRunner().invoke(cli, ["simulate", "--trace", "qwen3-30b-a3b-bigmoeonedge", "--policy", preset,
                                       "--cache-experts", "8", "--profile", "rtx-3060", "--gpu-mem", "64GiB",
                                       "--engine", engine, "--json", str(js)], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        out[engine] = js.read_text()
    assert out["clocked"] == out["python"]


def moe_infinity_2024_parts() -> list:
    """moe-infinity-2024 with its prefetch limit raised (queued prefetches to drop), with its earlier-layer
    eviction or its default-stream copies switched off, and its prefetch into an LRU cache."""
    base = get_preset("moe-infinity-2024")
    pf, tr = base.prefetch, base.transfer
    return [base.with_parts(name=f"limit={n}", prefetch=dataclasses.replace(pf, limit=n)) for n in (4, 64)] + [
        base.with_parts(name="evicts-any", prefetch=dataclasses.replace(pf, evicts_earlier_layers_only=False)),
        base.with_parts(name="own-stream", transfer=dataclasses.replace(tr, default_stream=False)),
        get_preset("lru").with_parts(name="lru+eam-all", prefetch=dataclasses.replace(pf, limit=2),
                                     transfer=dataclasses.replace(tr, demand_priority=True))]


@pytest.mark.parametrize("index", range(5))
def test_compiled_replay_equals_the_engine_on_moe_infinity_2024s_parts(index, tmp_path):
    spec = moe_infinity_2024_parts()[index]
    for trace in (bundled_head("qwen3-30b-a3b-bigmoeonedge"), mixtral_shaped()):
        for cache_experts, batch in ((1, 1), (3, 1), (3, 4)):
            config = SimConfig(spec, cache_experts=cache_experts, gpu_mem_bytes=1 << 40, batch=batch)
            assert assert_compiled_same(trace, load_profile_cached("rtx-4090"), config) == "compiled", spec.name
    rng = np.random.default_rng(3)
    tokens = [[sorted(rng.choice(4, size=2, replace=False).tolist()) for _ in range(3)] for _ in range(14)]
    trace = load_trace_cached(write_tiny_trace(tmp_path / "t.parquet", tokens, prompt=2, top_k=2, requests=3))
    for profile in (dyadic_profile(), round_profile()):
        for cache_experts in (1, 2, 3):
            config = SimConfig(spec, cache_experts=cache_experts, gpu_mem_bytes=1 << 40, batch=1)
            assert assert_compiled_same(trace, profile, config) == "compiled", spec.name


COMPOSED = ("fiddler+placement-rule=profile", "hybrimoe+placement-rule=code", "lru+scope=global", "fifo+scope=global",
            "lru+transfer=sync", "lfu+transfer=swap", "mixtral-offloading+scope=global", "static+transfer=layer",
            "lru+prefetch=next-layer+transfer=swap", "fifo+prefetch=next-layer", "lru+prefetch=next-layer+scope=global",
            "mixtral-offloading-paper+guess=accuracy:0.3", "lru+placement=fiddler+prefetch=next-layer",
            "adapmoe+transfer=swap", "lru+prefetch=first-non-resident+scope=global")


@pytest.mark.parametrize("policy", COMPOSED)
def test_compiled_replay_equals_the_engine_on_composed_policies(policy):
    from moesim.simulator.compose import build_policy

    spec = build_policy(policy)
    for trace in (bundled_head("qwen3-30b-a3b-bigmoeonedge"), mixtral_shaped()):
        for cache_experts in (1, 3):
            config = SimConfig(spec, cache_experts=cache_experts, gpu_mem_bytes=1 << 40, batch=1)
            assert assert_compiled_same(trace, load_profile_cached("rtx-4090"), config) == "compiled"
