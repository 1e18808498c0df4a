"""Routing synthesizer (issue #12): fit -> synth round trips recover the parameters of a known generator,
synthesis is deterministic to the byte, the bundled Mixtral model reproduces what it was fitted to, and bad
input is a one-line error that writes nothing."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import random_cells, tiny_meta, tiny_shape
from moesim.cli import cli
from moesim.errors import MoesimError
from moesim.tracer import DECODE, PREFILL, Trace, TraceCells, read_trace, write_trace
from moesim.tracer.compare import (
    belady_hits,
    caching_stats,
    format_side_by_side,
    gaps,
    next_layer_predictability,
    reuse_at_lags,
    token_recurrence,
)
from moesim.tracer.routing import (
    ROUTING_VERSION,
    PhaseModel,
    RoutingModel,
    WeightModel,
    read_routing,
    routing_from_json,
    routing_to_json,
    write_routing,
)
from moesim.tracer.routing_fit import fit_routing_cells, fit_token_classes, fit_weights, phase_moments, request_spread
from moesim.tracer.stats import lru_hit_curve
from moesim.tracer.synth import synthesize, synthetic_meta, synthetic_trace

L, E, K = 3, 8, 2


def known_model(copy_rank0_prev=0.35, copy_rank1_prev=0.2, classes=1, drift=None, alpha=(6.0, 2.0),
                source=None, sharing=1.0) -> RoutingModel:
    """A generator with known parameters: skewed popularity; by default every token's source is the token
    before and rank 0 copies its rank 0 with probability copy_rank0_prev, rank 1 its rank 1 with
    copy_rank1_prev."""
    shape = tiny_shape(num_layers=L, num_experts=E, top_k=K)
    rng = np.random.default_rng(42)
    pop = rng.dirichlet(np.full(E, 1.5), size=(classes, L))
    fidelity = np.tile([copy_rank0_prev, copy_rank1_prev], (L, 1))
    src = np.array([1.0, 0.0, 0.0]) if source is None else np.asarray(source, dtype=float)
    w = WeightModel(sum_mean=np.full(L, 1.0), sum_std=np.full(L, 0.05), share_alpha=np.tile(np.array(alpha), (L, 1)))
    pm = PhaseModel(class_prior=np.full(classes, 1.0 / classes), class_popularity=pop, source=src,
                    far_lag=src.size + 4, fidelity=fidelity, copy_rank=np.eye(K), weights=w, drift=drift,
                    source_sharing=sharing)
    return RoutingModel(name="known", model=shape, dtype="bfloat16", expert_bytes=(shape.expert_bytes(),) * L,
                        non_expert_bytes=shape.non_expert_bytes(), decode=pm, prefill=None, fitted_to={"known": True},
                        created="2026-01-01T00:00:00+00:00")


def synth_trace(model, requests=40, prompt=8, output=64, seed=0, **kw) -> Trace:
    return synthetic_trace(model, np.full(requests, prompt), np.full(requests, output), seed=seed, **kw)


# ------------------------------------------------------------------------------------------------
# The generator does what its parameters say
# ------------------------------------------------------------------------------------------------
def test_generator_rows_shape_and_copies_come_from_the_source_token():
    m = known_model()
    res = synthesize(m, np.array([3, 0, 5]), np.array([4, 2, 1]), seed=1)
    c = res.cells
    assert len(c) == (3 + 0 + 5 + 4 + 2 + 1) * L
    assert (np.sort(c.experts, axis=1)[:, 0] != np.sort(c.experts, axis=1)[:, 1]).all()  # k distinct per cell
    assert np.array_equal(c.execution_order(), np.arange(len(c)))
    dec = c.phase == DECODE
    assert np.array_equal(np.unique(c.position[dec & (c.request == 0)]), np.arange(3, 7))  # continues the prompt
    # a source two tokens back with full fidelity: every cell repeats the cell two positions earlier
    two_back = known_model(copy_rank0_prev=1.0, copy_rank1_prev=1.0, source=[0.0, 1.0, 0.0])
    ex = synth_trace(two_back, requests=4, prompt=0, output=12).experts.reshape(4, 12, L, K)
    assert np.array_equal(ex[:, 2:], ex[:, :-2])
    assert (ex[:, 1:] != ex[:, :-1]).any()


def test_copy_probability_sets_first_choice_repetition():
    m = known_model(copy_rank0_prev=0.5, copy_rank1_prev=0.0)
    tr = synth_trace(m, requests=60, prompt=0, output=80)
    ex = tr.experts.reshape(60, 80, L, K)
    rep = (ex[:, 1:, :, 0] == ex[:, :-1, :, 0]).mean()
    chance = (m.decode.popularity() ** 2).sum(axis=1).mean()  # rank 0 drawn fresh: repeats by chance
    assert rep == pytest.approx(0.5 + 0.5 * chance, abs=0.05)
    flat = synth_trace(dataclasses.replace(m), requests=60, prompt=0, output=80, disabled=("locality",))
    ex2 = flat.experts.reshape(60, 80, L, K)
    assert (ex2[:, 1:, :, 0] == ex2[:, :-1, :, 0]).mean() == pytest.approx(chance, abs=0.05)


def test_avoid_keeps_fresh_draws_out_of_the_source_cell():
    # rank 0 copies the token before's first choice half the time; rank 1 is always fresh
    base = known_model(copy_rank0_prev=0.5, copy_rank1_prev=0.0)
    shared = {}
    for label, avoid in (("none", None), ("all", np.ones(L))):
        m = dataclasses.replace(base, decode=dataclasses.replace(base.decode, avoid=avoid))
        ex = synth_trace(m, requests=60, prompt=0, output=80).experts.reshape(60, 80, L, K)
        a, b = ex[:, 1:], ex[:, :-1]
        first = (a[..., 0] == b[..., 0]).mean()
        overlap = (a[..., :, None] == b[..., None, :]).sum(axis=(-1, -2))  # experts shared with the token before
        shared[label] = (first, overlap)
    first_none, overlap_none = shared["none"]
    first_all, overlap_all = shared["all"]
    # with avoid 1 a cell shares only what it copied: at most its first choice, and a fresh first choice is
    # never the token before's first choice
    assert overlap_all.max() == 1 and (overlap_none == 2).mean() > 0.05
    assert first_all == pytest.approx(0.5, abs=0.03) and first_none > first_all
    # switched off with the rest of locality
    m = dataclasses.replace(base, decode=dataclasses.replace(base.decode, avoid=np.ones(L)))
    flat = synth_trace(m, requests=60, prompt=0, output=80, disabled=("locality",)).experts.reshape(60, 80, L, K)
    assert ((flat[:, 1:, :, :, None] == flat[:, :-1, :, None, :]).sum(axis=(-1, -2)) == 2).mean() > 0.05


def test_a_long_request_keeps_its_reuse_under_the_urn():
    """Fresh draws skip the experts already in their cell; counted as the drawn expert alone, they fed the urn
    the less popular experts and a long output's reuse sank token by token (lag-4 reuse 35.8% over the first
    200 tokens here, 30.2% over the last 200; at gemma-4's fit, 2.8 points lost in 1,024 tokens). Counted as
    their expected shares, the urn keeps the routing steady (40.0% and 39.5%)."""
    Lx, Ex, kx = 2, 48, 6
    shape = tiny_shape(num_layers=Lx, num_experts=Ex, top_k=kx)
    pop = np.random.default_rng(3).dirichlet(np.full(Ex, 0.3), size=(1, Lx))
    w = WeightModel(sum_mean=np.full(Lx, 1.0), sum_std=np.full(Lx, 0.05), share_alpha=np.full((Lx, kx), 2.0))
    pm = PhaseModel(class_prior=np.ones(1), class_popularity=pop, source=np.array([0.4, 0.1, 0.0]), far_lag=8,
                    fidelity=np.full((Lx, kx), 0.6), copy_rank=np.eye(kx), weights=w, drift=np.full(Lx, 200.0))
    m = RoutingModel(name="steady", model=shape, dtype="bfloat16", expert_bytes=(shape.expert_bytes(),) * Lx,
                     non_expert_bytes=shape.non_expert_bytes(), decode=pm, prefill=None, fitted_to={}, created="")
    t = synth_trace(m, requests=24, prompt=0, output=1200, seed=4)
    early = reuse_at_lags(t.select(t.position < 200), lags=(4,))[4]
    late = reuse_at_lags(t.select(t.position >= 1000), lags=(4,))[4]
    assert abs(late - early) < 0.01, (early, late)


def test_avoid_round_trips_and_a_version_3_file_reads_without_it(tmp_path):
    m = known_model()
    m = dataclasses.replace(m, decode=dataclasses.replace(m.decode, avoid=np.linspace(0, 1, L)))
    back = read_routing(write_routing(tmp_path / "r.json", m))
    assert np.allclose(back.decode.avoid, np.linspace(0, 1, L)) and back.version == ROUTING_VERSION
    d = json.loads(routing_to_json(known_model()))
    del d["phases"]["decode"]["avoid"]
    (tmp_path / "v3.json").write_text(json.dumps(dict(d, version=3)))
    old = read_routing(tmp_path / "v3.json")
    assert old.decode.avoid is None and old.version == 3
    d["phases"]["decode"]["avoid"] = [1.5] * L
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(MoesimError, match="'avoid' has probabilities above 1"):
        read_routing(tmp_path / "bad.json")


# ------------------------------------------------------------------------------------------------
# fit -> synth round trips
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def round_trip():
    # tokens repeat the token two back more often than the one before (gpt-oss's rhythm), the whole token at once
    truth = known_model(copy_rank0_prev=0.8, copy_rank1_prev=0.8, source=[0.15, 0.35, 0.0, 0.0, 0.0])
    tr = synth_trace(truth, requests=40, prompt=8, output=64, seed=3)
    fitted = fit_routing_cells(tr.cells, tr.meta, "refit", seed=0)
    return truth, tr, fitted


def test_fit_recovers_popularity_and_locality(round_trip):
    truth, tr, fitted = round_trip
    assert np.abs(fitted.decode.popularity() - truth.decode.popularity()).max() < 0.04
    # the fit's damped rounds circle its fixed point, so one fit is one draw: judge three traces of the truth
    fits = [(tr, fitted)] + [(t, fit_routing_cells(t.cells, t.meta, "refit", seed=0)) for t in
                             (synth_trace(truth, requests=40, prompt=8, output=64, seed=s) for s in (4, 5))]
    lag2, found = [], []
    for t, f in fits:
        # copies at each lag are source probability x fidelity: the lag-2 rhythm (0.28 against 0.12) is
        # found in every fit
        got = f.decode.source[:2] * f.decode.fidelity.mean()
        assert got[1] > 1.8 * got[0]
        lag2.append(got[1])
        # and a trace from the fitted model has the original's caching statistics
        a = caching_stats(t, "truth", with_next_layer=False)
        # (four times the requests: the comparison's noise is then mostly the truth sample's own)
        b = caching_stats(synth_trace(f, requests=160, prompt=8, output=64, seed=9), "refit", with_next_layer=False)
        assert b.reuse[2] > b.reuse[1] + 0.05
        found.append(gaps(a, b))
    # fewer copies than the truth's 0.28 (0.18-0.23 over data seeds 0-5): the fitted request drift, which the
    # truth lacks, repeats some experts by itself
    assert 0.17 < np.median(lag2) < 0.36
    # (the refit also carries that drift, fitted to first uses: close, not exact)
    for field, bar in (("lru_layer", 0.04), ("lru_global", 0.04), ("reuse", 0.04), ("belady", 0.05)):
        assert np.median([getattr(g, field) for g in found]) < bar, (field, found)


def test_with_many_requests_the_drift_follows_how_far_requests_differ():
    """Requests of 48 prompt and 48 decode tokens over 8 experts: a request's prompt already holds nearly every
    expert, so its decode has few first uses to fit the drift on. With 48 requests the fit matches the spread of
    the requests' own expert shares instead, and a refit's requests differ as much as the truth's. (Fitted to
    decode's first uses, as every fit was before, the refit's spread fell 14-38% short on these seeds.)"""
    gaps_by_seed = []
    for seed in range(3):
        tr = synth_trace(known_model(drift=np.full(L, 1.5), copy_rank0_prev=0.3), requests=48, prompt=48,
                         output=48, seed=seed)
        fitted = fit_routing_cells(tr.cells, tr.meta, "spread", groups=1, seed=seed)
        truth = request_spread(tr.cells, DECODE, L, E)
        refit = request_spread(synth_trace(fitted, requests=192, prompt=48, output=48, seed=9).cells, DECODE, L, E)
        gaps_by_seed.append(np.abs(refit - truth) / truth)
    assert np.max(gaps_by_seed) < 0.15, gaps_by_seed
    assert np.median([g.mean() for g in gaps_by_seed]) < 0.08, gaps_by_seed
    # too few requests to say how they differ: no spread, and the drift goes back to the first uses
    assert request_spread(tr.select(tr.request < 7).cells, DECODE, L, E) is None


def test_a_fit_round_is_judged_on_other_draws_than_its_corrections(monkeypatch):
    """The round kept is picked on a synthesis of its own: picked on the draw its corrections came from, it
    favoured rounds whose draw happened to sit near the trace."""
    import moesim.tracer.routing_fit as rf

    judged, corrected = [], []
    gap, correct = rf._moment_gap, rf._correct
    monkeypatch.setattr(rf, "_moment_gap", lambda target, got, **kw: judged.append(got.near) or gap(target, got, **kw))
    monkeypatch.setattr(rf, "_correct", lambda pm, target, got: corrected.append(got.near) or correct(pm, target, got))
    tr = synth_trace(known_model(drift=np.full(L, 3.0)), requests=6, prompt=4, output=16, seed=1)
    fit_routing_cells(tr.cells, tr.meta, "judged", iterations=3, groups=1)
    assert len(corrected) == 3 * 2 and len(judged) == 4 * 2  # two phases: 3 corrections, 4 rounds judged
    # the draws differ, so their moments do too, and no round is judged on the arrays a correction used
    assert not any(j is c for j in judged for c in corrected)
    assert not any(np.array_equal(j, c) for j in judged[:2] for c in corrected[:2])


def test_popularity_pseudo_count_is_the_empirical_bayes_one():
    """Layers whose popularities are drawn from a symmetric Dirichlet(a): the evidence-maximizing pseudo-count
    finds a again; a peaked router gets a smaller one than a flat one."""
    from moesim.tracer.routing_fit import popularity_pseudo_count

    rng = np.random.default_rng(5)
    for a in (0.05, 0.2, 0.8):
        p = rng.dirichlet(np.full(64, a), size=300)
        counts = np.array([rng.multinomial(400, row) for row in p])
        assert popularity_pseudo_count(counts) == pytest.approx(a, rel=0.15)
    flat = np.array([rng.multinomial(400, np.full(64, 1 / 64)) for _ in range(40)])
    assert popularity_pseudo_count(flat) == pytest.approx(1.0, abs=1e-3)  # the bound: as flat as it gets


def test_draw_weights_hold_the_shares_a_top_k_cell_draws():
    """A cell's k experts are drawn without replacement: drawn from the shares themselves, a popular expert
    is under-picked; the draw weights hold it (exact for top-2, Rosen's approximation beyond)."""
    from moesim.tracer.routing_fit import draw_weights

    rng = np.random.default_rng(11)

    def picked(w, k, n=200_000):
        top = np.argsort(-(np.log(np.maximum(w, 1e-300))[None] + rng.gumbel(size=(n, w.size))), axis=1)[:, :k]
        return np.bincount(top.reshape(-1), minlength=w.size) / (n * k)

    cases = ((8, 2, 0.3, 0.02, 0.003), (32, 4, 0.5, 0.02, 0.008), (128, 6, 0.3, 0.003, 0.002))
    for E_, k, conc, naive_off, bar in cases:
        share = rng.dirichlet(np.full(E_, conc))
        for _ in range(50):  # a cell holds each expert at most once: no share above 1/k
            share = np.minimum(share, 0.98 / k)
            share /= share.sum()
        assert np.abs(picked(share, k) - share).max() > naive_off
        w = draw_weights(share, k)
        assert np.abs(w.sum() - 1) < 1e-9 and np.abs(picked(w, k) - share).max() < bar


def test_a_shared_source_repeats_whole_tokens_and_the_fit_tells_it_apart():
    """Reuse of the same mean but carried by whole recurring tokens (high fidelity, rare source) or spread
    over layers independently: the variance over tokens of lag-1 reuse tells them apart, and the fit finds
    which."""
    whole = known_model(copy_rank0_prev=0.9, copy_rank1_prev=0.9, source=[0.3, 0.0, 0.0])
    spread = known_model(copy_rank0_prev=0.9, copy_rank1_prev=0.9, source=[0.3, 0.0, 0.0], sharing=0.0)
    var = {}
    for name, m in (("whole", whole), ("spread", spread)):
        tr = synth_trace(m, requests=40, prompt=0, output=64, seed=2)
        mom = phase_moments(tr.cells, DECODE, L, E)
        var[name] = mom.lag1_var
        assert mom.near[:, :, 0].mean() == pytest.approx(0.27 + 0.73 * 0.2, abs=0.08)
        if name == "whole":
            fitted = fit_routing_cells(tr.cells, tr.meta, "whole")
            assert fitted.decode.source_sharing > 0.6
    assert var["whole"] > 2 * var["spread"]


def test_fit_recovers_weight_distribution(round_trip):
    truth, tr, fitted = round_trip
    w = fitted.decode.weights
    assert np.allclose(w.sum_mean, 1.0, atol=0.01)
    assert np.allclose(w.sum_std, 0.05, atol=0.01)
    # Dirichlet(6, 2) sorted: the top share's mean matches the truth's
    x = np.random.default_rng(0).dirichlet([6.0, 2.0], size=200_000)
    top = np.sort(x, axis=1)[:, 1].mean()
    assert (w.share_alpha[:, 0] / w.share_alpha.sum(axis=1)) == pytest.approx(np.full(L, top), abs=0.02)
    direct = fit_weights(tr.cells, DECODE, L)
    assert np.array_equal(direct.share_alpha, w.share_alpha)


def test_token_classes_recover_cross_layer_correlation():
    truth = known_model(classes=2, copy_rank0_prev=0.0, copy_rank1_prev=0.0)
    # make the two classes disjoint: class 0 routes to experts 0-3 at every layer, class 1 to 4-7
    pop = np.zeros((2, L, E))
    pop[0, :, :4] = 0.25
    pop[1, :, 4:] = 0.25
    truth = dataclasses.replace(truth, decode=dataclasses.replace(truth.decode, class_popularity=pop))
    tr = synth_trace(truth, requests=20, prompt=0, output=64, seed=5)
    prior, theta = fit_token_classes(tr.cells, DECODE, L, E, np.full((L, E), 1 / E), 2, seed=0)
    halves = np.sort(theta[:, :, :4].sum(axis=2).mean(axis=1))
    assert halves[0] < 0.05 and halves[1] > 0.95
    assert prior == pytest.approx([0.5, 0.5], abs=0.1)
    truth_pred = next_layer_predictability(tr)
    fitted = fit_routing_cells(tr.cells, tr.meta, "x", classes=2)
    with_cl = next_layer_predictability(synth_trace(fitted, requests=10, prompt=0, output=64, seed=1))
    without = next_layer_predictability(synth_trace(fitted, requests=10, prompt=0, output=64, seed=1,
                                                    disabled=("cross-layer",)))
    # the predictor names 2 of a class's 4 experts: about half right on the truth; a third without classes
    assert truth_pred == pytest.approx(0.5, abs=0.05)
    assert with_cl > without + 0.08 and with_cl > truth_pred - 0.12


def test_baselines_are_worse_than_the_full_model_on_a_local_trace(round_trip):
    truth, tr, fitted = round_trip
    real = caching_stats(tr, "truth", with_next_layer=False)
    full = gaps(real, caching_stats(synth_trace(fitted, seed=11), "full", with_next_layer=False))
    naive = fit_routing_cells(tr.cells, tr.meta, "pop", disabled=("locality", "drift", "cross-layer"))
    pop_only = gaps(real, caching_stats(synth_trace(naive, seed=11, disabled=("locality", "drift", "cross-layer")),
                                        "pop", with_next_layer=False))
    assert pop_only.reuse > full.reuse + 0.1


# ------------------------------------------------------------------------------------------------
# Statistics used by the comparison
# ------------------------------------------------------------------------------------------------
def test_belady_beats_lru_and_reuse_lag_is_exact(round_trip):
    _, tr, _ = round_trip
    lru = lru_hit_curve(tr, "layer", "decode")
    bel = belady_hits(tr, [1, 2, 4, 8])
    for c in (1, 2, 4):
        assert bel[c] >= lru.hit_rate(c) - 1e-12
    assert bel[8] == pytest.approx(lru.hit_rate(8))  # everything fits: both only miss first uses
    # reuse at lag 1 by brute force
    ex = tr.experts.reshape(40, 8 + 64, L, K)[:, 8:]
    brute = np.mean([[len(set(ex[r, t, l]) & set(ex[r, t - 1, l])) / K for l in range(L)]
                     for r in range(40) for t in range(1, 64)])
    assert reuse_at_lags(tr)[1] == pytest.approx(brute)


def _repeating(whole_tokens: bool, layers=16, steps=400, seed=0) -> Trace:
    """Decode cells where about half of the (token, layer) cells repeat the cell one position earlier: whole
    tokens at once (every layer of a repeating token) or each layer on its own coin."""
    rng = np.random.default_rng(seed)
    c = random_cells(rng, requests=1, prompt=0, decode=steps, layers=layers, experts=8, k=2)
    ex = c.experts.reshape(steps, layers, 2).copy()
    coin = rng.random(steps)[:, None].repeat(layers, axis=1) if whole_tokens else rng.random((steps, layers))
    for t in range(1, steps):
        ex[t, coin[t] < 0.5] = ex[t - 1, coin[t] < 0.5]
    cells = dataclasses.replace(c, experts=ex.reshape(-1, 2))
    return Trace(meta=tiny_meta(tiny_shape(num_layers=layers, num_experts=8, top_k=2)), cells=cells)


def test_token_recurrence_tells_whole_token_repeats_from_independent_layers():
    whole, spread = token_recurrence(_repeating(True)), token_recurrence(_repeating(False))
    assert whole.mean == pytest.approx(spread.mean, abs=0.04)  # the same reuse at lag 1 ...
    assert whole.spread > 3 * spread.spread  # ... in whole tokens or spread over layers
    for r in (whole, spread):
        assert r.independent == pytest.approx(spread.spread, abs=0.03)  # the reference is the independent case
    side = format_side_by_side(caching_stats(_repeating(True), "a", with_next_layer=False),
                               caching_stats(_repeating(False), "b", with_next_layer=False), "decode")
    assert "lag-1 reuse, spread over tokens" in side


# ------------------------------------------------------------------------------------------------
# Files, determinism, CLI
# ------------------------------------------------------------------------------------------------
def run(*args: str):
    return CliRunner().invoke(cli, ["trace", *args], catch_exceptions=False)


def test_json_round_trip(tmp_path):
    m = known_model(drift=np.full(L, 3.0))
    p = write_routing(tmp_path / "r.json", m)
    back = read_routing(p)
    assert routing_to_json(back) == routing_to_json(m)
    res_a = synthesize(m, np.array([2]), np.array([5]), seed=4)
    res_b = synthesize(back, np.array([2]), np.array([5]), seed=4)
    assert np.array_equal(res_a.cells.experts, res_b.cells.experts)


def test_synth_is_byte_identical_for_the_same_seed(tmp_path):
    routing = write_routing(tmp_path / "r.json", known_model())
    outs = []
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        r = run("synth", "--routing", str(routing), "--requests", "3", "--prompt-len", "5", "--output-len", "6",
                "--seed", seed, "--out", str(tmp_path / f"{name}.parquet"))
        assert r.exit_code == 0, r.output
        outs.append((tmp_path / f"{name}.parquet").read_bytes())
    assert outs[0] == outs[1] and outs[0] != outs[2]
    tr = read_trace(tmp_path / "a.parquet")
    assert tr.meta.source.kind == "synthetic" and tr.meta.source.details["routing"] == "known"
    assert tr.meta.source.details["seed"] == 3 and len(tr) == 3 * (5 + 6) * L


def test_uniform_routing_draws_k_distinct_experts_evenly_for_any_model_config(tmp_path):
    """`--routing uniform` needs no fitted model: DeepSeek-V3 (256 experts, top-8), which nothing here traced."""
    out = tmp_path / "u.parquet"
    r = run("synth", "--routing", "uniform", "--model-config", "deepseek-v3", "--requests", "2", "--prompt-len", "8",
            "--output-len", "40", "--seed", "1", "--out", str(out))
    assert r.exit_code == 0, r.output
    tr = read_trace(out)
    assert tr.meta.model.model_id == "deepseek-v3" and tr.meta.source.details["routing"] == "uniform"
    ex = tr.experts
    assert ex.shape == (2 * 48 * 58, 8)
    assert all(len(set(row)) == 8 for row in ex[:500])  # without replacement in a cell
    counts = np.bincount(ex.ravel(), minlength=256)
    expected = ex.size / 256
    assert counts.min() > 0.7 * expected and counts.max() < 1.3 * expected  # 174 per expert on average
    # no locality: a token keeps about k/E of the previous token's experts at a layer, as chance gives
    dec = tr.cells.phase == DECODE
    first = ex[dec][: 58 * 20].reshape(20, 58, 8)
    kept = np.mean([len(set(a) & set(b)) / 8 for t in range(19) for a, b in zip(first[t], first[t + 1])])
    assert kept < 0.1
    again = tmp_path / "v.parquet"
    assert run("synth", "--routing", "uniform", "--model-config", "deepseek-v3", "--requests", "2", "--prompt-len",
               "8", "--output-len", "40", "--seed", "1", "--out", str(again)).exit_code == 0
    assert again.read_bytes() == out.read_bytes()
    bad = run("synth", "--routing", "uniform", "--requests", "1", "--prompt-len", "1", "--output-len", "1",
              "--out", str(tmp_path / "w.parquet"))
    assert bad.exit_code == 2 and "expected --model-config" in bad.output and not (tmp_path / "w.parquet").exists()


def test_fit_command_writes_a_model_that_synthesizes(tmp_path):
    routing = write_routing(tmp_path / "r.json", known_model())
    assert run("synth", "--routing", str(routing), "--requests", "6", "--prompt-len", "4", "--output-len", "20",
               "--out", str(tmp_path / "t.parquet")).exit_code == 0
    r = run("fit", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "fit.json"))
    assert r.exit_code == 0 and "phase edges: none;" in r.output, r.output  # 6 requests: too few to fit edges
    fitted = read_routing(tmp_path / "fit.json")
    assert fitted.fitted_to["sources"][0]["path"] == "t.parquet" and fitted.num_experts == E
    r = run("stats", str(tmp_path / "t.parquet"), "--against", str(tmp_path / "t.parquet"))
    assert r.exit_code == 0 and "reuse at lag 4" in r.output and "Belady" in r.output


def test_bundled_mixtral_model_reproduces_its_published_targets():
    from moesim.tracer.mixtral_published import FIRST_CHOICE_REPETITION, FIRST_OR_SECOND_REPETITION, per_layer_target

    m = read_routing("mixtral-8x7b-published")
    assert (m.num_layers, m.num_experts, m.top_k) == (32, 8, 2)
    tr = synth_trace(m, requests=64, prompt=16, output=64, seed=77)
    ex = tr.experts[tr.phase == DECODE].reshape(64, 64, 32, 2)
    first = (ex[:, 1:, :, 0] == ex[:, :-1, :, 0]).mean(axis=(0, 1))
    target = per_layer_target(FIRST_CHOICE_REPETITION)
    assert np.abs(first - target)[[0, 15, 31]].max() < 0.025
    either = (ex[:, 1:, :, :, None] == ex[:, :-1, :, None, :]).any(axis=(-1, -2)).mean(axis=(0, 1))
    assert np.abs(either - per_layer_target(FIRST_OR_SECOND_REPETITION))[[0, 15, 31]].max() < 0.025
    ll = lru_hit_curve(tr, "layer", "decode")
    assert ll.hit_rate(2) == pytest.approx(0.302, abs=0.05) and ll.hit_rate(6) == pytest.approx(0.806, abs=0.05)


def test_bundled_real_trace_models_load():
    for name in ("qwen3-30b-a3b-bigmoeonedge", "gemma-4-26b-a4b-bigmoeonedge", "gpt-oss-120b-bigmoeonedge"):
        m = read_routing(name)
        assert m.fitted_to["sources"][0]["path"] == f"{name}.parquet"


def test_bad_inputs_are_one_line_and_write_nothing(tmp_path):
    good = known_model()
    path = write_routing(tmp_path / "good.json", good)
    d = json.loads(path.read_text())
    (tmp_path / "v1.json").write_text(json.dumps(dict(d, version=1)))
    out = tmp_path / "t.parquet"

    def one_line(result, fragment):
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("moesim: error:") and fragment in lines[0], result.output
        assert not out.exists()

    base = ["--prompt-len", "2", "--output-len", "3", "--out", str(out)]
    one_line(run("synth", "--routing", str(tmp_path / "v1.json"), "--requests", "1", *base), "version 1")
    (tmp_path / "v2.json").write_text(json.dumps(dict(d, version=2)))
    one_line(run("synth", "--routing", str(tmp_path / "v2.json"), "--requests", "1", *base), "version 2")
    bad_carry = dict(d, phases=dict(d["phases"], decode=dict(d["phases"]["decode"], carry=1.5)))
    (tmp_path / "carry.json").write_text(json.dumps(bad_carry))
    one_line(run("synth", "--routing", str(tmp_path / "carry.json"), "--requests", "1", *base), "'carry'")
    one_line(run("synth", "--routing", str(path), "--requests", "0", *base), "--requests 0")
    one_line(run("synth", "--routing", str(path), "--requests", "1", "--model-config", "mixtral-8x7b", *base),
             "8 experts")
    one_line(run("synth", "--routing", "mixtral-8x7b-published", "--requests", "1", "--model-config",
                 "qwen3-30b-a3b", *base), "--model-config qwen3-30b-a3b")
    one_line(run("synth", "--routing", str(path), "--requests", "1", "--disable", "vibes", *base), "--disable vibes")
    one_line(run("synth", "--routing", "no-such-routing", "--requests", "1", *base), "no-such-routing")
    # a routing file for another expert count than its own arrays
    bad = dict(d, model=dict(d["model"], num_experts=16))
    (tmp_path / "e16.json").write_text(json.dumps(bad))
    one_line(run("synth", "--routing", str(tmp_path / "e16.json"), "--requests", "1", *base), "expected")
    with pytest.raises(MoesimError, match="not valid JSON"):
        routing_from_json("{", "x.json")
    # fields of the wrong type or sign (each was a traceback or a negative size blamed on the profile)
    for field, value, fragment in (("expert_bytes", -1, "field 'expert_bytes': expected a list of"),
                                   ("expert_bytes", [-5] * len(d["expert_bytes"]), "positive integers"),
                                   ("non_expert_bytes", "big", "field 'non_expert_bytes' is 'big'"),
                                   ("non_expert_bytes", -1, "expected a non-negative integer")):
        with pytest.raises(MoesimError, match=re.escape(fragment)):
            routing_from_json(json.dumps(dict(d, **{field: value})), "x.json")
    with pytest.raises(MoesimError, match=re.escape("field 'num_experts' is '8', expected a non-negative integer")):
        routing_from_json(json.dumps(dict(d, model=dict(d["model"], num_experts="8"))), "x.json")
    # a trace with no decode rows is named (the error named the output's stem)
    prefill_only = tmp_path / "prefill.parquet"
    write_trace(prefill_only, tiny_meta(), random_cells(np.random.default_rng(0), decode=0))
    res = run("fit", str(prefill_only), "--out", str(tmp_path / "keep.json"))
    assert res.exit_code == 2 and res.output.startswith(f"moesim: error: {prefill_only}: no decode rows"), res.output
    assert not (tmp_path / "keep.json").exists()
    prefill_only.unlink()
    # a trace that would not fit in memory is refused before anything is allocated
    one_line(run("synth", "--routing", str(path), "--requests", "1000", "--prompt-len", "100000000",
                 "--output-len", "1", "--out", str(out)), "GiB to synthesize, more than the")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["carry.json", "e16.json", "good.json", "v1.json", "v2.json"]


def test_synthetic_meta_says_what_it_is_from():
    m = known_model()
    meta = synthetic_meta(m, routing_path="r.json", routing_sha256="ab" * 32, details={"seed": 1})
    assert meta.source.kind == "synthetic" and meta.source.format == f"moesim-routing-v{ROUTING_VERSION}"
    assert meta.created == m.created


def _prompt_unlike_output(seed: int, requests=24, prompt=24, output=24) -> Trace:
    """Prefill routed uniformly; decode on experts 6 and 7 with 90% chance, repeating the previous decode
    token's cell with 70% (as the demo model routes GSM8K: its output on two experts per layer, its prompt
    spread over all)."""
    rng = np.random.default_rng(seed)
    rows, experts = [], []
    for r in range(requests):
        prev = None
        for pos in range(prompt + output):
            phase = PREFILL if pos < prompt else DECODE
            for layer in range(L):
                if phase == PREFILL:
                    cell = rng.choice(E, size=K, replace=False)
                elif prev is not None and rng.random() < 0.7:
                    cell = prev[layer]
                else:
                    hot = rng.random() < 0.9
                    cell = np.array([6, 7]) if hot else rng.choice(6, size=K, replace=False)
                rows.append((r, phase, pos, layer))
                experts.append(cell)
            if phase == DECODE:
                prev = experts[-L:]
    arr = np.array(rows)
    ex = np.array(experts, dtype=np.int16)
    w = np.tile(np.array([0.6, 0.4], dtype=np.float32), (len(arr), 1))
    cells = TraceCells(request=arr[:, 0].astype(np.int32), phase=arr[:, 1].astype(np.uint8),
                       position=arr[:, 2].astype(np.int32), layer=arr[:, 3].astype(np.int16), experts=ex, weights=w)
    return Trace(meta=tiny_meta(tiny_shape(num_layers=L, num_experts=E, top_k=K)), cells=cells)


def test_phase_boundary_keeps_a_prompt_unlike_the_output_out_of_decode():
    # one fit is one draw of a procedure whose rounds circle its fixed point: judge three traces by the median
    entropy_gap, reuse_gap, carry, off_gap = [], [], [], []
    for seed in (3, 4, 5):
        real = _prompt_unlike_output(seed=seed)
        model = fit_routing_cells(real.cells, real.meta, "boundary")
        syn = synth_trace(model, requests=24, prompt=24, output=24, seed=5)
        a, b = caching_stats(real, "real"), caching_stats(syn, "synthetic")
        entropy_gap.append(abs(a.entropy.mean() - b.entropy.mean()))
        reuse_gap.append(abs(a.reuse[1] - b.reuse[1]))
        carry.append(model.decode.carry)
        off = caching_stats(synth_trace(model, requests=24, prompt=24, output=24, seed=5,
                                        disabled=("phase-boundary",)), "off")
        off_gap.append(off.entropy.mean() - a.entropy.mean())
    # without it, copies of prompt tokens and the prompt's urn counts spread decode over the prompt's experts
    assert np.median(entropy_gap) < 0.15 and np.median(reuse_gap) < 0.12, (entropy_gap, reuse_gap)
    # decode tokens reuse the prompt's last tokens far less than their own: the boundary is fitted shut
    assert max(carry) < 0.3
    # switched off, it routes as version 2 did: the decode entropy is far off
    assert np.median(off_gap) > 0.25, off_gap


def test_a_kept_boundary_draws_nothing_extra():
    """carry = 1 consumes no random numbers, so a model fitted without a boundary synthesizes as before."""
    m = known_model(drift=np.full(L, 3.0))
    half = dataclasses.replace(m, decode=dataclasses.replace(m.decode, carry=1.0))
    off = synthesize(m, np.array([3, 2]), np.array([5, 6]), seed=9, disabled=("phase-boundary",))
    on = synthesize(half, np.array([3, 2]), np.array([5, 6]), seed=9)
    assert np.array_equal(on.cells.experts, off.cells.experts)


def test_a_boundary_seen_in_too_few_requests_is_not_fitted(monkeypatch):
    """One request's boundary is one sample (mostly its chat template): carry stays 1, the file says why, and
    the fit's rounds are not judged on that boundary's reuse (it would only add the draw's noise to the pick)."""
    import moesim.tracer.routing_fit as rf

    judged_on_boundary = []
    gap = rf._moment_gap
    monkeypatch.setattr(rf, "_moment_gap", lambda target, got, boundary=True: judged_on_boundary.append(boundary)
                        or gap(target, got, boundary))
    few = _prompt_unlike_output(seed=3, requests=rf.MIN_BOUNDARY_REQUESTS - 1)
    model = fit_routing_cells(few.cells, few.meta, "few")
    assert model.decode.carry == 1.0
    assert "kept at 1" in model.fitted_to["phase_boundary"]
    assert judged_on_boundary and not any(judged_on_boundary)
    judged_on_boundary.clear()
    enough = _prompt_unlike_output(seed=3, requests=rf.MIN_BOUNDARY_REQUESTS)
    assert fit_routing_cells(enough.cells, enough.meta, "enough").decode.carry < 0.5
    assert judged_on_boundary and all(judged_on_boundary)


# ------------------------------------------------------------------------------------------------
# Request groups
# ------------------------------------------------------------------------------------------------
def two_regime_model(share_repeating: float = 0.75) -> RoutingModel:
    """Requests of two kinds (the demo model on GSM8K has them): most repeat the token before whole (99%
    lag-1 reuse), the rest route afresh at every token."""
    from moesim.tracer.routing import RequestGroup

    repeating = known_model(copy_rank0_prev=1.0, copy_rank1_prev=1.0, source=[0.97, 0.0, 0.0]).decode
    fresh = known_model(copy_rank0_prev=0.0, copy_rank1_prev=0.0).decode
    base = known_model()
    return dataclasses.replace(base, groups=(RequestGroup(share_repeating, repeating, None, 0),
                                             RequestGroup(1 - share_repeating, fresh, None, 0)))


def per_request_lag1(tr: Trace, requests: int, output: int) -> np.ndarray:
    ex = tr.experts[tr.phase == DECODE].reshape(requests, output, L, K)
    return (ex[:, 1:, :, :, None] == ex[:, :-1, :, None, :]).any(axis=-1).mean(axis=(1, 2, 3))


def test_group_counts_follow_the_shares():
    from moesim.tracer.synth import group_counts

    assert group_counts(np.array([0.5, 0.3, 0.2]), 7).tolist() == [4, 2, 1]
    assert group_counts(np.array([0.75, 0.25]), 48).tolist() == [36, 12]
    assert group_counts(np.array([0.5, 0.5]), 1).tolist() == [1, 0]
    assert group_counts(np.array([0.2, 0.8]), 0).tolist() == [0, 0]


def test_request_groups_synthesize_their_regimes_and_the_fit_finds_them():
    truth = two_regime_model()
    tr = synth_trace(truth, requests=48, prompt=8, output=48, seed=1)
    reuse = per_request_lag1(tr, 48, 48)
    # the groups' counts are exact (36 and 12), and which request is which is drawn
    assert (reuse > 0.8).sum() == 36 and (reuse < 0.5).sum() == 12
    assert not (reuse[:36] > 0.8).all()
    fitted = fit_routing_cells(tr.cells, tr.meta, "two")
    assert sorted(g.fitted_requests for g in fitted.groups) == [12, 36]
    assert sorted(round(g.share, 2) for g in fitted.groups) == [0.25, 0.75]
    assert "2 groups of 36, 12 requests" in fitted.fitted_to["request_groups"]
    syn = np.sort(per_request_lag1(synth_trace(fitted, requests=48, prompt=8, output=48, seed=2), 48, 48))
    # two regimes again, 36 and 12 requests, with a gap between them; each near its own (the repeating one
    # lower: the fit spreads a near-certain repeat of the token before over the lags 1-4, which all reuse
    # 95-98% of it, and so leaves it at 0.7-0.9 a request)
    assert syn[12] - syn[11] > 0.15 and np.median(syn[:12]) < 0.5 and np.median(syn[12:]) > 0.7
    assert abs(syn[:12].mean() - np.sort(reuse)[:12].mean()) < 0.15
    # one set of parameters gives every request the average: no such gap, and a narrow spread
    pooled = np.sort(per_request_lag1(synth_trace(fitted, requests=48, prompt=8, output=48, seed=2,
                                                  disabled=("request-groups",)), 48, 48))
    assert np.diff(pooled).max() < 0.1 and pooled.std() < 0.5 * syn.std()
    # a trace of one regime is one group
    one = synth_trace(known_model(copy_rank0_prev=0.5, copy_rank1_prev=0.5), requests=48, prompt=8, output=48, seed=3)
    assert fit_routing_cells(one.cells, one.meta, "one").groups == ()


def test_request_groups_round_trip_and_older_files_read_without_them(tmp_path):
    m = two_regime_model()
    back = read_routing(write_routing(tmp_path / "g.json", m))
    assert routing_to_json(back) == routing_to_json(m) and len(back.groups) == 2
    a = synthesize(m, np.full(6, 3), np.full(6, 5), seed=4).cells
    b = synthesize(back, np.full(6, 3), np.full(6, 5), seed=4).cells
    assert np.array_equal(a.experts, b.experts) and np.array_equal(a.request, b.request)
    d = json.loads(routing_to_json(known_model()))
    del d["request_groups"]
    (tmp_path / "v4.json").write_text(json.dumps(dict(d, version=4)))
    old = read_routing(tmp_path / "v4.json")
    assert old.groups == () and old.version == 4
    g = json.loads(routing_to_json(m))
    g["request_groups"][0]["share"] = 0.5  # shares 0.5 + 0.25
    (tmp_path / "bad.json").write_text(json.dumps(g))
    with pytest.raises(MoesimError, match="shares sum to 0.750000, expected 1"):
        read_routing(tmp_path / "bad.json")


def test_fit_command_request_groups_flag(tmp_path):
    routing = write_routing(tmp_path / "r.json", two_regime_model())
    assert run("synth", "--routing", str(routing), "--requests", "24", "--prompt-len", "4", "--output-len", "32",
               "--out", str(tmp_path / "t.parquet")).exit_code == 0
    r = run("fit", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "fit.json"))
    assert r.exit_code == 0 and "2 request groups (18, 6 requests)" in r.output, r.output  # 0.75 x 24, 0.25 x 24
    r = run("fit", str(tmp_path / "t.parquet"), "--request-groups", "1", "--out", str(tmp_path / "one.json"))
    assert r.exit_code == 0 and "one request group" in r.output and read_routing(tmp_path / "one.json").groups == ()
    for bad in ("0", "many"):
        r = run("fit", str(tmp_path / "t.parquet"), "--request-groups", bad, "--out", str(tmp_path / "bad.json"))
        lines = r.output.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1 and f"--request-groups {bad}" in lines[0], r.output
    assert not (tmp_path / "bad.json").exists()
