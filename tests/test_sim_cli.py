"""`moesim simulate` and `moesim sweep` end to end: outputs, errors, determinism, resuming."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from moesim.cli import cli
from moesim.simulator.sweep import PARQUET, STORE, SweepPoint, build_grid, run_sweep, write_tables

TRACE = "gpt-oss-120b-bigmoeonedge"


def run(args, **kw):
    return CliRunner().invoke(cli, args, catch_exceptions=False, **kw)


def test_simulate_prints_the_headline_figures_and_writes_timeline_and_json(tmp_path):
    tl, js = tmp_path / "tl.json", tmp_path / "r.json"
    res = run(["simulate", "--trace", TRACE, "--policy", "lru", "--cache-experts", "4", "--timeline", str(tl),
               "--json", str(js)])
    assert res.exit_code == 0, res.output
    for word in ("TTFT", "TPOT", "hit rate", "peak GPU memory", "PCIe", "utilization"):
        assert word in res.output
    trace = json.loads(tl.read_text())
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {"GPU compute stream", "PCIe host->device", "PCIe device->host", "CPU experts"} <= names
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {e["tid"] for e in spans} >= {1, 2}
    assert all(e["dur"] > 0 for e in spans)
    result = json.loads(js.read_text())
    assert result["feasible"] is True and result["policy"] == "lru"
    assert len(result["hit_rate_per_layer"]) == 36
    for col in ("ttft_mean_s", "tpot_mean_s", "tpot_p50_s", "tpot_p90_s", "tokens_per_s", "peak_gpu_mib",
                "hit_rate", "prefetch_precision", "h2d_mib", "d2h_mib", "stall_s", "gpu_util", "h2d_util", "cpu_util"):
        assert col in result


def test_simulate_json_dash_prints_only_the_json_and_writes_no_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli, ["simulate", "--trace", TRACE, "--cache-experts", "4", "--json", "-"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)  # the whole of stdout: no summary around it
    assert result["policy"] == "lru" and result["cache_experts"] == 4
    assert list(tmp_path.iterdir()) == []


def test_predictor_train_takes_a_bundled_trace_name():
    res = run(["simulate", "--trace", TRACE, "--policy", "predictive", "--cache-experts", "4",
               "--predictor-train", "qwen3-30b-a3b-bigmoeonedge"])
    assert res.exit_code == 0, res.output
    assert "hit rate" in res.output
    missing = run(["simulate", "--trace", TRACE, "--policy", "predictive", "--cache-experts", "4",
                   "--predictor-train", "no-such.parquet"])
    assert missing.exit_code == 2 and missing.output.startswith("moesim: error: --predictor-train: trace "
                                                                "'no-such.parquet'"), missing.output


@pytest.mark.parametrize("args, fragment", [
    (["--policy", "nope"], "--policy policy 'nope': expected one of"),
    (["--trace", "missing.parquet"], "trace 'missing.parquet'"),
    (["--expert-bits", "5"], "--expert-bits weight bits 5"),
    (["--batch", "0"], "--batch 0"),
    (["--cache-experts", "4", "--cache-mem", "1GiB"], "--cache-experts and --cache-mem"),
    (["--gpu-mem", "lots"], "--gpu-mem 'lots'"),
    (["--gating", "often"], "--gating 'often'"),
    (["--prefetch", "psychic"], "--prefetch prefetcher 'psychic'"),
    (["--profile", "nope-gpu"], "profile 'nope-gpu'"),
])
def test_simulate_bad_input_is_one_line_and_exit_2(tmp_path, args, fragment):
    out = tmp_path / "r.json"
    res = run(["simulate", "--trace", TRACE, *args, "--json", str(out)])
    assert res.exit_code == 2, res.output
    lines = [l for l in res.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("moesim: error: ") and fragment in lines[0], res.output
    assert "Traceback" not in res.output
    assert not out.exists()


def test_simulate_reports_what_does_not_fit(tmp_path):
    res = run(["simulate", "--trace", TRACE, "--policy", "all-gpu", "--profile", "rtx-3060"])
    assert res.exit_code == 0
    assert "DOES NOT FIT" in res.output


def test_expert_bits_change_bytes_and_kernel_and_say_so(tmp_path):
    from moesim.quant import WeightFormat
    from moesim.tracer import read_trace_meta
    from moesim.traces import resolve_trace

    results = {}
    for bits in ("4", "2"):
        out = tmp_path / f"r{bits}.json"
        res = run(["simulate", "--trace", TRACE, "--cache-experts", "4", "--expert-bits", bits, "--json", str(out)])
        assert res.exit_code == 0, res.output
        results[bits] = (res, json.loads(out.read_text()))
    res2, r2 = results["2"]
    res4, r4 = results["4"]
    assert "int4 (for int2)" in res2.stdout and "no kernel for this expert format" in res2.stderr
    assert r4["expert_kernel"] == "int4" and r2["expert_kernel"] == "int4 (for int2)"
    params = read_trace_meta(resolve_trace(TRACE)).model.expert_params
    ratio = WeightFormat.parse("2").bytes_for(params) / WeightFormat.parse("4").bytes_for(params)
    # same routing, same cache decisions: the bytes moved scale with the expert size
    assert r2["h2d_mib"] / r4["h2d_mib"] == pytest.approx(ratio, rel=1e-3)
    assert r2["hit_rate"] == r4["hit_rate"]


def test_sweep_is_deterministic_across_worker_counts(tmp_path):
    # predictive: the pool fits its predictor while the parent compiles a workload and runs its point
    args = ["sweep", "--policy", "lru,fiddler,belady,predictive", "--trace", TRACE, "--cache-experts", "2,8",
            "--expert-bits", "16,4", "--no-progress"]
    a = run(args + ["--out", str(tmp_path / "a"), "--jobs", "2"])
    b = run(args + ["--out", str(tmp_path / "b"), "--jobs", "1", "--no-plot"])
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    for name in ("sweep.csv", "sweep.parquet"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    csv_lines = (tmp_path / "a" / "sweep.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 16
    assert csv_lines[0].startswith("trace,profile,policy,")
    assert "ttft_mean_s" in csv_lines[0] and "peak_gpu_mib" in csv_lines[0]
    assert (tmp_path / "a" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((tmp_path / "a" / STORE).glob("rows-*.jsonl"))) == 1
    assert "tpot_ms" in a.output and "belady" in a.output


def test_interrupted_sweep_continues_where_it_stopped(tmp_path):
    points = build_grid([TRACE], ["rtx-3060"], ["lru", "lfu"], [2, 4, 8], [], [None], None, [1])
    full = tmp_path / "full"
    rows = run_sweep(points, full, jobs=1, progress=False)
    write_tables(rows, full)
    # an interruption after two configurations leaves a journal of two rows and no tables
    part = tmp_path / "part"
    (part / STORE).mkdir(parents=True)
    [journal] = (full / STORE).glob("rows-*.jsonl")
    lines = journal.read_text().splitlines()
    (part / STORE / journal.name).write_text("\n".join(lines[:2]) + "\n" + lines[2][: len(lines[2]) // 2])
    ran: list[SweepPoint] = []
    rows2 = run_sweep(points, part, jobs=1, progress=False, on_row=lambda r: ran.append(r["point_key"]))
    assert len(ran) == len(points) - 2
    write_tables(rows2, part)
    assert (part / PARQUET).read_bytes() == (full / PARQUET).read_bytes()


def test_sweep_without_arguments_runs_the_bundled_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = run(["sweep", "--no-progress"])
    assert res.exit_code == 0, res.output
    table = [l for l in res.output.splitlines() if l.startswith(("lru ", "fiddler ", "belady "))]
    assert len(table) >= 12
    assert (tmp_path / "out" / "sweep" / "sweep.csv").exists()
    assert (tmp_path / "out" / "sweep" / "sweep.png").exists()


def test_table_says_why_a_row_does_not_fit_and_pareto_front_keeps_only_unbeaten_points():
    from moesim.simulator.sweep import format_table, pareto_front

    rows = [
        {"policy": "lru", "cache_experts": 4, "expert_format": "bf16", "batch": 1, "feasible": True,
         "peak_gpu_mib": 1000.0, "ttft_mean_s": 0.5, "tpot_mean_s": 0.02, "tokens_per_s": 40.0, "hit_rate": 0.5,
         "h2d_mib": 10.0, "stall_s": 0.1},
        {"policy": "all-gpu", "cache_experts": -1, "expert_format": "bf16", "batch": 1, "feasible": False,
         "peak_gpu_mib": 90000.0, "reason": "every expert needs 90000 MiB of GPU memory, the budget is 12288 MiB "
                                            "(cache ...)"},
    ]
    text = format_table(rows).splitlines()
    assert text[0].split()[:4] == ["policy", "cache", "bits", "batch"]
    assert "20.00" in text[1] and "auto" in text[2]
    assert text[2].endswith("does not fit: every expert needs 90000 MiB of GPU memory, the budget is 12288 MiB")
    assert pareto_front([(1, 5), (2, 3), (3, 4), (4, 1), (2.5, 3)]) == [(1, 5), (2, 3), (4, 1)]


def test_trace_dtypes_map_to_the_kernel_that_times_them():
    from moesim.simulator.run import trace_format

    assert {d: trace_format(d).kernel for d in ("bfloat16", "gguf-q4_k_m", "gguf-q6_k", "float8_e4m3fn", "mxfp4",
                                                "gguf-q2_k")} == {
        "bfloat16": "bf16", "gguf-q4_k_m": "int4", "gguf-q6_k": "int8", "float8_e4m3fn": "int8", "mxfp4": "int4",
        "gguf-q2_k": "int2"}
