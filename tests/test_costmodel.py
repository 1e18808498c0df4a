"""The cost model: features against the simulator, memory equal to the simulator's, the correction's export,
the artifact, and a small fit end to end."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import random_cells, tiny_meta, tiny_shape

from moesim.cli import cli
from moesim.costmodel.context import FEATURE_NAMES, TraceProfileContext
from moesim.costmodel.correction import GbmSettings, TreeEnsemble, correction_from_dict, fit_gbm, fit_ridge
from moesim.costmodel.model import CostModel, default_artifact_path
from moesim.costmodel.space import enumerate_space
from moesim.errors import MoesimError
from moesim.simulator.memory import dp_cache_sizes, dp_sizes_every_budget
from moesim.simulator.presets import PRESETS
from moesim.simulator.run import simulate
from moesim.simulator.sweep import SweepPoint, point_config
from moesim.tracer import write_trace

PROFILE = "rtx-3060"


@pytest.fixture(scope="module")
def tiny_trace(tmp_path_factory):
    """4 MoE layers x 8 experts, top-2, 3 requests; layer 2's experts are bigger (non-uniform bytes)."""
    shape = tiny_shape(4, 8, 2)
    meta = tiny_meta(shape)
    eb = list(meta.expert_bytes)
    eb[2] = int(eb[2] * 1.5)
    meta = dataclasses.replace(meta, expert_bytes=tuple(eb))
    path = tmp_path_factory.mktemp("cm") / "tiny.parquet"
    write_trace(path, meta, random_cells(np.random.default_rng(3), requests=3, prompt=5, decode=8, layers=4,
                                          experts=8, k=2))
    return str(path)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESIM_CACHE_DIR", str(tmp_path / "cache"))


def _sim(trace, policy, cache, batch=1, ebits=None, nbits=None):
    return simulate(trace, PROFILE, point_config(SweepPoint(trace, PROFILE, policy, cache, 2**40, ebits, nbits, batch)))


def test_lru_miss_table_reproduces_the_simulators_hits_at_every_size(tiny_trace):
    ctx = TraceProfileContext(tiny_trace, PROFILE)
    for batch in (1, 2):
        fe = ctx.features(batch, PRESETS.get("lru", "")().gating)
        table = fe.misses("lru")
        for c in range(0, 9):
            r = _sim(tiny_trace, "lru", c, batch)
            per_layer_acc = np.bincount(fe.decode.layer, weights=fe.decode.experts, minlength=4)
            per_layer_miss = np.bincount(fe.decode.layer, weights=table.decode[:, c], minlength=4)
            predicted = 1.0 - per_layer_miss / per_layer_acc
            # exact at every size, below a whole cell (c < distinct experts of a step) too
            np.testing.assert_allclose(predicted, r.hit_rate_per_layer, atol=1e-12, err_msg=f"c={c} batch={batch}")


@pytest.mark.parametrize("policy", ["lru", "static", "fiddler", "accelerate", "all-gpu", "mixtral-offloading",
                                    "hybrimoe", "adapmoe"])
def test_backbone_matches_the_simulator(tiny_trace, policy):
    ctx = TraceProfileContext(tiny_trace, PROFILE)
    model = CostModel.backbone_only()
    for batch in (1, 2):
        for c in (0, 3, 8):
            pred = model.predict(ctx, enumerate_space([policy], [c], [None], [None], [batch]))
            r = _sim(tiny_trace, policy, c, batch)
            assert pred.valid[0]
            assert pred.tpot_s[0] == pytest.approx(r.tpot_mean_s, rel=0.01), (policy, c, batch)
            assert pred.ttft_s[0] == pytest.approx(r.ttft_mean_s, rel=0.01), (policy, c, batch)
            assert pred.tokens_per_s[0] == pytest.approx(r.tokens_per_s, rel=0.01), (policy, c, batch)


def test_memory_equals_the_simulators_plan_for_every_preset_size_and_format(tiny_trace):
    ctx = TraceProfileContext(tiny_trace, PROFILE)
    grid = enumerate_space(list(PRESETS.names()), range(0, 10), [None, "4", "2"], [None, "8"], [1, 2])
    pred = CostModel.backbone_only().predict(ctx, grid)
    rng = np.random.default_rng(0)
    for i in rng.choice(len(grid), 120, replace=False):
        policy, c, e, n, b = grid.row(int(i))
        r = _sim(tiny_trace, policy, c, b, e, n)
        assert pred.peak_gpu_bytes[i] == r.memory.total_bytes, grid.row(int(i))


def test_one_dp_gives_adapmoes_sizes_for_every_total():
    rng = np.random.default_rng(1)
    L, E = 5, 6
    curves = np.sort(rng.integers(0, 50, size=(L, E + 1)), axis=1)[:, ::-1].copy()
    allp = dp_sizes_every_budget(curves)
    for p in range(E + 1):
        assert allp[p].tolist() == dp_cache_sizes(curves, p * L)


def test_tree_export_agrees_with_sklearn_and_survives_json():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 6))
    y = np.sin(X[:, 0]) + 0.3 * X[:, 1] * (X[:, 2] > 0)
    ens = fit_gbm(X, y, GbmSettings(n_estimators=40, max_depth=3))  # fit_gbm checks sklearn's own predict
    again = correction_from_dict(json.loads(json.dumps(ens.to_dict())), "test")
    assert isinstance(again, TreeEnsemble)
    np.testing.assert_allclose(again.predict(X), ens.predict(X), atol=1e-6)
    assert np.mean((ens.predict(X) - y) ** 2) < 0.5 * np.var(y)
    ridge = fit_ridge(X, y)
    np.testing.assert_allclose(correction_from_dict(ridge.to_dict(), "t").predict(X), ridge.predict(X))


def test_bundled_artifact_is_small_versioned_and_loads():
    path = default_artifact_path()
    assert path.stat().st_size < 1_000_000
    model = CostModel.load()
    meta = model.meta
    assert len(meta["moesim_sha256"]) == 64
    assert len(meta["fitted_on"]["traces"]) >= 2 and len(meta["fitted_on"]["profiles"]) >= 3
    assert all(len(h) == 64 for h in meta["fitted_on"]["profiles"].values())
    assert meta["chosen"]["tpot"] in ("none", "ridge", "gbm")
    assert model.stale_reasons() == []  # the bundled artifact matches this simulator (else: costmodel fit --force)


def test_stale_artifact_says_what_changed(tmp_path):
    doc = json.loads(default_artifact_path().read_text())
    doc["moesim_sha256"] = "0" * 64
    doc["fitted_on"]["profiles"]["rtx-3060"] = "f" * 64
    p = tmp_path / "old.json"
    p.write_text(json.dumps(doc))
    reasons = CostModel.load(p).stale_reasons()
    assert any("simulator changed" in r for r in reasons)
    assert any("profile rtx-3060 changed" in r for r in reasons)


@pytest.mark.parametrize("text, fragment", [
    ("not json", "not a JSON cost model artifact"),
    ('{"format": "other"}', "not a cost model artifact"),
    ('{"format": "moesim.costmodel", "format_version": 99}', "artifact version 99"),
    ('{"format": "moesim.costmodel", "format_version": 1, "feature_names": ["x"]}', "other features"),
])
def test_bad_artifact_is_a_one_line_error(tmp_path, text, fragment):
    p = tmp_path / "bad.json"
    p.write_text(text)
    with pytest.raises(MoesimError, match=fragment):
        CostModel.load(p)
    res = CliRunner().invoke(cli, ["costmodel", "show", "--model", str(p)])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and fragment in res.output


def _drop_chosen(doc):
    del doc["chosen"]


def _fitted_on_list(doc):
    doc["fitted_on"] = ["qwen3"]


def _feature_999(doc):
    doc["corrections"]["tpot"]["trees"][0]["feature"][0] = 999


def _child_out_of_range(doc):
    tree = doc["corrections"]["ttft"]["trees"][0]
    tree["left"][0] = len(tree["feature"]) + 5


def _ridge_too_short(doc):
    doc["corrections"]["tpot"] = {"kind": "ridge", "mean": [0.0], "scale": [1.0], "coef": [0.0], "intercept": 0.0}


@pytest.mark.parametrize("corrupt, fragment", [
    (_drop_chosen, "field 'chosen' must be an object of tpot, ttft"),
    (_fitted_on_list, "field 'fitted_on' must be an object"),
    (_feature_999, "corrections.tpot: malformed gbm correction (trees[0].feature[0] is 999, expected -1 (a leaf) or "
                   "a feature index 0.."),
    (_child_out_of_range, "corrections.ttft: malformed gbm correction (trees[0].left[0] is"),
    (_ridge_too_short, f"corrections.tpot: malformed ridge correction ('mean' must list {len(FEATURE_NAMES)} numbers"),
])
def test_corrupted_artifact_is_refused_when_loaded(tiny_trace, tmp_path, corrupt, fragment):
    doc = json.loads(default_artifact_path().read_text())
    corrupt(doc)
    p = tmp_path / "corrupt.json"
    p.write_text(json.dumps(doc))
    for args in (["costmodel", "show", "--model", str(p)],
                 ["costmodel", "predict", "--model", str(p), "--trace", tiny_trace, "--cache-experts", "4"]):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 2, res.output
        assert res.output.count("\n") == 1 and res.output.startswith(f"moesim: error: {p}: ") and fragment in res.output


def test_costmodel_predict_refuses_a_batch_larger_than_the_trace(tiny_trace):
    res = CliRunner().invoke(cli, ["costmodel", "predict", "--trace", tiny_trace, "--profile", PROFILE,
                                   "--cache-experts", "2", "--batch", "1,4"])
    assert res.exit_code == 2, res.output
    assert res.output == ("moesim: error: --batch 4: the trace has 3 requests, so a batch holds at most 3; record or "
                          "import a trace with more requests\n")


@pytest.mark.parametrize("flag", ["--trace", "--profile"])
def test_costmodel_fit_names_the_flag_of_an_empty_list(tmp_path, flag):
    out = tmp_path / "m.json"
    res = CliRunner().invoke(cli, ["costmodel", "fit", flag, ",", "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert res.output == f"moesim: error: {flag} ',': expected a comma-separated list, got nothing\n"
    assert not out.exists()


def test_predictions_are_deterministic_and_vectorised(tiny_trace):
    ctx = TraceProfileContext(tiny_trace, PROFILE)
    grid = enumerate_space(list(PRESETS.names()), range(9), [None, "16", "8", "4", "3", "2"], [None, "8"], [1, 2])
    model = CostModel.load()
    a = model.predict(ctx, grid)
    b = model.predict(TraceProfileContext(tiny_trace, PROFILE), grid.take(np.arange(len(grid))[::-1]))
    np.testing.assert_array_equal(a.tpot_s, b.tpot_s[::-1])
    assert a.valid.all() and np.isfinite(a.tpot_s).all() and (a.tpot_s > 0).all()
    # a bigger cache never needs less memory, for a per-layer LRU
    lru = (grid.policy_names() == "lru") & (grid.expert_format == 0) & (grid.non_expert_format == 0) & (grid.batch == 1)
    assert np.all(np.diff(a.peak_gpu_bytes[lru]) > 0)


def test_fit_end_to_end_on_a_small_plan(tiny_trace, tmp_path):
    from moesim.costmodel.fit import fit_costmodel

    presets = ["lru", "static", "fiddler", "mixtral-offloading"]
    model, report = fit_costmodel([tiny_trace], [PROFILE], presets, per_preset=4, seed=5, jobs=1,
                                  settings=GbmSettings(n_estimators=20, max_depth=2, min_samples_leaf=2))
    assert report.runs == 16 and report.samples == 16
    assert set(report.choice.values()) <= {"none", "ridge", "gbm"}
    for t in ("tpot", "ttft"):
        assert report.cross_validation[t]["none"] < 0.05  # the backbone alone is already close here
    out = tmp_path / "m.json"
    out.write_text(model.to_json())
    again = CostModel.load(out)
    assert again.meta["sampling"]["runs"] == 16 and again.stale_reasons() == []
    ctx = TraceProfileContext(tiny_trace, PROFILE)
    grid = enumerate_space(presets, [2, 4], [None], [None], [1])
    np.testing.assert_allclose(again.predict(ctx, grid).tpot_s, model.predict(ctx, grid).tpot_s, rtol=1e-6)


def test_costmodel_predict_and_show_commands(tiny_trace):
    res = CliRunner().invoke(cli, ["costmodel", "predict", "--trace", tiny_trace, "--profile", PROFILE, "--policy",
                                   "lru,fiddler", "--cache-experts", "0..2"])
    assert res.exit_code == 0, res.output
    assert res.output.count("lru") == 3 and "tpot_ms" in res.output
    res = CliRunner().invoke(cli, ["costmodel", "show"])
    assert res.exit_code == 0 and "cross-validated" in res.output and "status:" in res.output


def test_feature_names_are_unique():
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)
