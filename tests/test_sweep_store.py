"""The sweep's results store: content-addressed reuse (#15 finding 1) and a store that only grows (finding 2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from click.testing import CliRunner

from moesim.cli import cli
from moesim.simulator.sweep import STORE, build_grid, list_grids, read_store, run_sweep

TRACE = "gpt-oss-120b-bigmoeonedge"


def run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def _bundled_profile(name: str):
    from moesim.calib.profile import bundled_profiles

    return bundled_profiles()[name]


def _csv_rows(path):
    lines = path.read_text().splitlines()
    head = lines[0].split(",")
    return [dict(zip(head, l.split(","))) for l in lines[1:]]


def test_a_recalibrated_profile_at_the_same_path_is_recomputed_not_reused(tmp_path):
    prof = tmp_path / "my-machine.json"
    shutil.copy(_bundled_profile("rtx-3060"), prof)
    args = ["sweep", "--trace", TRACE, "--profile", str(prof), "--policy", "lru", "--cache-experts", "4",
            "--no-progress", "--no-plot", "--out", str(tmp_path / "out"), "--jobs", "1"]
    first = run(args)
    assert first.exit_code == 0, first.output
    tpot1 = float(_csv_rows(tmp_path / "out" / "sweep.csv")[0]["tpot_mean_s"])
    # "recalibrate": the copies get 10x slower
    data = json.loads(prof.read_text())
    for name, link in data["copy"].items():
        if name.startswith("h2d"):
            link["bytes_per_s"] /= 10
    prof.write_text(json.dumps(data))
    second = run(args)
    assert second.exit_code == 0, second.output
    tpot2 = float(_csv_rows(tmp_path / "out" / "sweep.csv")[0]["tpot_mean_s"])
    assert tpot2 > 1.5 * tpot1
    assert "0 of 1 configurations reused" in second.output
    third = run(args)
    assert "1 of 1 configurations reused" in third.output


def test_a_trace_replaced_at_the_same_path_is_recomputed(tmp_path):
    from moesim.traces import resolve_trace

    trace = tmp_path / "t.parquet"
    shutil.copy(resolve_trace(TRACE), trace)
    points = build_grid([str(trace)], ["rtx-3060"], ["lru"], [4], [], [None], None, [1])
    a = run_sweep(points, tmp_path / "out", jobs=1, progress=False)
    shutil.copy(resolve_trace("qwen3-30b-a3b-bigmoeonedge"), trace)
    b = run_sweep(points, tmp_path / "out", jobs=1, progress=False)
    assert a[0]["point_key"] != b[0]["point_key"]
    assert a[0]["tpot_mean_s"] != b[0]["tpot_mean_s"]
    assert len(read_store(tmp_path / "out")) == 2


def test_a_second_grid_keeps_the_first_readable_and_prints_only_its_own(tmp_path):
    out = str(tmp_path / "out")
    base = ["sweep", "--trace", TRACE, "--no-progress", "--no-plot", "--out", out, "--jobs", "1"]
    a = run(base + ["--policy", "lru", "--cache-experts", "2,4"])
    b = run(base + ["--policy", "lfu", "--cache-experts", "4"])
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    # the printed and written table is the run's own grid
    assert [r["policy"] for r in _csv_rows(tmp_path / "out" / "sweep.csv")] == ["lfu"]
    assert "lru " not in b.stdout
    grids = list_grids(tmp_path / "out")
    assert len(grids) == 2 and all(g.finished for g in grids)
    listing = run(["sweep", "--list", "--out", out])
    assert listing.exit_code == 0 and all(g.grid in listing.output for g in grids)
    everything = run(["sweep", "--all", "--out", out])
    table_lines = [l for l in everything.output.splitlines() if l.startswith(("lru ", "lfu "))]
    assert len(table_lines) == 3
    # the first grid's rerun is reused whole and its table is byte-identical
    first_csv = (tmp_path / "out" / grids[0].folder / "sweep.csv").read_bytes()
    again = run(base + ["--policy", "lru", "--cache-experts", "2,4"])
    assert "2 of 2 configurations reused" in again.output
    assert (tmp_path / "out" / "sweep.csv").read_bytes() == first_csv


def test_concurrent_sweeps_on_different_grids_lose_no_rows(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    cmds = [[sys.executable, "-m", "moesim.cli", "sweep", "--trace", TRACE, "--policy", pol, "--cache-experts",
             "2,4,8", "--no-progress", "--no-plot", "--jobs", "1", "--out", str(out)] for pol in ("lru", "fifo")]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) for c in cmds]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    assert len(read_store(out)) == 6
    assert len(list((out / STORE).glob("rows-*.jsonl"))) == 2
    grids = list_grids(out)
    assert len(grids) == 2 and all(g.finished for g in grids)
