"""A policy as one string (simulator/compose.py), read the same way by simulate, sweep, search and validate."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from moesim.cli import cli
from moesim.errors import MoesimError
from moesim.simulator.compose import PARTS, build_policy, canonical_name, policy_names, policy_spec
from moesim.simulator.presets import PRESETS, get_preset

TRACE = "gpt-oss-120b-bigmoeonedge"


def run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_the_string_builds_the_same_spec_as_simulates_part_flags():
    composed = policy_spec("lru+prefetch=oracle+scope=global+gating=0.2+placement=fiddler+placement-rule=code")
    flags = build_policy("lru", prefetch="oracle", scope="global", gating="0.2", placement="fiddler",
                         placement_rule="code")
    assert composed == flags
    assert (composed.cache.scope, composed.prefetch.policy, composed.placement.policy, composed.placement.rule) == (
        "global", "oracle", "fiddler", "code")
    # a part the flags give may also come from the string, but not both at once
    assert build_policy("lru+scope=global", prefetch="oracle") == policy_spec("lru+prefetch=oracle+scope=global")
    with pytest.raises(MoesimError, match="--scope layer and --policy 'lru\\+scope=global' both set scope"):
        build_policy("lru+scope=global", scope="layer")


def test_one_policy_has_one_name():
    assert canonical_name("lru+scope=global+prefetch=oracle") == "lru+prefetch=oracle+scope=global"
    assert canonical_name(" lru + prefetch = oracle ") == "lru+prefetch=oracle"
    assert canonical_name("lru+eviction=lru") == "lru"  # a part that changes nothing is not part of the name
    assert canonical_name("lru+gating=0.10") == canonical_name("lru+gating=0.1") == "lru+gating=0.1"
    assert policy_names(["lru", "lru+eviction=lru", "fiddler"]) == ["lru", "fiddler"]
    for preset in PRESETS.names():  # a plain preset keeps its name and its spec
        assert canonical_name(preset) == preset
        assert policy_spec(preset) == get_preset(preset)


@pytest.mark.parametrize("text, fragment", [
    ("lru+eviction=arc", "--policy 'lru+eviction=arc': eviction 'arc': expected one of lru, fifo, lfu"),
    ("lru+prefetch=psychic", "prefetch 'psychic': expected one of none, next-layer"),
    ("lru+scope=world", "scope 'world': expected one of layer, global"),
    ("lru+gating=often", "gating 'often': expected one of off, adapmoe"),
    ("lru+guess=accuracy:2", "guess 'accuracy:2': expected auto, trace, previous-token or accuracy:P"),
    ("lru+cache=4", "'cache=4': expected PART=VALUE with PART one of " + ", ".join(PARTS)),
    ("lru+scope", "'scope': expected PART=VALUE"),
    ("lru+scope=global+scope=layer", "part scope given twice"),
    ("nope+scope=global", "preset 'nope': expected one of lru, lfu"),
    ("+scope=global", "expected a preset name first"),
])
def test_a_bad_part_names_the_part_and_its_choices(text, fragment):
    with pytest.raises(MoesimError) as err:
        policy_spec(text)
    assert fragment in err.value.message


def test_sweep_takes_composed_policies_and_resumes_them_under_any_spelling(tmp_path):
    base = ["sweep", "--trace", TRACE, "--cache-experts", "4", "--no-progress", "--no-plot", "--out",
            str(tmp_path / "out"), "--jobs", "1"]
    first = run(base + ["--policy", "lru+scope=global+prefetch=oracle,fiddler"])
    assert first.exit_code == 0, first.output
    csv = (tmp_path / "out" / "sweep.csv").read_text()
    assert ",rtx-3060,lru+prefetch=oracle+scope=global,lru,global,oracle," in csv and ",rtx-3060,fiddler," in csv
    again = run(base + ["--policy", "fiddler,lru+prefetch=oracle+scope=global"])
    assert "2 of 2 configurations reused" in again.output
    composed = run(["simulate", "--trace", TRACE, "--cache-experts", "4", "--policy", "lru+prefetch=oracle",
                    "--scope", "global"])
    assert composed.exit_code == 0, composed.output
    assert "policy lru+prefetch=oracle+scope=global: cache lru/global, prefetch oracle" in composed.output
    bad = run(base + ["--policy", "lru+prefetch=psychic"])
    assert bad.exit_code == 2 and "prefetch 'psychic': expected one of" in bad.output


def test_a_knob_belongs_to_the_preset_under_its_parts():
    sized = {}
    for ratio in (0.5, 0.25):
        res = run(["simulate", "--trace", TRACE, "--policy", "moe-infinity+scope=layer", "--knob",
                   f"device_memory_ratio={ratio}"])
        assert res.exit_code == 0, res.output
        assert "policy moe-infinity+scope=layer" in res.output
        slots, cache = map(int, re.search(r"cache +(\d+) expert slots, (\d+) MiB", res.output).groups())
        total, dense = map(int, re.search(r"of (\d+) MiB \(non-expert (\d+),", res.output).groups())
        layers = 36  # gpt-oss-120b: a per-layer cache holds whole rows of 36 slots
        # MoE-Infinity's rule, ratio x GPU memory less the dense weights, in whole rows of the per-layer cache
        room = ratio * total - dense
        assert room - layers * cache / slots < cache <= room, (ratio, cache, room)
        sized[ratio] = cache
    assert sized[0.25] < sized[0.5]


def test_search_and_the_cost_model_take_composed_policies(tmp_path):
    predicted = run(["costmodel", "predict", "--trace", TRACE, "--policy", "lru+scope=global,lru",
                     "--cache-experts", "4"])
    assert predicted.exit_code == 0, predicted.output
    assert "\nlru+scope=global " in predicted.output and "\nlru " in predicted.output
    found = run(["search", "--trace", TRACE, "--policy", "lru+scope=global+prefetch=next-layer", "--cache-experts",
                 "4", "--expert-bits", "trace", "--non-expert-bits", "trace", "--jobs", "1",
                 "--json", str(tmp_path / "s.json")])
    assert found.exit_code == 0, found.output
    assert "--policy lru+prefetch=next-layer+scope=global --cache-experts 4" in found.output
    bad = run(["search", "--trace", TRACE, "--policy", "lru+placement=tpu", "--jobs", "1"])
    assert bad.exit_code == 2 and "placement 'tpu': expected one of gpu, fiddler, hybrimoe" in bad.output


def test_a_composed_oracle_is_a_bound_not_a_candidate():
    from moesim.simulator.compose import reads_the_future

    assert reads_the_future(policy_spec("belady")) and reads_the_future(policy_spec("lru+prefetch=oracle"))
    assert reads_the_future(policy_spec("fiddler+eviction=belady"))
    assert not reads_the_future(policy_spec("lru+scope=global"))
