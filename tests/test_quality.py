"""Quality table, `moesim quality` and `moesim demo-model` end to end on a tiny demo model trained here."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from moesim.cli import cli
from moesim.errors import MoesimError
from moesim.quality.demo_model import QUICK, REPORT_NAME, train_demo_model
from moesim.quality.table import (
    QualityTable,
    load_quality_table,
    lookup_perplexity,
    lookup_row,
    make_row,
    write_quality_table,
)

REPO = Path(__file__).resolve().parents[1]
WIKI = REPO.parent / "shared" / "data" / "wikitext-2"

needs_wikitext = pytest.mark.skipif(not (WIKI / "test.txt").is_file(), reason="shared WikiText-2 not present")

# --quick scored on fewer tokens, so the whole file stays fast; it still beats the unigram baseline.
TINY = dataclasses.replace(QUICK, train_chars=150_000, eval_max_tokens=4096)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "model"
    train_demo_model(out, TINY)
    return out


def row(**kw):
    base = dict(model_id="m", checkpoint_sha256="ab" * 32, quantizer="rtn", expert_bits=4, group_size=64,
                gating_threshold=0.0, gating_sensitivity="", top_k=2, model_top_k=2, data="wikitext-2",
                data_sha256="cd" * 32, seq_len=128, windows=2, predicted_tokens=254, perplexity=10.0,
                mean_nll=2.3, experts_per_token=2.0)
    base.update(kw)
    return make_row(**base)


def test_table_round_trip_merge_and_lookup(tmp_path):
    path = tmp_path / "q.json"
    rows = [row(expert_bits=16, perplexity=9.0), row(expert_bits=4, perplexity=10.0),
            row(expert_bits=2, perplexity=30.0), row(expert_bits=4, gating_threshold=0.1, perplexity=11.0),
            row(expert_bits=4, top_k=1, perplexity=12.0)]
    write_quality_table(path, rows[::-1])
    first = path.read_bytes()
    write_quality_table(path, rows)
    assert path.read_bytes() == first  # sorted by key: input order does not matter
    table = load_quality_table(path)
    assert table.rows[0].expert_bits == 16 and table.rows[0].group_size == 0 and table.rows[0].quantizer == "none"
    assert lookup_perplexity(table, "m", 16, group_size=128) == 9.0  # group size is moot at 16 bits
    assert lookup_perplexity(table, "m", 4) == 10.0
    assert lookup_perplexity(table, "m", 4, gating=0.1) == 11.0
    assert lookup_perplexity(table, "m", 4, top_k=1) == 12.0
    assert lookup_perplexity(table, "abababab", 2) == 30.0  # by checkpoint hash prefix
    # Re-measuring a setting replaces its row; other rows stay.
    write_quality_table(path, [row(expert_bits=4, perplexity=10.5)])
    table = load_quality_table(path)
    assert len(table.rows) == 5 and lookup_perplexity(table, "m", 4) == 10.5
    doc = json.loads(path.read_text())
    assert doc["format"] == "moesim.quality-table" and "perplexity" in doc["columns"]


def test_lookup_errors(tmp_path):
    table = QualityTable(rows=(row(), row(data="other.txt", data_sha256="ef" * 32)), path="t.json")
    with pytest.raises(MoesimError, match="no rows for model 'x'"):
        lookup_perplexity(table, "x", 4)
    with pytest.raises(MoesimError, match="no row for model 'm' at int3-g64"):
        lookup_perplexity(table, "m", 3)
    with pytest.raises(MoesimError, match="2 rows match"):
        lookup_perplexity(table, "m", 4)
    assert lookup_row(table, "m", 4, data="other.txt").data_sha256 == "ef" * 32
    with pytest.raises(MoesimError, match="weight bits 5"):
        lookup_perplexity(table, "m", 5)


def test_load_rejects_bad_tables(tmp_path):
    bad = tmp_path / "bad.json"
    with pytest.raises(MoesimError, match="no such quality table"):
        load_quality_table(bad)
    bad.write_text("{not json")
    with pytest.raises(MoesimError, match="not a JSON quality table"):
        load_quality_table(bad)
    bad.write_text(json.dumps({"format": "moesim.quality-table", "format_version": 1, "rows": [{"model_id": "m"}]}))
    with pytest.raises(MoesimError, match=r"rows\[0\]: missing field 'checkpoint_sha256'"):
        load_quality_table(bad)
    good = dataclasses.asdict(row())
    good["perplexity"] = "high"
    bad.write_text(json.dumps({"format": "moesim.quality-table", "format_version": 1, "rows": [good]}))
    with pytest.raises(MoesimError, match="field 'perplexity' is str, expected float"):
        load_quality_table(bad)


@pytest.mark.parametrize("field, value, expected", [
    ("perplexity", -1.0, "field 'perplexity' is -1.0, expected a positive finite number"),
    ("perplexity", 0, "field 'perplexity' is 0.0, expected a positive finite number"),
    ("perplexity", float("nan"), "field 'perplexity' is nan, expected a positive finite number"),
    ("perplexity", float("inf"), "field 'perplexity' is inf, expected a positive finite number"),
    ("mean_nll", float("nan"), "field 'mean_nll' is nan, expected a finite number"),
])
def test_load_rejects_perplexities_no_bound_can_judge(tmp_path, field, value, expected):
    bad = tmp_path / "bad.json"
    rows = [dataclasses.asdict(row(expert_bits=16)), dataclasses.asdict(row())]
    rows[1][field] = value
    bad.write_text(json.dumps({"format": "moesim.quality-table", "format_version": 1, "rows": rows}))
    with pytest.raises(MoesimError) as exc:
        load_quality_table(bad)
    assert str(exc.value) == f"{bad}: rows[1]: {expected}"


def _run(args):
    result = CliRunner().invoke(cli, args)
    return result.exit_code, result.output


def _assert_one_line_error(args, needle):
    code, output = _run(args)
    assert code == 2, output
    lines = [l for l in output.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in output and needle in lines[0], output


def _no_moe_model(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    return folder


@needs_wikitext
def test_quality_cli_bad_input(tmp_path, demo_dir):
    out = tmp_path / "q.json"
    _assert_one_line_error(["quality", "--model", str(tmp_path / "missing"), "--out", str(out)], "no such model folder")
    _assert_one_line_error(["quality", "--model", str(_no_moe_model(tmp_path / "dense")), "--out", str(out)],
                           "has no MoE layers")
    _assert_one_line_error(["quality", "--model", str(demo_dir), "--expert-bits", "16,5", "--out", str(out)],
                           "--expert-bits 5")
    _assert_one_line_error(["quality", "--model", str(demo_dir), "--data", str(tmp_path / "nope.txt"),
                            "--out", str(out)], "no such text file")
    _assert_one_line_error(["quality", "--model", str(demo_dir), "--seq-len", "1", "--out", str(out)],
                           "--seq-len 1")
    _assert_one_line_error(["quality", "--model", str(demo_dir), "--seq-len", "4096", "--out", str(out)],
                           "max_position_embeddings")
    _assert_one_line_error(["quality", "--model", str(demo_dir), "--adaptive-gating", "0.1", "--top-k", "1",
                            "--out", str(out)], "needs top-k 2")
    _assert_one_line_error(["quality", "--model", str(demo_dir), "--quantizer", "gptq", "--out", str(out)],
                           "--quantizer gptq")
    assert not out.exists()


@needs_wikitext
def test_demo_model_folder_and_report(demo_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = json.loads((demo_dir / REPORT_NAME).read_text())
    assert report["test_perplexity"] < report["unigram_perplexity"]
    assert len(report["top_expert_share"]) == TINY.num_layers
    assert all(r > report["uniform_reuse_rate"] for r in report["reuse_rate"])
    model = AutoModelForCausalLM.from_pretrained(str(demo_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(demo_dir))
    assert model.config.model_type == "mixtral" and model.config.num_local_experts == 8
    assert len(tokenizer) == model.config.vocab_size
    assert tokenizer.decode(tokenizer(" The game began")["input_ids"]) == " The game began"


@needs_wikitext
def test_demo_model_is_deterministic_given_seed(tmp_path):
    micro = dataclasses.replace(TINY, steps=3, warmup_steps=1, train_chars=40_000, eval_max_tokens=512,
                                vocab_size=300, hidden_size=32, intermediate_size=64)
    a = train_demo_model(tmp_path / "a", micro)
    b = train_demo_model(tmp_path / "b", micro)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert a.test_perplexity == b.test_perplexity
    c = train_demo_model(tmp_path / "c", dataclasses.replace(micro, seed=1))
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (tmp_path / "c" / "model.safetensors").read_bytes()
    assert c.test_perplexity != a.test_perplexity


@needs_wikitext
def test_demo_model_stopped_early_holds_the_full_runs_checkpoint_of_that_step(tmp_path):
    """--stop-at-step keeps the full schedule (its learning rate decays over all steps) and stops: the weights
    equal those the full run checkpoints at that step, not those of a shorter schedule."""
    import torch
    from transformers import AutoModelForCausalLM

    from moesim.quality.demo_model import checkpoint_path

    micro = dataclasses.replace(TINY, steps=6, warmup_steps=1, train_chars=40_000, eval_max_tokens=512,
                                vocab_size=300, hidden_size=32, intermediate_size=64)
    early = train_demo_model(tmp_path / "early", micro, stop_at_step=4)
    assert early.trained_steps == 4 and early.config.steps == 6

    class Stop(Exception):
        pass

    def stop_after_4(line):
        if line.startswith("step 5/6"):
            raise Stop

    with pytest.raises(Stop):
        train_demo_model(tmp_path / "full", micro, log=stop_after_4, checkpoint_every=2)
    state = torch.load(checkpoint_path(tmp_path / "full"), map_location="cpu", weights_only=False)
    assert state["step"] == 4
    saved = AutoModelForCausalLM.from_pretrained(str(tmp_path / "early")).state_dict()
    assert set(saved) == set(state["model"])
    assert all(torch.equal(saved[k], state["model"][k]) for k in saved)
    # a checkpoint past the stop (step 4 beside "full") is not resumed from
    train_demo_model(tmp_path / "full", micro, stop_at_step=2)
    train_demo_model(tmp_path / "two", micro, stop_at_step=2)
    assert (tmp_path / "full" / "model.safetensors").read_bytes() == (tmp_path / "two" / "model.safetensors").read_bytes()
    short = train_demo_model(tmp_path / "short", dataclasses.replace(micro, steps=4))
    assert (tmp_path / "short" / "model.safetensors").read_bytes() != (tmp_path / "early" / "model.safetensors").read_bytes()
    assert short.trained_steps == 4


@pytest.mark.parametrize("step", ["0", "31"])
def test_demo_model_refuses_a_stop_step_outside_its_schedule(tmp_path, step):
    _assert_one_line_error(["demo-model", "--out", str(tmp_path / "m"), "--quick", "--stop-at-step", step],
                           "--stop-at-step")
    assert not (tmp_path / "m").exists()


def test_demo_model_names_its_own_data_flags(tmp_path):
    _assert_one_line_error(["demo-model", "--out", str(tmp_path / "m"), "--quick", "--train-data",
                            str(tmp_path / "nope.txt")], "--train-data ")
    _assert_one_line_error(["demo-model", "--out", str(tmp_path / "m"), "--quick", "--test-data",
                            str(tmp_path / "nope.txt")], "--test-data ")
    assert not (tmp_path / "m").exists()


@needs_wikitext
def test_demo_model_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    _assert_one_line_error(["demo-model", "--out", str(tmp_path / "busy"), "--quick"], "not empty")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "x"


@needs_wikitext
def test_quality_cli_end_to_end(tmp_path, demo_dir):
    out = tmp_path / "q.json"
    code, output = _run(["quality", "--model", str(demo_dir), "--expert-bits", "16,4,2", "--adaptive-gating",
                         "0.45", "--top-k", "1,2", "--max-tokens", "1024", "--out", str(out)])
    assert code == 0, output
    table = load_quality_table(out)
    # 3 formats x (top-1, top-2, top-2 with gating)
    assert len(table.rows) == 9
    # off a terminal, progress is plain lines on stderr with a rate, ending at the total
    progress = [ln for ln in output.splitlines() if ln.startswith("quality: ")]
    assert progress and "setting/s" in progress[0] and progress[-1].startswith("quality: 9/9 setting (100%)")
    name = demo_dir.name
    ppl16 = lookup_perplexity(table, name, 16)
    ppl2 = lookup_perplexity(table, name, 2)
    assert np.isfinite(ppl16) and ppl2 > ppl16, (ppl16, ppl2)  # a trained model: 2-bit experts cost perplexity
    gated = lookup_row(table, name, 16, gating=0.45)
    assert 1.0 <= gated.experts_per_token < 2.0
    assert lookup_row(table, name, 16, top_k=1).experts_per_token == 1.0
    assert lookup_row(table, name, 16).seq_len == TINY.seq_len  # default capped at the model's positions
    # A second run of one setting gives the same bytes for that row and leaves the others alone.
    before = out.read_bytes()
    code, output = _run(["quality", "--model", str(demo_dir), "--expert-bits", "4", "--max-tokens", "1024",
                         "--out", str(out)])
    assert code == 0, output
    assert out.read_bytes() == before


@needs_wikitext
def test_trace_and_stats_on_the_demo_model(tmp_path, demo_dir):
    """The demo folder is an ordinary HF model for `moesim trace` (when the tracer is installed)."""
    pytest.importorskip("moesim.tracer.capture")
    from moesim.tracer import read_trace

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "The game began in 1998 with"}\n{"prompt": "In the second season , the"}\n')
    out = tmp_path / "demo.parquet"
    code, output = _run(["trace", "--prompts", str(prompts), "--model", str(demo_dir), "--max-new-tokens", "6",
                         "--device", "cpu", "--no-progress", "--out", str(out)])
    assert code == 0, output
    trace = read_trace(out)
    assert trace.meta.num_experts == 8 and trace.meta.top_k == 2 and trace.meta.num_layers == TINY.num_layers
    code, output = _run(["trace", "stats", str(out)])
    assert code == 0 and "Routing (decode)" in output, output
