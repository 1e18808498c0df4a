"""Write failures end in one line, checked before long work where they can be (#15 finding 6)."""

from __future__ import annotations

import time

from click.testing import CliRunner

from faults import full_folder, leftovers, readonly_folder
from moesim.cli import cli

TRACE = "gpt-oss-120b-bigmoeonedge"


def one_line_error(res, *fragments):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = [l for l in res.output.splitlines() if l.startswith("moesim: error: ")]
    assert len(lines) == 1, res.output
    for f in fragments:
        assert f in lines[0], lines[0]


def run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_read_only_sweep_out_fails_before_any_work(tmp_path):
    with readonly_folder(tmp_path) as ro:
        res = run(["sweep", "--trace", TRACE, "--policy", "lru", "--cache-experts", "4", "--no-progress",
                   "--out", str(ro / "sweep")])
        one_line_error(res, str(ro / "sweep"))
        assert "configurations" not in res.output


def test_read_only_search_report_fails_before_the_search(tmp_path):
    with readonly_folder(tmp_path) as ro:
        t0 = time.perf_counter()
        res = run(["search", "--trace", TRACE, "--report", str(ro / "report")])
        one_line_error(res, str(ro / "report"), "not writable")
        assert "search [" not in res.output and time.perf_counter() - t0 < 10


def test_full_disk_timeline_is_one_line_and_leaves_nothing(tmp_path):
    with full_folder(tmp_path) as full:
        res = run(["simulate", "--trace", TRACE, "--cache-experts", "4", "--timeline", str(full / "tl.json")])
        one_line_error(res, "tl.json", "cannot write")
        assert leftovers(full) == []


def test_full_disk_sweep_is_one_line_and_leaves_no_unreadable_file(tmp_path):
    with full_folder(tmp_path) as full:
        res = run(["sweep", "--trace", TRACE, "--policy", "lru", "--cache-experts", "4", "--no-progress",
                   "--out", str(full / "sweep")])
        one_line_error(res)
        assert not [p for p in leftovers(full) if p.endswith(".tmp") or p.endswith((".parquet", ".png"))]


def test_full_disk_sweep_plot_is_one_line(tmp_path, monkeypatch):
    """Tables fit, the plot does not: simulated by a PNG writer that hits ENOSPC."""
    import errno

    import matplotlib.figure

    def no_space(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", no_space)
    res = run(["sweep", "--trace", TRACE, "--policy", "lru", "--cache-experts", "4", "--no-progress",
               "--out", str(tmp_path / "s"), "--jobs", "1"])
    one_line_error(res, "sweep.png", "No space left")
    assert not list((tmp_path / "s").glob(".*.tmp"))
