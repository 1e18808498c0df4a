"""`moesim trace --prompts P --model M`: the recording command end to end, and its bad-input errors.

Runs the real CLI (click's runner over ``moesim.cli``) on a tiny random Mixtral saved to a temp folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import SHARED
from faults import readonly_folder
from moesim.cli import cli
from moesim.tracer import DECODE, PREFILL, read_trace
from test_trace_capture import FAMILIES, build_model_folder

GSM8K = SHARED / "data" / "gsm8k" / "test.jsonl"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread, and shared CI cores then do not oversubscribe."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_model_folder(tmp_path_factory.mktemp("models") / "tiny-mixtral", FAMILIES["mixtral"], seed=5)


def run(args: list[str], cwd: Path | None = None):
    runner = CliRunner()
    if cwd is None:
        return runner.invoke(cli, ["trace", *args], catch_exceptions=False)
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return runner.invoke(cli, ["trace", *args], catch_exceptions=False)
    finally:
        os.chdir(old)


def one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("moesim: error:") or line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_trace_writes_default_path_under_cwd(model_dir, tmp_path):
    result = run(["--prompts", str(GSM8K), "--model", str(model_dir), "--limit", "2", "--max-new-tokens", "4",
                  "--device", "cpu", "--ignore-eos", "--no-progress"], cwd=tmp_path)
    assert result.exit_code == 0, result.output
    out = tmp_path / "traces" / "tiny-mixtral-test.parquet"
    assert out.is_file()
    assert "wrote traces/tiny-mixtral-test.parquet: 2 requests" in result.output
    trace = read_trace(out)
    assert trace.complete and trace.num_requests == 2
    L = trace.meta.num_layers
    for r in range(2):
        prefill = ((trace.request == r) & (trace.phase == PREFILL)).sum() // L
        decode = ((trace.request == r) & (trace.phase == DECODE)).sum() // L
        assert prefill > 10 and decode == 3  # 4 new tokens: the last is not fed back
    assert trace.next_layer_guess is not None and trace.token_id is not None
    assert trace.meta.source.details["max_new_tokens"] == 4 and trace.meta.source.details["ignore_eos"] is True
    assert trace.meta.model.model_id == str(model_dir)


def test_trace_options_reach_the_recording(model_dir, tmp_path):
    prompts = tmp_path / "mine.jsonl"
    prompts.write_text(json.dumps({"id": 1, "body": "Two plus two is"}) + "\n"
                       + json.dumps({"id": 2, "body": "The duck lays"}) + "\n")
    out = tmp_path / "deep" / "er" / "t.parquet"
    args = ["--prompts", str(prompts), "--model", str(model_dir), "--field", "body", "--max-new-tokens", "3",
            "--dtype", "bfloat16", "--sample", "--seed", "4", "--temperature", "0.8", "--no-chat-template",
            "--no-next-layer-guess", "--out", str(out), "--no-progress"]
    result = run(args)
    assert result.exit_code == 0, result.output
    trace = read_trace(out)
    details = trace.meta.source.details
    assert trace.meta.dtype == "bfloat16"
    assert details["do_sample"] is True and details["seed"] == 4 and details["temperature"] == 0.8
    assert details["field"] == "body" and details["chat_template"] is False
    assert trace.next_layer_guess is None
    again = tmp_path / "again.parquet"
    assert run(args[:-3] + ["--out", str(again), "--no-progress"]).exit_code == 0
    np.testing.assert_array_equal(read_trace(again).token_id, trace.token_id)


def test_no_arguments_prints_help():
    result = run([])
    assert result.exit_code == 0 and "--prompts FILE" in result.output


@pytest.mark.parametrize("content, fragments", [
    (None, ("nope.jsonl", "not found")),
    ("", ("p.jsonl", "empty")),
    ('{"question": "a"}\n{"question": "b",}\n', ("p.jsonl", "line 2", "not valid JSON")),
    ('{"question": "a"}\n{"q": "b"}\n', ("p.jsonl", "line 2", "no field 'question'")),
])
def test_bad_prompt_files_fail_in_one_line_without_output(model_dir, tmp_path, content, fragments):
    prompts = tmp_path / ("nope.jsonl" if content is None else "p.jsonl")
    if content is not None:
        prompts.write_text(content)
    out = tmp_path / "out" / "t.parquet"
    result = run(["--prompts", str(prompts), "--model", str(model_dir), "--out", str(out), "--device", "cpu"])
    one_line_error(result, *fragments)
    assert not (tmp_path / "out").exists()


def test_missing_field_flag(model_dir, tmp_path):
    result = run(["--prompts", str(GSM8K), "--model", str(model_dir), "--field", "prompt", "--limit", "1",
                  "--out", str(tmp_path / "t.parquet")])
    one_line_error(result, "line 1", "no field 'prompt'")
    assert list(tmp_path.iterdir()) == []


def test_model_without_moe_layers(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    dense = tmp_path / "dense"
    config = LlamaConfig(vocab_size=448, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(dense)
    result = run(["--prompts", str(GSM8K), "--model", str(dense), "--limit", "1", "--device", "cpu",
                  "--out", str(tmp_path / "o" / "t.parquet")])
    one_line_error(result, "no routed experts")
    assert not (tmp_path / "o").exists()


def test_unreachable_hub_model_is_one_line(tmp_path, monkeypatch):
    # The default model is a hub id; this machine (and CI) cannot reach the hub.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    result = run(["--prompts", str(GSM8K), "--limit", "1", "--device", "cpu", "--out", str(tmp_path / "t.parquet")])
    one_line_error(result, "mistralai/Mixtral-8x7B-Instruct-v0.1", "unreachable")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output(model_dir, tmp_path):
    with readonly_folder(tmp_path) as locked:  # a read-only tmpfs when run as root
        result = run(["--prompts", str(GSM8K), "--model", str(model_dir), "--limit", "1",
                      "--out", str(locked / "sub" / "t.parquet")])
        one_line_error(result, "--out", "not writable")
        assert list(locked.iterdir()) == []


def test_output_path_that_is_a_folder_or_under_a_file(model_dir, tmp_path):
    result = run(["--prompts", str(GSM8K), "--model", str(model_dir), "--limit", "1", "--out", str(tmp_path)])
    one_line_error(result, "--out", "is a folder")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run(["--prompts", str(GSM8K), "--model", str(model_dir), "--limit", "1",
                  "--out", str(blocker / "t.parquet")])
    one_line_error(result, "--out", "is a file")


@pytest.mark.parametrize("args, fragments", [
    (["--max-new-tokens", "0"], ("--max-new-tokens 0",)),
    (["--limit", "0"], ("--limit 0",)),
    (["--device", "tpu:0"], ("--device tpu:0",)),
    (["--temperature", "0.5"], ("--sample",)),
    (["--dtype", "int3"], ("--dtype",)),
])
def test_bad_flags(model_dir, tmp_path, args, fragments):
    result = run(["--prompts", str(GSM8K), "--model", str(model_dir), "--out", str(tmp_path / "t.parquet"), *args])
    one_line_error(result, *fragments)
    assert list(tmp_path.iterdir()) == []


def test_model_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run(["--prompts", str(GSM8K), "--model", str(tmp_path / "empty"), "--limit", "1", "--device", "cpu",
                  "--out", str(tmp_path / "t.parquet")])
    one_line_error(result, "no config.json")
