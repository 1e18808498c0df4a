"""MoE-Infinity 2024's per-layer predict-and-enqueue-everything prefetch, and the preset that uses it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from moesim.reproduce.catalogue import read_catalogue
from moesim.reproduce.run import predict
import moesim.simulator.presets  # noqa: F401  (registers the prefetcher with its preset)
from moesim.simulator.prefetch import PrefetchContext, PrefetchSpec, make_prefetcher
from moesim.tracer import DECODE


def _prefetcher(limit=0, L=4, E=4):
    wl = SimpleNamespace(num_layers=L, num_experts=E, top_k=2)
    return make_prefetcher(PrefetchSpec("eam-all", limit=limit), wl)


def _ctx(layer, experts, resident, L=4):
    ctx = PrefetchContext(L, lambda l, e: (l, e) in resident)
    ctx.layer, ctx.phase = layer, DECODE
    ctx.work = SimpleNamespace(experts=tuple(experts), tokens=(1,) * len(experts))
    return ctx


def test_without_history_it_enqueues_every_non_resident_expert_of_this_and_later_layers_nearest_first():
    pf = _prefetcher(limit=100)
    pf.begin_batch((0,))
    resident = {(1, 0), (1, 1), (2, 3)}  # layer 1's routed experts were just fetched
    out = pf.predict(_ctx(1, (0, 1), resident))
    # every score is 1e-8 x the layer decay: the current layer's unrouted experts first, in index order
    assert out[:3] == [(1, 2), (1, 3), (2, 0)]
    assert len(out) == 3 * 4 - 3 and (0, 0) not in out  # layers 1..3, earlier layers never
    assert _prefetcher().predict(_ctx(1, (0, 1), resident)) == [(1, 2)]  # one per call by default


def test_a_matched_past_request_orders_the_prefetches_by_its_counts():
    pf = _prefetcher(limit=100)
    pf.begin_batch((0,))
    for layer, experts in enumerate([(0, 1), (2, 3), (3, 1), (0, 2)]):
        pf.observe(None, layer, SimpleNamespace(experts=experts, tokens=(1, 1)))
    pf.end_batch((0,))
    pf.begin_batch((1,))
    out = pf.predict(_ctx(0, (0, 1), {(0, 0), (0, 1)}))
    # the past request's layer-1 experts (count x decay 0.8) beat this layer's unused ones (1e-8 x 1)
    assert out[:4] == [(1, 2), (1, 3), (2, 1), (2, 3)]


def test_the_2024_preset_brings_the_studys_moe_infinity_tpot_within_30_percent():
    points = {p.id: p for p in read_catalogue()}
    for pid in ("study-mi95-tpot", "study-mi50-tpot", "mir24-mixtral-mi"):
        p = points[pid]
        assert p.preset == "moe-infinity-2024"
        o = predict(p)
        assert o.simulated and 0.7 <= o.ratio <= 1.3, (pid, o.ratio)
    assert points["mir-mixtral-mi"].preset == "moe-infinity"  # the 2025 rewrite: no per-layer prefetch
