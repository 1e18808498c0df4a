"""Phase edges of the routing model: the prompt's last positions and decode's first route by their own
popularity, copy only the cell before them, and are no token's source past the edge (tracer/routing.py)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from moesim.errors import MoesimError
from moesim.tracer import DECODE, PREFILL, write_trace
from moesim.tracer.routing import edge_positions, read_routing, routing_to_json, write_routing
from moesim.tracer.routing_fit import boundary_profile, find_edge, fit_routing_cells, request_grid
from moesim.tracer.synth import synthesize
from test_routing_synth import E, L, known_model, run, synth_trace

PROMPT_EDGE, DECODE_EDGE = 2, 3


def edged_model(fidelity=(1.0, 1.0), drift=None):
    """Steady routing on experts 0-3 only; the prompt's last 2 positions on {6, 7}; decode's first 3 on 4-7
    (uniform), the first of them drawn fresh and the next two copying the cell before."""
    m = known_model(copy_rank0_prev=fidelity[0], copy_rank1_prev=fidelity[1], drift=drift)
    pop = m.decode.class_popularity.copy()
    pop[..., 4:] = 0.0
    pop /= pop.sum(axis=2, keepdims=True)
    steady = dataclasses.replace(m.decode, class_popularity=pop)
    prompt_edge = np.zeros((PROMPT_EDGE, L, E))
    prompt_edge[..., 6:] = 0.5
    decode_edge = np.zeros((DECODE_EDGE, L, E))
    decode_edge[..., 4:] = 0.25
    return dataclasses.replace(
        m, prefill=dataclasses.replace(steady, edge_popularity=prompt_edge, edge_copy=np.zeros(PROMPT_EDGE)),
        decode=dataclasses.replace(steady, edge_popularity=decode_edge, edge_copy=np.array([0.0, 1.0, 1.0])))


def grid(model, requests=50, prompt=6, output=10, seed=0, **kw) -> np.ndarray:
    """Experts [requests, positions, L, K], each cell sorted."""
    tr = synth_trace(model, requests=requests, prompt=prompt, output=output, seed=seed, **kw)
    return np.sort(request_grid(tr.cells)[0], axis=-1)


@pytest.mark.parametrize("drift", [None, np.full(L, 0.01)])
def test_edge_positions_draw_their_own_experts_and_are_no_source_past_the_edge(drift):
    ex = grid(edged_model(drift=drift))
    assert (ex[:, :4] < 4).all()  # the prompt before its edge: steady experts
    assert (ex[:, 4:6] == [6, 7]).all()  # the prompt's edge
    assert (ex[:, 6] >= 4).all()  # decode's first position, drawn from its edge popularity
    assert (ex[:, 7] == ex[:, 6]).all() and (ex[:, 8] == ex[:, 6]).all()  # the next two copy the cell before
    # past the edge, every token copies the token before, but not an edge cell: the first steady cell draws
    # fresh from the steady popularity, and with a strong urn (drift 0.01) the edge draws would fill it were
    # they counted in it
    assert (ex[:, 9:] < 4).all()
    assert (ex[:, 10:] == ex[:, 9:10]).all()


def test_a_model_without_a_prefill_phase_has_no_prompt_edge():
    m = edged_model()
    assert edge_positions(m) == (PROMPT_EDGE, DECODE_EDGE)
    # its prefill routes like decode, but decode's edge lies at decode's start, not at the prompt's end
    no_prefill = dataclasses.replace(m, prefill=None)
    assert edge_positions(no_prefill) == (0, DECODE_EDGE)
    ex = grid(no_prefill)
    assert (ex[:, :6] < 4).all() and (ex[:, 6] >= 4).all()


def test_edges_switch_off_with_the_phase_boundary_and_copy_only_with_locality():
    model = edged_model()
    assert (grid(model, disabled=("phase-boundary",)) < 4).all()
    no_copies = grid(model, disabled=("locality",))
    assert (no_copies[:, 6:9] >= 4).all()
    assert (no_copies[:, 7] == no_copies[:, 6]).all(axis=(-1, -2)).mean() < 0.5


def edged_trace(requests=48, seed=1):
    return synth_trace(edged_model(fidelity=(0.6, 0.4)), requests=requests, prompt=40, output=40, seed=seed)


def test_fit_finds_the_edges_their_popularity_and_copies():
    tr = edged_trace()
    assert (find_edge(tr.cells, PREFILL, E), find_edge(tr.cells, DECODE, E)) == (PROMPT_EDGE, DECODE_EDGE)
    fitted = fit_routing_cells(tr.cells, tr.meta, "edged", groups=1)
    pre, dec = fitted.phase("prefill"), fitted.phase("decode")
    assert (pre.edge_positions, dec.edge_positions) == (PROMPT_EDGE, DECODE_EDGE)
    # the edges' experts, each near its true weight (48 requests: a position's shares are 96 draws)
    truth = edged_model()
    assert pre.edge_popularity[..., :6].max() < 0.01 and dec.edge_popularity[..., :4].max() < 0.01
    for got, want in ((pre, truth.prefill), (dec, truth.decode)):
        assert np.abs(got.edge_popularity - want.edge_popularity).max() < 0.12
    assert dec.edge_copy[0] < 0.1 and (dec.edge_copy[1:] > 0.9).all()
    assert dec.carry == 0.0  # the reuse across the boundary is the edges'
    assert fitted.fitted_to["phase_edges"] == {"prefill": PROMPT_EDGE, "decode": DECODE_EDGE}
    # the steady popularity leaves the edges' experts out
    assert dec.popularity()[:, 4:].max() < 0.005
    # its synthesis has the trace's positions around the boundary
    offsets = list(range(-3, 5))
    real = boundary_profile(tr.cells, offsets, E)
    syn = boundary_profile(synthesize(fitted, np.full(48, 40), np.full(48, 40), seed=5).cells, offsets, E)
    assert np.abs(syn.distance - real.distance).max() < 0.1 and np.abs(syn.reuse - real.reuse).max() < 0.1


def test_fit_command_says_the_edges(tmp_path):
    tr = edged_trace()
    write_trace(tmp_path / "t.parquet", tr.meta, tr.cells)
    r = run("fit", str(tmp_path / "t.parquet"), "--request-groups", "1", "--out", str(tmp_path / "r.json"))
    assert r.exit_code == 0 and "phase edges: the prompt's last 2 positions, decode's first 3" in r.output, r.output
    assert read_routing(tmp_path / "r.json").decode.edge_positions == DECODE_EDGE


def test_no_edges_where_the_boundary_routes_like_its_phase_or_too_few_requests():
    plain = synth_trace(known_model(), requests=48, prompt=40, output=40, seed=2)
    assert (find_edge(plain.cells, PREFILL, E), find_edge(plain.cells, DECODE, E)) == (0, 0)
    fitted = fit_routing_cells(plain.cells, plain.meta, "plain", groups=1)
    assert fitted.decode.edge_popularity is None and fitted.decode.edge_copy is None
    few = edged_trace(requests=6)
    assert fit_routing_cells(few.cells, few.meta, "few", groups=1).decode.edge_positions == 0
    # positions too short to hold a position inside the phase: no edge can be told from noise
    short = synth_trace(edged_model(), requests=48, prompt=6, output=10)
    assert find_edge(short.cells, DECODE, E) == 0


def test_edges_round_trip_and_older_files_read_without_them(tmp_path):
    m = edged_model()
    back = read_routing(write_routing(tmp_path / "e.json", m))
    assert routing_to_json(back) == routing_to_json(m) and back.decode.edge_positions == DECODE_EDGE
    a = synthesize(m, np.full(5, 6), np.full(5, 10), seed=3).cells
    b = synthesize(back, np.full(5, 6), np.full(5, 10), seed=3).cells
    assert np.array_equal(a.experts, b.experts)
    d = json.loads(routing_to_json(known_model()))
    for phase in ("decode",):
        del d["phases"][phase]["edge_popularity"], d["phases"][phase]["edge_copy"]
    (tmp_path / "v5.json").write_text(json.dumps(dict(d, version=5)))
    old = read_routing(tmp_path / "v5.json")
    assert old.version == 5 and old.decode.edge_popularity is None


@pytest.mark.parametrize("change, message", [
    (lambda p: p.pop("edge_copy"), "'edge_popularity' and 'edge_copy' come together"),
    (lambda p: p.update(edge_copy=[0.5, 1.5, 0.0]), "'edge_copy' has probabilities above 1"),
    (lambda p: p.update(edge_copy=[]), "'edge_copy' must be a non-empty list"),
    (lambda p: p.update(edge_copy=[0.5, 0.5]), r"'edge_popularity' has shape \[3, 3, 8\], expected \[2, 3, 8\]"),
    (lambda p: p["edge_popularity"][0][0].__setitem__(4, 0.9), "'edge_popularity' rows must each sum to 1"),
])
def test_bad_edges_are_one_line_errors(tmp_path, change, message):
    d = json.loads(routing_to_json(edged_model()))
    change(d["phases"]["decode"])
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(MoesimError, match=message):
        read_routing(tmp_path / "bad.json")
