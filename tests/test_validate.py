"""`moesim validate`: the engine and the simulator make identical decisions; reports and bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import TEST_DEVICE, random_cells, tiny_meta, tiny_shape
from moesim.cli import cli
from moesim.engine.policies import DecisionLog, simulate_with_log
from moesim.engine.validate import ValidateOptions, Validator, compare
from moesim.simulator.config import SimConfig
from moesim.simulator.presets import PRESETS, get_preset
from moesim.simulator.run import simulate
from moesim.tracer import write_trace

TINY_CONFIG = dict(model_type="mixtral", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=100, num_local_experts=8,
                   num_experts_per_tok=2, max_position_embeddings=256)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate")
    (root / "config.json").write_text(json.dumps(TINY_CONFIG))
    cells = random_cells(np.random.default_rng(0), requests=2, prompt=5, decode=6)
    cells.next_layer_guess = np.where(cells.layer[:, None] < 2, np.roll(cells.experts, 1, axis=1), -1).astype(np.int16)
    trace = write_trace(root / "tiny.parquet", tiny_meta(tiny_shape()), cells)
    return root, trace


@pytest.fixture(scope="module")
def validator(tiny):
    root, trace = tiny
    # a spec-derived GPU profile: decisions, bytes and memory do not depend on where the engine runs
    return Validator(ValidateOptions(trace=str(trace), model_config=str(root / "config.json"), cache_experts=3,
                                     device=TEST_DEVICE, profile="rtx-3060", requests=None, decode_tokens=None,
                                     warmup_steps=2, out=root / "out"))


def test_every_preset_makes_the_simulators_decisions(validator):
    """Same calls on the same objects: identical decision logs, hit rates, bytes and device tensors."""
    timed_cpu_experts = []
    for policy in PRESETS.names():
        sim, sim_log = validator.predict(policy)
        # the policy objects built by the engine's copy of run_prepared give simulate()'s own result
        direct = simulate(validator.fitted, validator.profile,
                          SimConfig(policy=get_preset(policy).with_parts(released_code_costs=False),
                                    cache_experts=3, batch=1))
        assert sim.to_row() == direct.to_row() | {"trace": sim.label.trace, "run_key": sim.label.key()}, policy
        m = validator.measure(policy)
        assert sim_log.first_difference(m.log) is None, policy
        assert len(sim_log) > 0
        report = compare(validator, policy, sim, sim_log, [m])
        assert report.decisions_identical
        for metric in ("hit rate (decode)", "hit rate (prefill)", "host->device bytes", "device->host bytes",
                       "prefetches issued", "CPU expert fraction (decode)"):
            row = report.row(metric)
            assert row.predicted == pytest.approx(row.measured, nan_ok=True), (policy, metric)
        if TEST_DEVICE == "cpu":
            mem = report.row("device tensors (weights, expert buffers, KV)")
            if m.stats.extra_buffers == 0:
                assert mem.error == pytest.approx(0.0, abs=1e-9), policy
            else:  # bypassed loads the memory plan gives no staging buffer: the engine needs real memory for them
                assert mem.measured > mem.predicted
        else:  # a GPU's allocator holds the planned tensors and the kernels' workspaces besides
            assert report.row("peak device memory (allocator)") is not None
            assert m.memory.peak_allocated_bytes >= sum(m.memory.parts.values()), policy
        assert all(math.isfinite(r.measured) for r in report.rows if r.metric.startswith("TPOT"))
        assert m.stats.decode_tokens == 12 and len(m.stats.ttft) == 2
        # every CPU-placed expert is timed: its forward on the host, inside the time with its activation copies
        assert all(0 < fwd <= whole for _, fwd, whole, _ in m.stats.cpu_expert_times), policy
        if report.row("CPU expert fraction (decode)").measured > 0:
            cpu = report.diagnostics["cpu_expert_1tok_ms"]
            assert cpu["measured_median"] > 0 and cpu["profile"] > 0, policy
            timed_cpu_experts.append(policy)
        else:
            assert "cpu_expert_1tok_ms" not in report.diagnostics, policy
    assert "fiddler" in timed_cpu_experts


def test_a_finished_runs_buffers_are_freed_before_the_next_run_is_measured(validator):
    """On an H100 every policy measured after the first counted the previous run's 32 expert buffers
    (10.9 GB) in its peak memory: the finished run sat in a reference cycle until a later collection."""
    import weakref

    validator.measure("lru")
    pool = weakref.ref(validator.engine._pool)
    validator.engine.release_buffers()
    assert pool() is None


def test_decision_logs_detect_a_different_decision(validator):
    sim, sim_log = validator.predict("lru")
    other = DecisionLog(list(sim_log.calls))
    other.calls[5] = ("access", -1)
    assert sim_log.first_difference(other) == 5
    assert sim_log.first_difference(DecisionLog(sim_log.calls[:-1])) == len(sim_log) - 1
    _, fifo_log = validator.predict("fifo")
    assert sim_log.first_difference(fifo_log) is not None


def test_simulate_with_log_reports_what_does_not_fit(validator):
    from dataclasses import replace

    prep = validator.prepare("all-gpu")
    tiny_plan = replace(prep.plan, fits=False, reason="needs more")
    assert not simulate_with_log(replace(prep, plan=tiny_plan)).feasible


def test_cli_writes_json_and_markdown(tiny, tmp_path):
    root, trace = tiny
    out = tmp_path / "rep"
    res = CliRunner().invoke(cli, ["validate", "--trace", str(trace), "--model-config", str(root / "config.json"),
                                   "--policy", "lru,mixtral-offloading", "--cache-experts", "2", "--profile", "rtx-3060",
                                   "--decode-tokens", "3", "--requests", "1", "--warmup-steps", "1", "--repeats", "2",
                                   "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "| lru |" in res.output and "identical" in res.output
    data = json.loads((out / "validate-cpu-bf16.json").read_text())
    assert [p["policy"] for p in data["presets"]] == ["lru", "mixtral-offloading"]
    lru = data["presets"][0]
    assert lru["repeats"] == 2 and lru["decisions_identical"] is True
    assert {r["metric"] for r in lru["rows"]} >= {"TTFT mean", "TPOT mean", "TPOT p50", "TPOT p90", "hit rate (decode)"}
    assert data["trace"]["decode_tokens"] == [3] and data["environment"]["software"]["torch"]
    md = (out / "validate-cpu-bf16.md").read_text()
    assert "## Summary" in md and "TPOT mean" in md and "rtx-3060" in md
    assert (out / "trace-tiny-fit-cpu-bf16.parquet").exists()
    # validate flushes denormals while it measures on a CPU, and leaves the process as it found it
    assert torch.tensor([1e-310], dtype=torch.float64).mul(1.0).item() > 0.0


@pytest.mark.parametrize("args, message", [
    (["--layers", "0"], "--layers 0: expected 1..3"),
    (["--policy", "nope"], "--policy policy 'nope'"),
    (["--expert-format", "int4"], "--expert-format int4: cannot pack"),
    (["--profile", "no-such-profile"], "profile 'no-such-profile'"),
    (["--decode-tokens", "-2"], "--decode-tokens -2"),
    (["--model", "/nonexistent/ckpt"], "--model /nonexistent/ckpt: expected a Hugging Face checkpoint folder"),
    (["--trace", "/nonexistent.parquet"], "trace '/nonexistent.parquet'"),
    # the run's counts against the trace, before the weights load (the report recorded them as run)
    (["--requests", "5"], "--requests 5: the trace holds"),
    (["--decode-tokens", "100000"], "--decode-tokens 100000: the trace's requests have at most"),
    (["--threads", "0"], "--threads 0: expected 1 or more"),
    (["--repeats", "0"], "--repeats 0: expected 1 or more"),
    (["--policy", "fiddler", "--all-presets", None], "--all-presets and --policy: give one"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path, args, message):
    root, trace = tiny
    base = {"--trace": str(trace), "--model-config": str(root / "config.json"), "--cache-experts": "2",
            "--profile": "rtx-3060", "--decode-tokens": "2"}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    argv = ["validate", "--out", str(tmp_path / "o"), "--quiet"] + [x for kv in base.items() for x in kv
                                                                     if x is not None]  # None: a flag
    res = CliRunner().invoke(cli, argv)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not list((tmp_path / "o").glob("*.json"))


def test_cli_needs_a_profile(tiny, tmp_path):
    root, trace = tiny
    res = CliRunner().invoke(cli, ["validate", "--trace", str(trace), "--cache-experts", "2", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "expected --profile P" in res.output


def test_validate_runs_composed_policies(tiny, tmp_path):
    """A preset with parts replaced is validated like a preset: the engine makes the simulator's decisions."""
    root, trace = tiny
    out = tmp_path / "rep"
    res = CliRunner().invoke(cli, ["validate", "--trace", str(trace), "--model-config", str(root / "config.json"),
                                   "--policy", "lru+scope=global,lru+prefetch=oracle+eviction=lfu",
                                   "--cache-experts", "2", "--profile", "rtx-3060", "--decode-tokens", "3",
                                   "--requests", "1", "--warmup-steps", "1", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "validate-cpu-bf16.json").read_text())
    assert [p["policy"] for p in data["presets"]] == ["lru+scope=global", "lru+eviction=lfu+prefetch=oracle"]
    assert all(p["decisions_identical"] for p in data["presets"])
    bad = CliRunner().invoke(cli, ["validate", "--trace", str(trace), "--model-config", str(root / "config.json"),
                                   "--policy", "lru+scope=world", "--cache-experts", "2", "--profile", "rtx-3060",
                                   "--out", str(tmp_path / "bad"), "--quiet"])
    assert bad.exit_code == 2 and "scope 'world': expected one of layer, global" in bad.output


def test_progress_off_a_terminal_is_plain_lines_through_the_log(tiny):
    from moesim.engine.validate import run_validation

    root, trace = tiny
    said: list[str] = []
    run_validation(ValidateOptions(trace=str(trace), model_config=str(root / "config.json"), cache_experts=2,
                                   device=TEST_DEVICE, profile="rtx-3060", requests=1, decode_tokens=3, warmup_steps=1,
                                   repeats=2, policies=("lru", "fifo"), log=said.append))
    lines = [ln for ln in said if ln.startswith("validate: ")]
    assert [ln.split(" (")[0] for ln in lines] == [f"validate: {n}/4 run" for n in (1, 2, 3, 4)]
    assert "run/s, ETA" in lines[0] and lines[-1].startswith("validate: 4/4 run (100%)")
