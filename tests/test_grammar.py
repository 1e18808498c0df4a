"""One grammar and quiet interruptions (#15 finding 9)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from moesim.cli import cli

TRACE = "gpt-oss-120b-bigmoeonedge"


def run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_trace_stats_json_takes_a_file_like_every_other_command(tmp_path):
    out = tmp_path / "stats.json"
    res = run(["trace", "stats", TRACE, "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["trace"] == TRACE
    assert "LRU hit rate" in res.output  # the text summary still prints
    only = run(["trace", "stats", TRACE, "--json", "-"])
    assert json.loads(only.stdout)["trace"] == TRACE


def test_validate_with_bad_arguments_leaves_no_empty_folder(tmp_path):
    out = tmp_path / "v" / "deeper"
    res = run(["validate", "--trace", TRACE, "--cache-experts", "2", "--out", str(out)])
    assert res.exit_code == 2 and "no hardware profile" in res.output
    assert not (tmp_path / "v").exists()
    res = run(["validate", "--trace", TRACE, "--cache-experts", "2", "--profile", "rtx-3060", "--policy", "nope",
               "--out", str(out)])
    assert res.exit_code == 2 and not (tmp_path / "v").exists()


def test_profiles_does_not_import_torch():
    code = ("import sys\nfrom click.testing import CliRunner\nfrom moesim.cli import cli\n"
            "r = CliRunner().invoke(cli, ['profiles'])\nassert r.exit_code == 0, r.output\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False False"


def test_bundled_shapes_match_a_fresh_derivation():
    from moesim.bundled_shapes import SHAPES_FILE, derive

    assert derive() == SHAPES_FILE.read_text()


def test_multi_head_latent_attention_is_sized_from_the_built_model():
    """DeepSeek-V3's attention has low-rank q and kv projections: its parameters are counted on the meta model,
    not guessed from the heads (q, k, v and o of 128 heads x head_dim 64 would give 235M per layer, not 187M)."""
    from moesim.calib.workload import attention_params, score_flops_per_key
    from moesim.modelspec import load_model_shape

    v3 = load_model_shape("deepseek-v3")
    h, heads = 7168, 128
    mla = h * 1536 + 1536 + 1536 * heads * 192 + h * (512 + 64) + 512 + 512 * heads * (128 + 128) + heads * 128 * h
    assert v3.attention_params == mla == 187_107_328
    assert attention_params(v3) == mla + h * 256 + 2 * h
    assert (v3.num_moe_layers, v3.num_experts, v3.top_k, v3.num_shared_experts) == (58, 256, 8, 1)
    assert abs(v3.total_params / 671e9 - 1) < 0.01  # without the multi-token-prediction layer
    assert score_flops_per_key(v3) == 2 * heads * (192 + 128)
    # a shape without the count (an older trace's) keeps the heads' sizing
    mixtral = load_model_shape("mixtral-8x7b")
    from dataclasses import replace

    assert attention_params(replace(mixtral, attention_params=0)) == attention_params(mixtral)


def _header(output: str, first: str) -> list[str]:
    return next(l.split() for l in output.splitlines() if l.startswith(first))


def test_tables_use_one_unit_per_quantity(tmp_path):
    res = run(["sweep", "--trace", TRACE, "--policy", "lru", "--cache-experts", "4", "--no-progress", "--no-plot",
               "--out", str(tmp_path / "s"), "--jobs", "1"])
    head = _header(res.stdout, "policy")
    assert "ttft_ms" in head and "tpot_ms" in head and "stall_ms" in head and "peak_gpu_mib" in head
    assert not [h for h in head if h.endswith(("_s", "_gib"))]
    from moesim.costmodel.search import CONFIRMED_COLUMNS

    assert not [h for h in CONFIRMED_COLUMNS if h.endswith(("_s", "_gib"))]


def _sweep_process(out):
    # big enough (400 points, several seconds) that it cannot finish between its first row and the signal
    cmd = [sys.executable, "-m", "moesim.cli", "sweep", "--trace", "qwen3-30b-a3b-bigmoeonedge", "--policy",
           "lru,lfu,fifo,fiddler,mixtral-offloading,moe-infinity,static,belady,hybrimoe,adapmoe", "--cache-experts",
           "6,8,12,16,24,32,48,64,96,128", "--expert-bits", "16,8,4,2", "--jobs", "2", "--no-progress",
           "--no-plot", "--out", str(out)]
    # Ctrl-C as a terminal delivers it: with the default disposition, whatever this test process inherited (an
    # ignored SIGINT is inherited across exec, and Python then leaves it ignored)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_rows(out, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if any(p.stat().st_size > 0 for p in (out / "store").glob("rows-*.jsonl")):
            return
        time.sleep(0.05)
    pytest.fail("the sweep finished no configuration in time")


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_an_interrupted_sweep_prints_one_line_and_no_worker_output(tmp_path, how):
    out = tmp_path / "s"
    proc = _sweep_process(out)
    _wait_for_rows(out)
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole process group
    else:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert "Traceback" not in err and "BrokenPipe" not in err and "KeyboardInterrupt" not in err, err
    assert lines[-1].startswith("moesim: sweep interrupted"), err
    assert all(l.startswith(("sweep:", "moesim: sweep interrupted")) for l in lines), err


def test_click_usage_errors_are_one_line_too(tmp_path):
    (tmp_path / "f").write_text("x")
    res = run(["sweep", "--out", str(tmp_path / "f")])
    assert res.exit_code == 2
    assert res.output.strip().count("\n") == 0 and res.output.startswith("moesim: error: Invalid value for '--out'")
    assert "sweep --help)" in res.output  # CliRunner names the program "cli"
