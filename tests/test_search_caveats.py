"""search says what a low-bit choice costs and prints a validate command that can express it (#15 finding 8)."""

from __future__ import annotations

import shlex

import pytest
from click.testing import CliRunner

from moesim.cli import cli
from moesim.costmodel.space import quality_caveat, validate_command, validate_gap
from moesim.engine.cli import engine_format
from moesim.errors import MoesimError

TRACE = "gpt-oss-120b-bigmoeonedge"


def test_a_two_bit_choice_carries_a_quality_caveat_and_an_expressible_validate_command():
    res = CliRunner().invoke(cli, ["search", "--trace", TRACE, "--policy", "lru", "--cache-experts", "4",
                                   "--expert-bits", "2", "--non-expert-bits", "trace", "--batch", "1", "--jobs", "1"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "CAVEAT" in res.stdout and "2-bit experts usually cost noticeable quality" in res.stdout
    [val] = [l.strip() for l in res.stdout.splitlines() if l.strip().startswith("moesim validate")]
    args = shlex.split(val)
    assert args[args.index("--expert-bits") + 1] == "4"
    assert "no 2-bit expert kernel" in res.stdout
    # the printed command parses: every flag it uses is a flag of validate
    from moesim.engine.cli import validate_command as command

    names = {o for p in command.params for o in p.opts}
    assert {a for a in args if a.startswith("--")} <= names


def test_validate_takes_the_expert_bits_grammar_of_the_other_commands():
    assert engine_format("4", None) == "int4" and engine_format("16", None) == "bf16"
    assert engine_format(None, "int8") == "int8" and engine_format(None, None) == "bf16"
    with pytest.raises(MoesimError, match="real kernels for 16, 8, 4-bit"):
        engine_format("2", None)
    with pytest.raises(MoesimError, match="disagree"):
        engine_format("8", "int4")


def test_caveats_only_where_they_apply():
    assert quality_caveat(("lru", 4, "2", None, 1), has_quality_table=False)
    assert quality_caveat(("lru", 4, "2", None, 1), has_quality_table=True) is None
    assert quality_caveat(("lru", 4, "4", None, 1), has_quality_table=False) is None
    assert validate_gap(("lru", 4, "8", None, 1)) is None
    assert "--expert-bits 8" in validate_command(TRACE, "rtx-3060", ("lru", 4, "8", None, 1))
