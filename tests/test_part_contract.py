"""Every registered policy part has an analytic time in the cost model, looked up by its registry name."""

from __future__ import annotations

from click.testing import CliRunner

from moesim.cli import cli
from moesim.costmodel.backbone import MISS_TABLES, PLACEMENT_TIMES, TRANSFER_TIMES, analytic_gap
from moesim.simulator.cache import CACHE_POLICIES
from moesim.simulator.compose import policy_spec
from moesim.simulator.placement import PLACEMENTS
from moesim.simulator.presets import PRESETS
from moesim.simulator.transfer import TRANSFERS


def test_every_registered_part_has_an_analytic_rule():
    assert set(PLACEMENTS.names()) == set(PLACEMENT_TIMES)
    assert set(TRANSFERS.names()) == set(TRANSFER_TIMES)
    assert set(CACHE_POLICIES.names()) == set(MISS_TABLES)
    for name, part in PLACEMENT_TIMES.items():  # a placement times a layer-step itself or leaves it to the copies
        assert name == "gpu" or part.decode is not None, name
    for name, part in TRANSFER_TIMES.items():  # a transfer mode times both phases, or whole layers (accelerate)
        assert (part.decode is None) == (part.prefill is None), name


def test_every_preset_is_timed_and_a_composition_without_a_rule_says_so():
    for name in PRESETS.names():
        assert analytic_gap(policy_spec(name)) == "", name
    assert "transfer 'layer'" in analytic_gap(policy_spec("lru+transfer=layer"))
    res = CliRunner().invoke(cli, ["costmodel", "predict", "--trace", "gpt-oss-120b-bigmoeonedge", "--policy",
                                   "lru+transfer=layer,lru", "--cache-experts", "2"])
    assert res.exit_code == 0, res.output
    assert "cannot run: the cost model times transfer 'layer' for whole resident layers only" in res.output
