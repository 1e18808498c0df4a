"""`moesim calib` survives a kill: each finished unit is journaled by content and a rerun resumes (#15)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest

from moesim.calib.calibrate import CalibOptions, calibrate
from moesim.calib.journal import CalibJournal, journal_path_for
from moesim.calib.measure import Grids
from moesim.calib.profile import load_profile
from moesim.calib.timing import RepeatPolicy

TINY_CONFIG = {
    "model_type": "mixtral", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "num_local_experts": 4,
    "num_experts_per_tok": 2, "vocab_size": 128, "max_position_embeddings": 4096,
}
TINY_GRIDS = Grids(
    expert_tokens=(1, 2, 4, 8), cpu_expert_tokens=(1, 4, 16), cpu_threads=(1,),
    copy_bytes=(65536, 262144, 2**20, 4 * 2**20), decode=((1, 16), (1, 128), (2, 64), (4, 128)),
    prefill_tokens=(4, 8, 16, 32), head_tokens=(1, 2, 4, 8),
    budget_expert_s=0.5, budget_cpu_expert_s=0.5, budget_copy_s=0.5, budget_non_expert_s=1, budget_head_s=0.3,
)
TINY_POLICY = RepeatPolicy(warmup=1, min_repeats=3, max_repeats=3, min_time_s=0.0, warmup_s=0.0)
# What the subprocesses run: the real `moesim calib` command on the tiny grid above.
SHRINK = f"""
import dataclasses, os, signal, sys
from math import inf
import moesim.calib.calibrate as calibrate
from moesim.calib.measure import Grids
from moesim.calib.timing import RepeatPolicy
calibrate.grids_for = lambda device, quick, cores: {TINY_GRIDS!r}
RepeatPolicy.quick = classmethod(lambda cls: {TINY_POLICY!r})
"""


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


def _calibrate(config, journal, grids=TINY_GRIDS):
    return calibrate(CalibOptions(device="cpu", model_config=str(config), quick=True, threads=1, grids=grids,
                                  policy=TINY_POLICY, journal=journal))


def test_units_are_reused_only_when_their_content_key_matches(tiny_config, tmp_path):
    path = tmp_path / ".p.json.calib-journal.json"
    first = _calibrate(tiny_config, CalibJournal(path))
    stored = json.loads(path.read_text())["units"]
    assert len(stored) >= 10 and {u["unit"] for u in stored.values()} >= {"expert/bf16", "copy/pinned/65536", "head"}

    again = CalibJournal(path)
    second = _calibrate(tiny_config, again)
    assert again.reused == len(stored)  # nothing measured again
    assert [s.to_dict() for s in second.measurements] == [s.to_dict() for s in first.measurements]

    # another expert grid: the expert groups are measured afresh, the copies and the rest are not
    regrid = CalibJournal(path)
    third = _calibrate(tiny_config, regrid, grids=dataclasses.replace(TINY_GRIDS, expert_tokens=(1, 3, 9, 27)))
    assert regrid.reused == len(stored) - 3  # bf16, int8, int4 groups
    assert [p.x["tokens"] for p in third.series("expert/bf16").points] == [1, 3, 9, 27]

    # another model: no unit is reused
    other = tmp_path / "other.json"
    other.write_text(json.dumps(dict(TINY_CONFIG, hidden_size=256)))
    fresh = CalibJournal(path)
    _calibrate(other, fresh)
    assert fresh.reused == 0


def test_an_unreadable_journal_is_ignored_with_a_message(tmp_path):
    path = tmp_path / ".p.json.calib-journal.json"
    path.write_text('{"version": 1, "units": {"abc": ')
    said = []
    journal = CalibJournal(path, said.append)
    assert journal.units == {} and "unreadable calibration journal" in said[0]


def _calib_cmd(config, out):
    return ["calib", "--device", "cpu", "--quick", "--threads", "1", "--model-config", str(config), "--out", str(out)]


def _run(config, out, kill_at_unit: int = 0) -> subprocess.CompletedProcess:
    """`moesim calib` on the tiny grid; with ``kill_at_unit`` it SIGKILLs itself once that unit is measured
    and before it is journaled (the unit in flight), and it counts the units it measured in a side file."""
    code = SHRINK + textwrap.dedent(f"""
        from moesim.calib.journal import CalibJournal
        real, n = CalibJournal.store, [0]
        def store(self, key, unit, payload):
            n[0] += 1
            with open({str(out) + '.measured'!r}, "a") as f:
                f.write(unit + "\\n")
            if n[0] == {kill_at_unit}:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, key, unit, payload)
        CalibJournal.store = store
        from moesim.cli import main
        main(sys.argv[1:])
    """)
    return subprocess.run([sys.executable, "-c", code] + _calib_cmd(config, out), capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)


def test_sigkill_during_calib_loses_only_the_unit_in_flight_and_a_rerun_resumes(tiny_config, tmp_path):
    out = tmp_path / "p.json"
    killed = _run(tiny_config, out, kill_at_unit=6)
    assert killed.returncode == -signal.SIGKILL and "Traceback" not in killed.stderr
    journal = journal_path_for(out)
    assert not out.exists() and journal.is_file()
    kept = json.loads(journal.read_text())["units"]
    assert len(kept) == 5  # the sixth was measured but not yet journaled: the one unit lost
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    measured_before = (tmp_path / "p.json.measured").read_text().splitlines()
    (tmp_path / "p.json.measured").unlink()
    resumed = _run(tiny_config, out)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming: 5 finished units" in resumed.stderr and "Traceback" not in resumed.stderr
    measured_after = (tmp_path / "p.json.measured").read_text().splitlines()
    assert set(measured_after).isdisjoint(measured_before[:5]) and measured_before[5] in measured_after
    profile = load_profile(out)
    assert "5 units resumed from an interrupted run" in profile.notes
    assert not journal.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["p.json", "p.json.measured"]
    # off a terminal, progress is plain lines with a rate and an ETA
    lines = [ln for ln in resumed.stderr.splitlines() if ln.startswith("calib: ")]
    assert any("unit/s, ETA" in ln for ln in lines)
    done, total = re.match(r"calib: (\d+)/(\d+) unit", lines[-1]).groups()
    assert done == total


class _ModelTimer:
    """A Timer whose calls take the seconds they return (no clock: the test does not depend on the load)."""

    def __new__(cls, policy):
        from moesim.calib.timing import Timer

        class Modelled(Timer):
            def once(self, fn):
                return fn()

        return Modelled(__import__("torch").device("cpu"), policy)


def test_the_quick_grid_stops_at_the_first_compute_bound_point_and_times_costly_points_less():
    from moesim.calib.timing import Budget

    policy = RepeatPolicy(warmup=2, min_repeats=5, max_repeats=5, min_time_s=0.0, warmup_s=0.0, costly_s=0.05,
                          costly_repeats=3, stop_when_compute_bound=True)
    timer = _ModelTimer(policy)
    grid = [{"tokens": float(t)} for t in (1, 2, 4, 16, 64, 256)]
    unit = 0.005
    # a flat memory roof up to 2 tokens, then time grows with the tokens
    points = timer.grid(grid, lambda x: (lambda: unit * max(2.0, x["tokens"])), Budget(60), work=lambda x: x["tokens"])
    assert [p.x["tokens"] for p in points] == [1, 2, 4, 16]  # 4 is compute-bound; 16 keeps the minimum of 4 points
    assert [p.repeats for p in points] == [5, 5, 5, 3]  # 16 tokens (80 ms) is a costly point

    flat = timer.grid(grid, lambda x: (lambda: unit), Budget(60), work=lambda x: x["tokens"])
    assert len(flat) == 6  # never compute-bound: the whole grid
    # the default (full) policy measures the whole grid whatever the times
    assert len(_ModelTimer(RepeatPolicy()).grid(grid, lambda x: (lambda: unit * x["tokens"]), Budget(60),
                                                work=lambda x: x["tokens"])) == 6
