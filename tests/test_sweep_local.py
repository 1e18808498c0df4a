"""The local executor with several workers: set-up units, their order, the chunks and what a failed set-up does."""

from __future__ import annotations

import os
import signal

import pytest

from moesim.simulator import sweep
from moesim.simulator.sweep import build_grid, run_sweep

TRACE = "gpt-oss-120b-bigmoeonedge"


def _grid():
    return build_grid([TRACE], ["rtx-3060"], ["lru", "predictive", "belady"], [2, 8], [], [None], None, [1])


def test_setup_units_compile_every_workload_first_and_only_predictive_points_wait_for_a_fit():
    points = _grid()
    units, needs = sweep._setup_units(points)
    fits = [i for i, u in enumerate(units) if u.fit]
    compiles = [i for i, u in enumerate(units) if not u.fit]
    assert len(fits) == 1 and compiles and max(compiles) < min(fits)
    for p, need in zip(points, needs):
        assert sum(units[i].fit for i in need) == (p.policy == "predictive")
        assert sum(not units[i].fit for i in need) == 1  # its compiled workload


def test_chunks_keep_a_policy_together_and_wait_for_all_their_units():
    points = _grid()
    _, needs = sweep._setup_units(points)
    keys = sweep.point_keys(points)
    assert keys == [p.key() for p in points]
    chunks = sweep._chunks(list(zip(points, keys, needs)), jobs=1)
    assert sorted(k for c, _ in chunks for _, k in c) == sorted(keys)
    for members, need in chunks:
        assert all(k == p.key() for p, k in members)
        assert len({(p.trace, p.batch, p.policy) for p, _ in members}) == 1
        assert need == set().union(*(set(needs[points.index(p)]) for p, _ in members))


def test_a_set_up_process_that_dies_costs_time_not_rows(tmp_path, monkeypatch):
    # the set-up processes are forked: they see this patch and die on their first unit; the points then set
    # themselves up, and the tables are those of one worker
    if "fork" not in __import__("multiprocessing").get_all_start_methods():
        pytest.skip("needs the fork start method")
    points = _grid()
    one = run_sweep(points, tmp_path / "one", jobs=1, progress=False)
    parent = os.getpid()
    run_unit = sweep._SetupUnit.run

    def dies_in_a_child(self):
        if os.getpid() != parent:
            os._exit(3)
        run_unit(self)

    monkeypatch.setattr(sweep._SetupUnit, "run", dies_in_a_child)
    monkeypatch.setenv("MOESIM_CACHE_DIR", str(tmp_path / "cold-cache"))

    def stuck(signum, frame):
        raise TimeoutError("the sweep waits for set-up that a dead process will never finish")

    old = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(300)  # a waiting sweep fails here instead of hanging the suite
    try:
        two = run_sweep(points, tmp_path / "two", jobs=2, progress=False)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    for rows, out in ((one, tmp_path / "one"), (two, tmp_path / "two")):
        sweep.write_tables(rows, out)
    for name in (sweep.CSV, sweep.PARQUET):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
