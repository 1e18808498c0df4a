"""One parser and one rule per shared flag, the same in every command (#15 finding 5)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from moesim.cli import cli
from moesim.errors import MoesimError
from moesim.options import batch_list, byte_size, cache_experts_list, check_batches, int_list, jobs_count, split_list

TRACE = "gpt-oss-120b-bigmoeonedge"  # one request, 128 experts per layer


def one_line_error(args, *fragments):
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 2, res.output
    lines = [l for l in res.output.splitlines() if l.strip() and not l.startswith("sweep:")]
    assert len(lines) == 1 and lines[0].startswith("moesim: error: "), res.output
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("command", [
    ["simulate", "--trace", TRACE, "--batch", "8"],
    ["sweep", "--trace", TRACE, "--batch", "1,8", "--cache-experts", "4", "--no-progress"],
    ["search", "--trace", TRACE, "--batch", "8"],
])
def test_a_batch_larger_than_the_trace_is_refused_not_equal_to_batch_1(command, tmp_path):
    one_line_error(command + (["--out", str(tmp_path / "o")] if command[0] == "sweep" else []),
                   "--batch 8", "the trace has 1 request")


@pytest.mark.parametrize("command", [
    ["simulate", "--trace", TRACE, "--cache-experts", "500"],
    ["sweep", "--trace", TRACE, "--cache-experts", "500", "--no-progress"],
    ["search", "--trace", TRACE, "--cache-experts", "500"],
    ["validate", "--trace", TRACE, "--cache-experts", "500", "--calibrate"],
])
def test_a_cache_larger_than_the_layer_is_refused_everywhere(command, tmp_path):
    one_line_error(command + ["--out", str(tmp_path / "o")] if command[0] in ("sweep", "validate") else command,
                   "--cache-experts 500", "128 experts per layer")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command, fragment", [
    (["search", "--cache-experts", "5..2"], "--cache-experts '5..2': empty range"),
    (["sweep", "--cache-experts", "5..2"], "--cache-experts '5..2': empty range"),
    (["sweep", "--cache-experts", "-2"], "--cache-experts -2: expected integers >= 0"),
    (["simulate", "--cache-experts", "-2"], "--cache-experts -2: expected integers >= 0"),
    (["sweep", "--gpu-mem", "0"], "--gpu-mem '0': expected a positive size"),
    (["simulate", "--gpu-mem", "0"], "--gpu-mem '0': expected a positive size"),
    (["sweep", "--jobs", "-1"], "--jobs -1"),
    (["search", "--jobs", "-1"], "--jobs -1"),
    (["sweep", "--jobs", "many"], "--jobs 'many'"),
    (["sweep", "--policy", ","], "--policy ','"),
])
def test_the_same_bad_value_gets_the_same_error_in_every_command(command, fragment, tmp_path):
    args = command + ["--trace", TRACE]
    if command[0] == "sweep":
        args += ["--out", str(tmp_path / "o"), "--no-progress"]
    one_line_error(args, fragment)


def test_parsers():
    assert int_list("2,4, 8", "--x") == [2, 4, 8]
    assert int_list("0..3", "--x") == [0, 1, 2, 3]
    assert cache_experts_list(None) == []
    assert batch_list("1,2") == [1, 2]
    assert byte_size("1KiB", "--m") == 1024
    assert split_list(" a ,b") == ["a", "b"]
    assert jobs_count(3) == 3 and jobs_count(0) >= 1
    for bad in (lambda: int_list("1,,2", "--x"), lambda: batch_list("0"), lambda: byte_size("-1GiB", "--m"),
                lambda: check_batches([2], 1), lambda: jobs_count(-1), lambda: int_list("a..3", "--x")):
        with pytest.raises(MoesimError):
            bad()


def test_sizes_and_durations_take_scientific_notation_and_say_what_is_wrong_with_a_negative():
    from moesim.units import parse_bytes, parse_seconds

    assert parse_bytes("1e3") == 1000 and parse_bytes("2.5e-3GiB") == int(2.5e-3 * 2**30)
    assert parse_seconds("1e-3s") == pytest.approx(1e-3) and parse_seconds("2E2ms") == pytest.approx(0.2)
    with pytest.raises(MoesimError, match=r"--gpu-mem '-4GiB': expected a size of 0 or more"):
        parse_bytes("-4GiB", "--gpu-mem")
    with pytest.raises(MoesimError, match=r"--max-tpot '-1s': expected a duration of 0 or more"):
        parse_seconds("-1s", "--max-tpot")
    with pytest.raises(MoesimError, match="expected a number with an optional unit"):
        parse_bytes("lots", "--gpu-mem")
