"""One grammar across commands (#15's leftovers): one --out rule, one unit per quantity in simulate's summary,
and the shared flags declared once (moesim/options.py)."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from moesim.cli import cli

TRACE = "gpt-oss-120b-bigmoeonedge"

# every command with an output path flag, and what it writes: several files (FOLDER) or one (FILE)
OUTPUTS = [
    (["sweep"], "--out", "FOLDER"),
    (["validate"], "--out", "FOLDER"),
    (["search"], "--report", "FOLDER"),
    (["demo-model"], "--out", "FOLDER"),
    (["costmodel", "fit"], "--out", "FILE"),
    (["trace"], "--out", "FILE"),
    (["trace", "import"], "--out", "FILE"),
    (["trace", "fit"], "--out", "FILE"),
    (["trace", "synth"], "--out", "FILE"),
    (["calib"], "--out", "FILE"),
    (["quality"], "--out", "FILE"),
    (["reproduce"], "--out", "FILE"),
]


def run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


@pytest.mark.parametrize("command, flag, kind", OUTPUTS, ids=[" ".join(c) for c, _, _ in OUTPUTS])
def test_every_output_flag_says_whether_it_is_a_file_or_a_folder(command, flag, kind):
    res = run(command + ["--help"])
    assert res.exit_code == 0, res.output
    assert re.search(rf"{flag} {kind}\s+{kind.capitalize()}: ", res.output), res.output


@pytest.mark.parametrize("command, flag, kind", OUTPUTS, ids=[" ".join(c) for c, _, _ in OUTPUTS])
def test_the_other_kind_is_refused_in_one_line_before_any_work(tmp_path, command, flag, kind):
    a_file = tmp_path / "exists.txt"
    a_file.write_text("keep me")
    wrong = [str(a_file), str(tmp_path / "report.json")] if kind == "FOLDER" else [str(tmp_path), f"{tmp_path}/new/"]
    for value in wrong:
        res = run(command + [flag, value])
        assert res.exit_code == 2, res.output
        line = res.output.strip()
        assert "\n" not in line and line.startswith(f"moesim: error: Invalid value for '{flag}': "), res.output
        assert f"expected a {kind}" in line, res.output
    assert a_file.read_text() == "keep me"
    assert not (tmp_path / "report.json").exists() and not (tmp_path / "new").exists()


def test_simulate_prints_every_time_in_ms_and_every_size_in_mib():
    # fiddler's TTFT on this trace is over a second, which used to switch the unit to s
    res = run(["simulate", "--trace", TRACE, "--policy", "fiddler", "--cache-experts", "4"])
    assert res.exit_code == 0, res.output
    summary = res.stdout
    times = re.findall(r"\d[\d.]* (ms|s)\b", summary)
    assert times and set(times) == {"ms"}, summary
    sizes = re.findall(r"\d[\d.]* (MiB|GiB|KiB|B)\b", summary)
    assert sizes and set(sizes) == {"MiB"}, summary


def test_shared_flags_have_one_help_text_in_every_command():
    def help_of(command, flag):
        out = run(command + ["--help"]).output
        text = re.search(rf"\n  {flag} TEXT\s+(.*?)(?=\n  -)", out, re.S).group(1)
        # whitespace dropped: click wraps lines at different places (even inside "comma-separated")
        return "".join(text.split()).split("Default:")[0].split("[default:")[0].split("[required]")[0]

    lists = [["sweep"], ["search"], ["costmodel", "predict"], ["validate"]]
    assert len({help_of(c, "--policy") for c in lists}) == 1
    assert help_of(["simulate"], "--policy").startswith("Policy:apreset")
    assert len({help_of(c, "--cache-experts") for c in (["sweep"], ["search"], ["costmodel", "predict"])}) == 1
    assert help_of(["simulate"], "--cache-experts").startswith(help_of(["validate"], "--cache-experts"))
    assert len({help_of(c, "--batch") for c in (["sweep"], ["search"], ["costmodel", "predict"])}) == 1


def test_an_output_path_that_names_an_input_is_refused_and_the_input_kept(tmp_path):
    import shutil

    from moesim.calib.profile import bundled_profiles
    from moesim.traces import resolve_trace

    trace, profile = tmp_path / "t.parquet", tmp_path / "p.json"
    shutil.copy(resolve_trace(TRACE), trace)
    shutil.copy(bundled_profiles()["rtx-3060"], profile)
    before = {p: p.read_bytes() for p in (trace, profile)}
    sim = ["simulate", "--trace", str(trace), "--cache-experts", "4"]
    for args, target in (
            (["trace", "stats", str(trace), "--json", str(trace)], trace),
            (sim + ["--json", str(trace)], trace),
            (sim + ["--timeline", str(trace)], trace),
            (sim + ["--profile", str(profile), "--json", str(profile)], profile),
            (["search", "--trace", str(trace), "--policy", "lru", "--cache-experts", "4", "--json", str(trace)], trace)):
        res = run(args)
        line = res.output.strip()
        assert res.exit_code != 0 and "\n" not in line, (args, res.output)
        assert line == f"moesim: error: {target}: is also an input of this command; write the output to another " \
                       f"path (nothing was written)", (args, res.output)
    assert {p: p.read_bytes() for p in before} == before
    # the same command writes beside its input
    res = run(sim + ["--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0 and (tmp_path / "r.json").is_file(), res.output
