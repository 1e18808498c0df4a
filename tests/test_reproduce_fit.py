"""The registry of fitted parameters: the fit, leave-one-source-out, and the values' scope."""

from __future__ import annotations

from dataclasses import replace

import pytest

from moesim.errors import MoesimError
from moesim.reproduce import fit
from moesim.reproduce.catalogue import read_catalogue


def _points(sources: dict[str, float]):
    """Two speed points per source, published = factor x the point's base time."""
    base = [p for p in read_catalogue() if p.is_speed and not p.unsimulable][:2]
    out = []
    for source, factor in sources.items():
        for i, p in enumerate(base):
            out.append(replace(p, id=f"{source}-{i}", source=source, value=factor * (i + 1.0)))
    return out


def _registry(points, store, neutral=1.0):
    param = fit.FittedParameter(
        name="k", meaning="a test scale", unit="x", used_in="the test's store", points=tuple(p.id for p in points),
        bounds=(0.1, 10.0), neutral=neutral, read=lambda: store["k"], write=lambda v: store.__setitem__("k", v))
    return {"k": param}


def test_fit_recovers_the_value_that_reproduces_the_points_and_restores_the_committed_one():
    store = {"k": 1.0}
    points = _points({"a": 2.5})
    reg = _registry(points, store)
    base = {p.id: p.value / 2.5 for p in points}
    calls = []

    def predict(p):
        calls.append(p.id)
        return store["k"] * base[p.id]

    fits = fit.fit_all(points, predict, registry=reg)
    assert fits["k"].value == pytest.approx(2.5, rel=2e-3)
    assert fits["k"].rms_log_error < 1e-2 and fits["k"].points == tuple(p.id for p in points)
    assert fits["k"].stale  # the store commits 1.0
    assert store["k"] == 1.0  # the fit leaves the committed value in place
    again = fit.fit_all(points, predict, registry=reg)
    assert again["k"].value == fits["k"].value  # deterministic


def test_leave_one_source_out_refits_without_the_held_out_source():
    store = {"k": 1.0}
    points = _points({"a": 2.0, "b": 3.0})
    reg = _registry(points, store)
    base = {p.id: p.value / (2.0 if p.source == "a" else 3.0) for p in points}
    value = fit.memoized(lambda p: store["k"] * base[p.id], reg)
    loso = fit.leave_one_source_out(points, value, registry=reg)
    assert loso["a"] == pytest.approx(0.5, rel=1e-2)  # k fitted on b (3) predicts a (2): 3/2 - 1
    assert loso["b"] == pytest.approx(1 / 3, rel=1e-2)  # k fitted on a (2) predicts b (3): 1 - 2/3


def test_a_parameter_with_every_point_held_out_takes_its_neutral_value():
    store = {"k": 4.0}
    points = _points({"a": 2.0})
    reg = _registry(points, store, neutral=1.0)
    base = {p.id: p.value / 2.0 for p in points}
    loso = fit.leave_one_source_out(points, lambda p: store["k"] * base[p.id], registry=reg)
    assert loso["a"] == pytest.approx(0.5)  # neutral 1.0 predicts half the published value


def test_a_value_that_makes_a_point_infeasible_is_not_a_fit():
    store = {"k": 1.0}
    points = _points({"a": 2.0})
    reg = _registry(points, store)
    base = {p.id: p.value / 2.0 for p in points}
    # above k = 3 the configuration "does not fit" (nan): the fit stays where every point is simulated
    fits = fit.fit_all(points, lambda p: store["k"] * base[p.id] if store["k"] <= 3 else float("nan"), registry=reg)
    assert fits["k"].value == pytest.approx(2.0, rel=2e-3)


def test_a_parameter_is_registered_once_with_an_interval_and_points():
    with pytest.raises(MoesimError, match="not an interval"):
        fit.FittedParameter("x", "", "", "", ("p",), (1.0, 1.0), 0.0, lambda: 0.0, lambda v: None)
    with pytest.raises(MoesimError, match="no catalogue points"):
        fit.FittedParameter("x", "", "", "", (), (0.0, 1.0), 0.0, lambda: 0.0, lambda v: None)
    for name, param in fit.REGISTRY.items():
        with pytest.raises(MoesimError, match="registered twice"):
            fit.register(param)
        ids = {p.id for p in read_catalogue()}
        assert set(param.points) <= ids, f"{name} names points the catalogue lacks"


def test_accelerates_per_matrix_overhead_is_charged_for_every_offloaded_expert_matrix(monkeypatch):
    from moesim.calib.hosts import compose_profile
    from moesim.simulator import runtime
    from moesim.simulator.run import accelerate_layer_copy_s

    profile = compose_profile("a5000", "unstated", "pcie4")
    base = accelerate_layer_copy_s(profile, 64 * 17e6, 64, False)
    monkeypatch.setitem(runtime.FITTED_UNIT_COSTS, "accelerate.weight_overhead_s", 1e-3)
    per_matrix = runtime.runtime_costs("accelerate").weight_overhead_s
    assert per_matrix == 1e-3 and runtime.runtime_costs("moe-infinity").weight_overhead_s == 0.0
    assert accelerate_layer_copy_s(profile, 64 * 17e6, 64, False, per_matrix) == pytest.approx(base + 3 * 64 * 1e-3)


def test_committed_fitted_values_are_their_fit_on_the_catalogue():
    """The value every simulation uses is the one `moesim reproduce` fits (else: update simulator/runtime.py)."""
    from moesim.reproduce.run import predict

    points = read_catalogue()
    fits = fit.fit_all(points, fit.memoized(lambda p: predict(p).predicted))
    assert fits, "the registry is empty"
    for name, r in fits.items():
        assert not r.stale, f"{name}: committed {r.committed:.4g}, fitted {r.value:.4g}"
        assert r.points == fit.REGISTRY[name].points  # every point it names is simulated


def test_a_run_without_a_parameters_points_keeps_its_committed_value():
    store = {"k": 4.0}
    points = _points({"a": 2.0})
    reg = _registry(points, store)
    others = _points({"b": 3.0})
    fits = fit.fit_all(others, lambda p: store["k"], registry=reg)
    assert fits["k"].value == 4.0 and fits["k"].points == () and not fits["k"].stale


def test_leave_one_model_out_holds_out_a_models_points_whatever_their_source():
    # two sources publish the same run of model m: leave-one-source-out still fits k to it, by model it cannot
    store = {"k": 1.0}
    base = next(p for p in read_catalogue() if p.is_speed and not p.unsimulable)
    points = [replace(base, id=i, source=src, value=v, model=m)
              for i, src, v, m in (("a1", "a", 2.0, "m"), ("b1", "b", 2.0, "m"), ("b2", "b", 4.0, "n"))]
    reg = _registry(points, store)
    value = lambda p: store["k"]  # noqa: E731
    by_source = fit.leave_one_source_out(points, value, registry=reg)
    by_model = fit.leave_one_model_out(points, value, registry=reg)
    assert by_source["a"] == pytest.approx(8 ** 0.5 / 2 - 1, rel=1e-2)  # fitted on b1's 2.0 and b2's 4.0
    assert by_model["m"] == pytest.approx(1.0, rel=1e-2)  # fitted on n's 4.0 alone: twice m's 2.0
    assert by_model["n"] == pytest.approx(0.5, rel=1e-2)  # fitted on m's 2.0: half n's 4.0
    # pooled: the median of the three points' held-out errors (1, 1, 0.5), not of the two models' medians (0.75)
    assert by_model[fit.POOLED] == pytest.approx(1.0, rel=1e-2)


def test_a_fitted_table_notes_each_read_while_reads_is_open():
    from moesim.fitted import FittedTable, reads

    table = FittedTable("T", {"a": 1.0, "b": 2.0})
    assert table["a"] == 1.0  # outside reads(): a plain dict
    with reads() as outer:
        assert table["a"] == 1.0 and table.get("missing") is None
        with reads() as inner:
            assert dict(table) == {"a": 1.0, "b": 2.0}  # a copy reads every entry
        table["b"] = 3.0  # a write is not a read
    assert inner == {("T", "a"), ("T", "b")}
    assert outer == {("T", "a"), ("T", "missing"), ("T", "b")}  # the inner reads count for the outer too
    with reads() as after:
        sorted(table.items())
    assert after == {("T", "a"), ("T", "b")}
    with reads() as copied:
        assert table.copy() == {"a": 1.0, "b": 3.0}
    assert copied == {("T", "a"), ("T", "b")}


def test_every_registered_parameter_names_the_cell_the_simulator_reads_it_from():
    from moesim.fitted import reads

    for name, param in fit.REGISTRY.items():
        assert param.cell is not None, f"{name}: no cell, so every prediction would depend on it"
        with reads() as read:
            param.read()
        assert read == {param.cell}, name


def test_a_memoized_point_is_simulated_again_only_when_a_value_it_read_changes():
    from moesim.fitted import FittedTable

    table = FittedTable("T", {"a": 1.0, "b": 1.0})
    store = {"c": 1.0}

    def param(name, cell, read, write):
        return fit.FittedParameter(name=name, meaning="", unit="x", used_in="", points=("x",), bounds=(0.1, 10.0),
                                   neutral=1.0, read=read, write=write, cell=cell)

    reg = {n: param(n, ("T", n), lambda n=n: table[n], lambda v, n=n: table.__setitem__(n, v)) for n in "ab"}
    base = next(p for p in read_catalogue() if p.is_speed and not p.unsimulable)
    x, y = replace(base, id="x"), replace(base, id="y")
    calls = []

    def predict(p):
        calls.append(p.id)
        return table["a"] if p.id == "x" else table["b"] * (2.0 if table["b"] > 1.5 else 1.0)

    value = fit.memoized(predict, reg)
    assert (value(x), value(y)) == (1.0, 1.0) and calls == ["x", "y"]
    with fit.values({"a": 2.0}, reg):
        assert (value(x), value(y)) == (2.0, 1.0) and calls == ["x", "y", "x"]  # y never read a
    with fit.values({"b": 2.0}, reg):
        assert (value(x), value(y)) == (1.0, 4.0) and calls == ["x", "y", "x", "y"]
    assert (value(x), value(y)) == (1.0, 1.0) and len(calls) == 4  # the committed values, remembered
    # a parameter without a cell: every prediction is taken to depend on it
    reg["c"] = param("c", None, lambda: store["c"], lambda v: store.__setitem__("c", v))
    value = fit.memoized(predict, reg)
    value(x)
    with fit.values({"c": 2.0}, reg):
        value(x)
    assert calls[-2:] == ["x", "x"]


def test_a_ktransformers_point_does_not_read_the_gpu_offloading_runtimes_fitted_costs():
    """What makes the memo pay: refits of accelerate's or MoE-Infinity's cost leave the CPU-expert points as
    they were, and the slowest points to simulate are KTransformers' long decodes."""
    from moesim.fitted import reads
    from moesim.reproduce.run import predict

    points = {p.id: p for p in read_catalogue()}
    with reads() as kt:
        predict(points["kt-v02-2s"])
    with reads() as mi:
        predict(points["mir-mixtral-mi"])
    cells = {name: param.cell for name, param in fit.REGISTRY.items()}
    assert cells["ktransformers.numa_split_gain"] in kt and cells["server.cpu_int4_rate"] in kt
    assert cells["accelerate.weight_overhead_s"] not in kt and cells["moe-infinity.expert_overhead_s"] not in kt
    assert cells["moe-infinity.expert_overhead_s"] in mi and cells["accelerate.weight_overhead_s"] not in mi
