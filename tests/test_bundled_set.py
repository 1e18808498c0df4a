"""The bundled traces are a fixed, checksummed set (#15 finding 3)."""

from __future__ import annotations

import shutil

import pytest

import moesim.traces as traces_pkg
from moesim.errors import MoesimError
from moesim.simulator.config import SimConfig
from moesim.simulator.presets import get_preset
from moesim.simulator.run import simulate
from moesim.traces import BUNDLED_SHA256, bundled_traces, resolve_trace


def _predictive_tpot() -> float:
    config = SimConfig(policy=get_preset("predictive"), cache_experts=12)
    return simulate(resolve_trace("qwen3-30b-a3b-bigmoeonedge"), "rtx-3060", config).tpot_mean_s


def test_a_trace_written_into_the_traces_folder_is_not_bundled_and_changes_nothing():
    before = _predictive_tpot()
    folder = bundled_traces()["qwen3-30b-a3b-bigmoeonedge"].parent
    mine = folder / "zz-user-written-test.parquet"
    # a user's trace, as `moesim trace --out traces/mine.parquet` would leave it
    shutil.copy(bundled_traces()["gemma-4-26b-a4b-bigmoeonedge"], mine)
    try:
        assert "zz-user-written-test" not in bundled_traces()
        assert set(bundled_traces()) == set(BUNDLED_SHA256)
        from moesim.simulator import predictor
        from moesim.simulator.session import forget_replays

        predictor._FITTED.clear()
        forget_replays()
        assert _predictive_tpot() == before
        # it is still usable as a path
        assert resolve_trace(str(mine)) == mine
    finally:
        mine.unlink()


def test_every_bundled_trace_matches_its_checksum():
    for name in BUNDLED_SHA256:
        assert traces_pkg.verified_bundled_trace(name).is_file()


def test_a_bundled_trace_whose_bytes_changed_is_refused(monkeypatch):
    monkeypatch.setitem(BUNDLED_SHA256, "gpt-oss-120b-bigmoeonedge", "0" * 64)
    with pytest.raises(MoesimError, match="differs from the shipped file"):
        resolve_trace("gpt-oss-120b-bigmoeonedge")
