"""``moesim sweep --executor ray``: the same tables as one local worker, and the same resumable journal."""

from __future__ import annotations

from pathlib import Path

import pytest

from moesim.errors import MoesimError
from moesim.simulator.sweep import build_grid, run_sweep, write_tables

TRACE = "qwen3-30b-a3b-bigmoeonedge"


def _points():
    return build_grid([TRACE], ["rtx-3060"], ["lru", "fiddler", "predictive", "belady"], [2, 8], [], [None],
                      None, [1])


def _tables(rows, folder: Path) -> tuple[bytes, bytes]:
    parquet, csv = write_tables(rows, folder)
    return parquet.read_bytes(), csv.read_bytes()


def test_an_unknown_executor_or_a_stray_address_is_a_one_line_error(tmp_path):
    with pytest.raises(MoesimError, match="--executor dask"):
        run_sweep(_points()[:1], tmp_path, executor="dask")
    with pytest.raises(MoesimError, match="--address .* needs --executor ray"):
        run_sweep(_points()[:1], tmp_path, address="auto")


def test_ray_sweep_matches_one_local_worker_and_resumes_a_local_journal(tmp_path):
    ray = pytest.importorskip("ray", reason='ray is not installed (pip install -e ".[ray]")')
    points = _points()
    local = run_sweep(points, tmp_path / "local", jobs=1, progress=False)
    # half the grid done locally, the rest on Ray into the same store
    run_sweep(points[: len(points) // 2], tmp_path / "moved", jobs=1, progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        messages = []
        moved = run_sweep(points, tmp_path / "moved", progress=False, executor="ray", log=messages.append)
        fresh = run_sweep(points, tmp_path / "ray", progress=False, executor="ray")
    finally:
        ray.shutdown()
    assert messages[0].startswith(f"{len(points) // 2} of {len(points)} configurations reused")
    expected = _tables(local, tmp_path / "local")
    assert _tables(fresh, tmp_path / "ray") == expected
    assert _tables(moved, tmp_path / "moved") == expected
    assert any(r["feasible"] for r in local) and any(r["prefetch"] == "predictive" for r in local)
