"""`moesim search` and `sweep --screen`'s screening: optimum against exhaustive simulation, constraints,
impossible constraints, quality tables, reports, bad input."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import random_cells, tiny_meta, tiny_shape

from moesim.cli import cli
from moesim.costmodel.model import CostModel
from moesim.costmodel.screen import dominated_mask, screen_points
from moesim.costmodel.search import Constraints, SpaceSpec, pareto_mask, pareto_mask_2d, search
from moesim.simulator.run import simulate
from moesim.simulator.sweep import SweepPoint, build_grid, point_config
from moesim.tracer import write_trace

PROFILE = "rtx-3060"
POLICIES = ("lru", "static", "fiddler", "mixtral-offloading", "hybrimoe")


@pytest.fixture(scope="module")
def tiny_trace(tmp_path_factory):
    """4 MoE layers x 8 experts, top-2, with experts big enough (12 MiB) that their copies matter."""
    shape = dataclasses.replace(tiny_shape(4, 8, 2), hidden_size=1024, expert_intermediate_size=2048,
                                expert_params=3 * 1024 * 2048)
    path = tmp_path_factory.mktemp("search") / "tiny.parquet"
    write_trace(path, tiny_meta(shape),
                random_cells(np.random.default_rng(7), requests=2, prompt=6, decode=10, layers=4, experts=8, k=2))
    return str(path)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESIM_CACHE_DIR", str(tmp_path / "cache"))


def run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def _space(sizes=range(0, 9), formats=(None, "4")) -> SpaceSpec:
    return SpaceSpec(POLICIES, tuple(sizes), tuple(formats), (None,), (1,))


def _median_peak(trace, space: SpaceSpec) -> int:
    """A memory bound that about half of the space's configurations meet."""
    peaks = sorted(r.memory.total_bytes for _, r in _exhaustive(trace, space))
    return int(peaks[len(peaks) // 2])


def _exhaustive(trace, space: SpaceSpec, gpu_mem=None):
    rows = []
    for p in space.policies:
        for c in space.cache_sizes:
            for e in space.expert_formats:
                r = simulate(trace, PROFILE, point_config(SweepPoint(trace, PROFILE, p, c, gpu_mem, e, None, 1)))
                rows.append(((p, c, e), r))
    return rows


@pytest.mark.parametrize("objective", ["tpot", "ttft", "tokens-per-s"])
def test_search_finds_the_exhaustive_optimum_with_few_simulations(tiny_trace, objective):
    space = _space()
    limit = _median_peak(tiny_trace, space)  # tight enough that the larger caches do not fit
    res = search(tiny_trace, PROFILE, objective, Constraints(max_gpu_mem=limit), space=space, confirm=4,
                  front_points=4, jobs=1)
    assert res.found
    key = {"tpot": "tpot_mean_s", "ttft": "ttft_mean_s", "tokens-per-s": "tokens_per_s"}[objective]
    sign = -1 if objective == "tokens-per-s" else 1
    feasible = [(cfg, r) for cfg, r in _exhaustive(tiny_trace, space, limit) if r.feasible]
    best = min(sign * getattr(r, key) for _, r in feasible)
    got = sign * res.chosen.simulated[key]
    assert got <= best + abs(best) * 0.02, (res.chosen.config, got, best)
    assert res.simulator_calls < 0.5 * len(feasible)
    assert res.chosen.simulated["peak_gpu_mib"] * 2**20 <= limit


def test_search_respects_a_latency_bound_and_minimises_memory(tiny_trace):
    space = _space()
    all_rows = _exhaustive(tiny_trace, space)
    fast = sorted(r.tpot_mean_s for _, r in all_rows)
    bound = fast[len(fast) // 3]
    res = search(tiny_trace, PROFILE, "memory", Constraints(max_tpot=bound), space=space, jobs=1)
    assert res.found and res.chosen.simulated["tpot_mean_s"] <= bound
    best = min(r.peak_gpu_mib for _, r in all_rows if r.tpot_mean_s <= bound)
    assert res.chosen.simulated["peak_gpu_mib"] <= best * 1.02


def test_impossible_constraint_says_so_and_shows_the_nearest_points(tiny_trace, tmp_path):
    res = run(["search", "--trace", tiny_trace, "--profile", PROFILE, "--max-gpu-mem", "1KiB", "--policy",
               ",".join(POLICIES), "--cache-experts", "0..8", "--expert-bits", "trace,4", "--non-expert-bits", "trace",
               "--jobs", "1", "--report", str(tmp_path / "rep")])
    assert res.exit_code == 1, res.output
    assert "NO CONFIGURATION MEETS THE CONSTRAINTS" in res.output
    assert "nothing fits in 1.00 KiB: the smallest configuration needs" in res.output
    assert "nearest points" in res.output and "moesim simulate" in res.output
    doc = json.loads((tmp_path / "rep" / "search.json").read_text())
    assert doc["found"] is False and len(doc["nearest"]) >= 3
    assert all(n["simulated"]["feasible"] for n in doc["nearest"])  # simulated on the device's memory
    assert "No configuration meets the constraints" in (tmp_path / "rep" / "report.md").read_text()


def test_cli_prints_reproducing_commands_and_writes_a_report(tiny_trace, tmp_path):
    out = tmp_path / "rep"
    limit = f"{_median_peak(tiny_trace, _space()) // 2**10}KiB"
    args = ["search", "--trace", tiny_trace, "--profile", PROFILE, "--objective", "tpot", "--max-gpu-mem", limit,
            "--policy", ",".join(POLICIES), "--cache-experts", "0..8", "--expert-bits", "trace,4",
            "--non-expert-bits", "trace", "--jobs", "1", "--report", str(out), "--json", str(tmp_path / "r.json")]
    res = run(args)
    assert res.exit_code == 0, res.output
    sim_line = next(line.strip() for line in res.output.splitlines() if line.strip().startswith("moesim simulate"))
    assert "--gpu-mem " in sim_line and "--cache-experts" in sim_line
    assert any(line.strip().startswith("moesim validate") for line in res.output.splitlines())
    # the printed simulate command reproduces the chosen configuration's simulated TPOT
    doc = json.loads((tmp_path / "r.json").read_text())
    rerun = run(sim_line.split()[1:] + ["--json", str(tmp_path / "sim.json")])
    assert rerun.exit_code == 0, rerun.output
    sim = json.loads((tmp_path / "sim.json").read_text())
    assert sim["tpot_mean_s"] == pytest.approx(doc["chosen"]["simulated"]["tpot_mean_s"], rel=1e-12)
    md = (out / "report.md").read_text()
    assert "![Pareto front](pareto.png)" in md and (out / "pareto.png").stat().st_size > 1000
    assert (out / "confirmed.csv").read_text().startswith("policy,cache_experts")
    # same search, same bytes
    first = (out / "search.json").read_bytes()
    assert run(args).exit_code == 0
    assert (out / "search.json").read_bytes() == first


def _quality_table(path, model="tiny"):
    from moesim.quality.table import make_row, write_quality_table

    rows = []
    for bits, ppl in ((16, 10.0), (4, 10.6), (2, 14.0)):
        rows.append(make_row(expert_bits=bits, group_size=64, quantizer="rtn", model_id=model, checkpoint_sha256="a" * 64,
                             gating_threshold=0.0, gating_sensitivity="", top_k=2, model_top_k=2, data="wiki",
                             data_sha256="b" * 64, seq_len=128, windows=4, predicted_tokens=508, perplexity=ppl,
                             mean_nll=math.log(ppl), experts_per_token=2.0))
    write_quality_table(path, rows)
    return str(path)


def test_max_ppl_reads_the_quality_table_and_adds_quality_to_the_front(tiny_trace, tmp_path):
    table = _quality_table(tmp_path / "q.json")
    space = SpaceSpec(POLICIES, tuple(range(0, 9)), (None, "16", "4", "2"), (None,), (1,))
    res = search(tiny_trace, PROFILE, "tpot", Constraints(max_ppl=11.0), space=space, quality_table=table, jobs=1)
    assert res.found
    assert res.chosen.config[2] in ("16", "4") and res.chosen.perplexity <= 11.0
    # the trace's own bfloat16 experts are looked up as bf16
    assert any("looked up as bf16" in n for n in res.notes)
    assert all(math.isfinite(c.perplexity) for c in res.front)
    out = tmp_path / "rep"
    r = run(["search", "--trace", tiny_trace, "--profile", PROFILE, "--max-ppl", "11", "--quality-table", table,
             "--policy", "lru,static", "--cache-experts", "0..8", "--expert-bits", "16,4,2", "--non-expert-bits",
             "trace", "--jobs", "1", "--report", str(out)])
    assert r.exit_code == 0, r.output
    assert "x perplexity" in r.output and (out / "quality.png").exists()
    assert "int2" not in r.output.split("Pareto front")[1].split("all confirmed")[0]


@pytest.mark.parametrize("args, fragment", [
    (["--max-ppl", "10"], "--max-ppl needs perplexities: pass --quality-table PATH"),
    (["--max-gpu-mem", "lots"], "--max-gpu-mem 'lots'"),
    (["--max-tpot", "soon"], "--max-tpot 'soon'"),
    (["--cache-experts", "99"], "--cache-experts 99: the trace has 8 experts per layer"),
    (["--policy", "nope"], "--policy policy 'nope'"),
    (["--expert-bits", "5"], "--expert-bits weight bits 5"),
    (["--model", "missing.json"], "no cost model artifact"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_trace, tmp_path, args, fragment):
    res = CliRunner().invoke(cli, ["search", "--trace", tiny_trace, "--profile", PROFILE, *args,
                                   "--report", str(tmp_path / "rep")])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("moesim: error: ") and fragment in lines[0], res.output
    assert not (tmp_path / "rep").exists()


def test_quality_table_without_the_model_is_a_clear_error(tiny_trace, tmp_path):
    table = _quality_table(tmp_path / "q.json", model="other-model")
    res = CliRunner().invoke(cli, ["search", "--trace", tiny_trace, "--max-ppl", "12", "--quality-table", table])
    assert res.exit_code == 2 and "no rows for model 'tiny'" in res.output and "--quality-model" in res.output


def _negative_perplexity(path):
    table = _quality_table(path)
    doc = json.loads(path.read_text())
    doc["rows"][0]["perplexity"] = -1
    path.write_text(json.dumps(doc))
    return table


@pytest.mark.parametrize("make, fragment", [
    (_negative_perplexity, "q.json: rows[0]: field 'perplexity' is -1.0, expected a positive finite number"),
    (lambda path: _quality_table(path, model="other-model"), "no rows for model 'tiny'"),
])
def test_bad_quality_table_fails_before_any_prediction(tiny_trace, tmp_path, monkeypatch, make, fragment):
    def no_predict(*args, **kwargs):
        raise AssertionError("predicted before the quality table was read")

    monkeypatch.setattr(CostModel, "predict", no_predict)
    table = make(tmp_path / "q.json")
    res = CliRunner().invoke(cli, ["search", "--trace", tiny_trace, "--profile", PROFILE, "--max-ppl", "100",
                                   "--quality-table", table, "--report", str(tmp_path / "rep")])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("moesim: error: ") and fragment in lines[0], res.output
    assert not (tmp_path / "rep").exists()


def test_pareto_masks():
    pts = np.array([[1.0, 5.0], [2.0, 4.0], [2.0, 6.0], [3.0, 1.0], [4.0, 1.0], [np.inf, 0.0]])
    assert pareto_mask(pts).tolist() == [True, True, False, True, False, False]
    assert pareto_mask_2d(pts[:, 0], pts[:, 1]).tolist() == [True, True, False, True, False, False]
    rng = np.random.default_rng(0)
    for levels in (3, None):
        c = rng.integers(0, 12, size=(300, 3)).astype(float)
        if levels is None:
            c[:, 2] = rng.random(300)  # many distinct values: the general path
        brute = [not any(np.all(o <= x) and np.any(o < x) for o in c) for x in c]
        first = [not any(np.array_equal(c[j], c[i]) for j in range(i)) for i in range(len(c))]
        assert pareto_mask(c).tolist() == [b and f for b, f in zip(brute, first)]


def test_dominated_mask_needs_the_margin_and_ignores_oracles():
    tpot = np.array([1.00, 1.04, 1.20, 0.50])
    mem = np.array([10.0, 12.0, 12.0, 5.0])
    can = np.array([True, True, True, False])  # the last one is an oracle
    assert dominated_mask(tpot, mem, can, 0.05).tolist() == [False, False, True, False]


def test_screen_skips_only_configurations_the_simulator_confirms_are_dominated(tiny_trace):
    points = build_grid([tiny_trace], [PROFILE], list(POLICIES) + ["belady"], list(range(0, 9)), [], [None], None, [1])
    sc = screen_points(points, model_path=None)
    assert sc.skipped and len(sc.kept) + len(sc.skipped) == len(points)
    assert not any(p.policy == "belady" for p in sc.skipped)
    assert "dominated" in sc.summary() and str(len(sc.skipped)) in sc.summary()
    sims = {p.key(): simulate(tiny_trace, PROFILE, point_config(p)) for p in points}
    kept = [sims[p.key()] for p in sc.kept if p.policy != "belady" and sims[p.key()].feasible]
    for p in sc.skipped:
        r = sims[p.key()]
        assert any(k.peak_gpu_mib <= r.peak_gpu_mib and k.tpot_mean_s < r.tpot_mean_s for k in kept), p


def test_bundled_model_predicts_the_bundled_traces_closely():
    """A smoke check of the committed artifact on a real trace (not a figure: see benchmarks/)."""
    from moesim.costmodel.context import TraceProfileContext
    from moesim.costmodel.space import enumerate_space

    trace = "gpt-oss-120b-bigmoeonedge"
    ctx = TraceProfileContext(trace, PROFILE)
    grid = enumerate_space(["lru", "fiddler"], [2, 16], [None], [None], [1])
    pred = CostModel.load().predict(ctx, grid)
    for i in range(len(grid)):
        p, c, e, n, b = grid.row(i)
        r = simulate(trace, PROFILE, point_config(SweepPoint(trace, PROFILE, p, c, 2**40, e, n, b)))
        assert pred.tpot_s[i] == pytest.approx(r.tpot_mean_s, rel=0.05)
        assert pred.peak_gpu_bytes[i] == r.memory.total_bytes


def test_search_json_dash_prints_only_the_json_and_writes_no_file(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from moesim.cli import cli

    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli, ["search", "--trace", "gpt-oss-120b-bigmoeonedge", "--policy", "lru",
                                   "--cache-experts", "4", "--jobs", "1", "--json", "-"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)  # the whole of stdout: no table around it
    assert result["trace"] and result["objective"] == "tpot"
    assert not (tmp_path / "-").exists()
