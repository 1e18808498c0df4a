"""`moesim trace import`: the BigMoeOnEdge route CSVs (real) and vLLM hook dumps (built here, defects included)."""

from __future__ import annotations

import csv
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import REPO, SHARED
from moesim.cli import cli
from moesim.errors import MoesimError
from moesim.tracer import DECODE, PREFILL, read_trace
from moesim.tracer.importers import IMPORTERS, ImportOptions, import_trace, write_imported
from moesim.traces import bundled_traces

ROUTE_DIR = SHARED / "traces-raw" / "Helldez__BigMoeOnEdge" / "docs" / "bench-data" / "2026-07-15-route-trace"
MiB = 2**20
# tag -> (bundled trace name, engine cache budget from the source's PROVENANCE.md, top-k, decode hit rate there)
ROUTE_RUNS = {
    "qwen": ("qwen3-30b-a3b-bigmoeonedge", 4000 * MiB, 6, 0.803),
    "gemma": ("gemma-4-26b-a4b-bigmoeonedge", 4000 * MiB, 6, 0.819),
    "gptoss": ("gpt-oss-120b-bigmoeonedge", 3000 * MiB, 2, 0.448),
}
needs_route_data = pytest.mark.skipif(not ROUTE_DIR.is_dir(), reason="shared/traces-raw not present")


def run_cli(*args: str):
    return CliRunner().invoke(cli, ["trace", *args], catch_exceptions=False)


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moesim: error:"), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ------------------------------------------------------------------------------------------------
# llama-route-csv on the real BigMoeOnEdge traces
# ------------------------------------------------------------------------------------------------
def csv_cells(path: Path):
    """The CSV's cells in file order, read independently of the importer: (turn, phase, step, layer, experts,
    weights, residency, expert_bytes)."""
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    cells, key = [], None
    for row in csv.DictReader(lines):
        k = (int(row["turn"]), int(row["phase"]), int(row["step"]), int(row["layer"]))
        if k != key:
            cells.append((*k, [], [], [], []))
            key = k
        cells[-1][4].append(int(row["expert"]))
        cells[-1][5].append(float(row["weight"]))
        cells[-1][6].append(int(row["residency"]))
        cells[-1][7].append(int(row["expert_bytes"]))
    return cells


@pytest.fixture(scope="module")
def imported():
    if not ROUTE_DIR.is_dir():
        pytest.skip("shared/traces-raw not present")
    return {tag: import_trace("llama-route-csv", ROUTE_DIR / f"{tag}.route.csv",
                              ImportOptions(engine_cache_budget=budget))
            for tag, (_, budget, _, _) in ROUTE_RUNS.items()}


def replay_global_lru_bytes(cells, expert_bytes, budget, rowwise=False):
    """BigMoeOnEdge's cache, replayed directly: one LRU over (layer, expert), each entry its layer's bytes, tail
    evicted until the bytes fit. ``rowwise``: each expert looked up and inserted before the next one;
    otherwise a cell's experts are all looked up first, then promoted/inserted in rank order."""
    cache: OrderedDict = OrderedDict()
    used = 0
    hits = []
    for layer, experts in cells:
        keys = [(layer, e) for e in experts]
        cell_hits = [] if rowwise else [key in cache for key in keys]
        for key in keys:
            if rowwise:
                cell_hits.append(key in cache)
            if key in cache:
                cache.move_to_end(key)
            else:
                cache[key] = expert_bytes[layer]
                used += expert_bytes[layer]
            if rowwise:
                while used > budget:
                    used -= cache.popitem(last=False)[1]
        while used > budget:
            used -= cache.popitem(last=False)[1]
        hits.append(cell_hits)
    return hits


@needs_route_data
@pytest.mark.parametrize("tag", list(ROUTE_RUNS))
def test_route_csv_keeps_every_cell_in_execution_order(imported, tag):
    res = imported[tag]
    _, budget, k, decode_hit = ROUTE_RUNS[tag]
    cells = csv_cells(ROUTE_DIR / f"{tag}.route.csv")
    c = res.cells
    assert len(c) == len(cells)
    assert c.experts.shape[1] == k == res.meta.top_k
    # row i of the trace is cell i of the file: same order, same content
    assert np.array_equal(c.request, [x[0] for x in cells])
    assert np.array_equal(c.phase, [x[1] for x in cells])
    assert np.array_equal(c.position, [x[2] for x in cells])
    assert np.array_equal(c.layer, [x[3] for x in cells])
    assert np.array_equal(c.experts, [x[4] for x in cells])
    assert np.allclose(c.weights, [x[5] for x in cells], atol=1e-6)
    residency = np.array([x[6] for x in cells])
    nbytes = np.array([x[7] for x in cells])
    dec = c.phase == DECODE
    assert np.array_equal(c.recorded_hit[dec], residency[dec] > 0)
    assert np.array_equal(c.recorded_hit[~dec], nbytes[~dec] == 0)  # the engine writes residency=0 in prefill
    assert abs(c.recorded_hit[dec].mean() - decode_hit) < 0.0006
    # preamble: per-layer expert and dense bytes
    pre = [line for line in (ROUTE_DIR / f"{tag}.route.csv").read_text().splitlines() if line.startswith("# layer=")]
    eb = [int(line.split("expert_bytes=")[1].split()[0]) for line in pre]
    db = [int(line.split("dense_bytes=")[1].split()[0]) for line in pre]
    assert list(res.meta.expert_bytes) == eb and res.meta.non_expert_bytes == sum(db)
    assert res.meta.dtype == "gguf-q4_k_m"
    eng = res.meta.recorded_engine
    assert eng.cache_policy == "global-lru-bytes" and eng.cache_budget_bytes == budget
    assert res.meta.source.format == "llama-route-csv" and len(res.meta.source.sha256) == 64


@needs_route_data
def test_route_csv_model_shapes(imported):
    qwen = imported["qwen"].meta.model
    assert (qwen.model_id, qwen.num_moe_layers, qwen.num_experts, qwen.top_k) == ("qwen3-30b-a3b", 48, 128, 6)
    assert qwen.extra["top_k_override"]["config_top_k"] == 8 and qwen.hidden_size == 2048
    gpt = imported["gptoss"].meta.model
    assert (gpt.model_id, gpt.num_moe_layers, gpt.top_k, gpt.extra["top_k_override"]["config_top_k"]) == \
        ("gpt-oss-120b", 36, 2, 4)
    gemma = imported["gemma"].meta.model
    assert (gemma.num_moe_layers, gemma.num_experts, gemma.top_k) == (30, 128, 6)
    assert "assumed" in gemma.extra and "inferred" in gemma.extra
    # the GGUF bytes per expert follow from the inferred size: Q4_K gate/up + Q5_K or Q8_0 down
    per_matrix = gemma.expert_params // 3
    assert {int(per_matrix * (2 * 144 / 256 + down)) for down in (176 / 256, 34 / 32)} == \
        set(imported["gemma"].meta.expert_bytes)
    # the published totals: 25.2B parameters, 3.8B active with the native top-8
    assert round(gemma.total_params / 1e9, 1) == 25.2
    assert round((gemma.non_expert_params + 8 * gemma.num_moe_layers * gemma.expert_params) / 1e9, 1) == 3.8


@needs_route_data
@pytest.mark.parametrize("tag", list(ROUTE_RUNS))
def test_global_lru_replay_reproduces_recorded_hits(imported, tag):
    """Cells looked up all k first (then inserted in rank order), prefill included: 100% of decode rows agree;
    looking up and inserting one expert at a time does not reproduce the engine."""
    res = imported[tag]
    c = res.cells
    _, budget, _, _ = ROUTE_RUNS[tag]
    cells = list(zip(c.layer.tolist(), c.experts.tolist()))
    dec = c.phase == DECODE
    hits = np.array(replay_global_lru_bytes(cells, res.meta.expert_bytes, budget))
    agree = (hits == c.recorded_hit)[dec].mean()
    assert agree >= 0.999
    assert agree == 1.0  # PROVENANCE.md: 100.0%
    assert (hits == c.recorded_hit)[~dec].all()  # prefill: no bytes read exactly where the replay hits
    if tag != "gptoss":  # with k=2 the two orders happen to agree on this run
        rowwise = np.array(replay_global_lru_bytes(cells, res.meta.expert_bytes, budget, rowwise=True))
        assert (rowwise == c.recorded_hit)[dec].mean() < 1.0
    # without the prefill warming the cache, agreement drops (PROVENANCE.md: 99.0 / 98.3 / 99.7%)
    cold = np.array(replay_global_lru_bytes([x for x, d in zip(cells, dec) if d], res.meta.expert_bytes, budget))
    assert (cold == c.recorded_hit[dec]).mean() < 1.0


@needs_route_data
def test_bundled_traces_match_a_fresh_conversion(imported):
    bundled = bundled_traces()
    for tag, (name, budget, _, _) in ROUTE_RUNS.items():
        assert name in bundled, name
        assert bundled[name].stat().st_size < 5 * 2**20
        tr = read_trace(bundled[name])
        fresh = imported[tag]
        for col in ("request", "phase", "position", "layer", "experts", "weights", "recorded_hit"):
            assert np.array_equal(getattr(tr.cells, col), getattr(fresh.cells, col)), (name, col)
        assert tr.meta.model == fresh.meta.model and tr.meta.expert_bytes == fresh.meta.expert_bytes
        assert tr.meta.recorded_engine == fresh.meta.recorded_engine
        assert tr.meta.source.sha256 == fresh.meta.source.sha256
    provenance = (REPO / "traces" / "PROVENANCE.md").read_text()
    for tag in ROUTE_RUNS:
        assert imported[tag].meta.source.sha256 in provenance
    assert "Apache-2.0" in provenance and "convert_bundled.py" in provenance


@needs_route_data
def test_route_csv_cli_writes_trace_and_reads_budget_from_metrics(tmp_path):
    out = tmp_path / "g.parquet"
    r = run_cli("import", "--format", "llama-route-csv", str(ROUTE_DIR / "gptoss.route.csv"), "--out", str(out))
    assert r.exit_code == 0, r.output
    assert "cache_budget_MiB" in r.output and f"wrote {out}" in r.output
    tr = read_trace(out)
    assert tr.meta.recorded_engine.cache_budget_bytes == 3000 * MiB  # from gptoss.metrics
    assert len(tr) == 10560 // 2


ROUTE_HEADER = ("# route_trace v1\n# model=/m/x.gguf arch=qwen3moe n_layer=2 n_expert=4 n_expert_used=2\n"
                "# layer=0 expert_bytes=100 dense_bytes=10\n# layer=1 expert_bytes=100 dense_bytes=10\n"
                "turn,phase,step,layer,slot,expert,weight,residency,expert_bytes\n")
ROUTE_ROWS = "0,1,0,0,0,1,0.6,0,100\n0,1,0,0,1,2,0.4,0,100\n0,1,0,1,0,3,0.7,0,100\n0,1,0,1,1,0,0.3,1,0\n"
TINY_QWEN = {"model_type": "qwen3_moe", "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
             "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
             "vocab_size": 50, "num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 1,
             "mlp_only_layers": []}


@pytest.mark.parametrize("text,fragments", [
    ("# route_trace v2\n", ["line 1", "route_trace v1"]),
    (ROUTE_HEADER.replace("expert_bytes\n", "bytes\n"), ["line 5", "columns"]),
    (ROUTE_HEADER + ROUTE_ROWS.replace("0,1,0,1,0,3,0.7", "0,1,0,1,0,x,0.7"), ["line 8", "'expert'", "integer"]),
    (ROUTE_HEADER + ROUTE_ROWS + "0,1,1,0\n", ["line 10", "4 fields"]),
    (ROUTE_HEADER + ROUTE_ROWS.replace("0,1,0,1,0,3", "0,1,0,1,0,9"), ["line 8", "'expert'", "0..3"]),
    (ROUTE_HEADER + ROUTE_ROWS.replace("0.3,1,0\n", "0.3,1,0\n0,1,0,1,1,2,0.1,1,0\n"), ["line 8", "3 rows"]),
    (ROUTE_HEADER + ROUTE_ROWS.replace("0,1,0,1,", "0,1,1,1,").replace("0,1,0,0,", "0,1,2,0,"),
     ["execution order"]),
    (ROUTE_HEADER.replace("# layer=1 expert_bytes=100 dense_bytes=10\n", "") + ROUTE_ROWS, ["layer=1"]),
    (ROUTE_HEADER + ROUTE_ROWS.replace("0,1,0,1,0,3,0.7", "0,1,0,1,0,3,-5"), ["line 8", "'weight'", "non-negative"]),
])
def test_route_csv_bad_input_is_one_line_exit_2_and_no_output(tmp_path, text, fragments):
    src = tmp_path / "x.route.csv"
    src.write_text(text)
    (tmp_path / "cfg.json").write_text(json.dumps(TINY_QWEN))
    out = tmp_path / "out.parquet"
    r = run_cli("import", "--format", "llama-route-csv", str(src), "--out", str(out), "--engine-cache-budget",
                "1MiB", "--model-config", str(tmp_path / "cfg.json"))
    assert_one_line_error(r, str(src), *fragments)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "x.route.csv"]


def test_route_csv_malformed_metrics_budget_names_the_file_and_line(tmp_path):
    src = tmp_path / "x.route.csv"
    src.write_text(ROUTE_HEADER + ROUTE_ROWS)
    (tmp_path / "x.metrics").write_text("step,steps,wall_ms\n1,1,2.0\n# summary cache_budget_MiB=1.2.3 tokens=1\n")
    (tmp_path / "cfg.json").write_text(json.dumps(TINY_QWEN))
    out = tmp_path / "out.parquet"
    r = run_cli("import", "--format", "llama-route-csv", str(src), "--out", str(out), "--model-config",
                str(tmp_path / "cfg.json"))
    assert_one_line_error(r, f"{tmp_path / 'x.metrics'}: line 3: cache_budget_MiB=1.2.3, expected a positive")
    assert not out.exists()


def test_route_csv_small_file_imports_with_a_given_config(tmp_path):
    src = tmp_path / "x.route.csv"
    src.write_text(ROUTE_HEADER + ROUTE_ROWS)
    (tmp_path / "cfg.json").write_text(json.dumps(TINY_QWEN))
    res = import_trace("llama-route-csv", src, ImportOptions(engine_cache_budget=1000,
                                                             model_config=str(tmp_path / "cfg.json")))
    assert res.cells.recorded_hit.tolist() == [[False, False], [False, True]]
    missing_budget = pytest.raises(MoesimError, match="--engine-cache-budget")
    with missing_budget:
        import_trace("llama-route-csv", src, ImportOptions(model_config=str(tmp_path / "cfg.json")))


def test_generic_bad_inputs(tmp_path):
    out = tmp_path / "o.parquet"
    assert_one_line_error(run_cli("import", "--format", "nope", str(tmp_path / "a.csv"), "--out", str(out)),
                          "--format 'nope'", "llama-route-csv", "vllm-jsonl")
    assert_one_line_error(run_cli("import", "--format", "llama-route-csv", str(tmp_path / "missing.csv"),
                                  "--out", str(out)), "missing.csv", "not found")
    assert_one_line_error(run_cli("import", "--format", "vllm-jsonl", str(tmp_path / "missing.jsonl"),
                                  "--model-config", "mixtral-8x7b", "--out", str(out)), "not found")
    assert_one_line_error(run_cli("import", "--format", "llama-route-csv", str(tmp_path), "--engine-cache-budget",
                                  "lots", "--out", str(out)), "--engine-cache-budget")
    assert not out.exists()
    assert set(IMPORTERS) == {"llama-route-csv", "vllm-jsonl"}


# ------------------------------------------------------------------------------------------------
# vllm-jsonl: dumps built here in both documented forms, with the documented defects
# ------------------------------------------------------------------------------------------------
TINY_MIXTRAL = {"model_type": "mixtral", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
                "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 50, "num_local_experts": 8,
                "num_experts_per_tok": 2}
L, E, K = 4, 8, 2


@pytest.fixture
def mixtral_config(tmp_path) -> str:
    path = tmp_path / "tiny-mixtral.json"
    path.write_text(json.dumps(TINY_MIXTRAL))
    return str(path)


def routing(rng, n):
    """n router decisions of a top-2 softmax router: experts by descending weight, weights renormalized."""
    logits = rng.normal(size=(n, E)) * 2
    top = np.argsort(-logits, axis=1)[:, :K]
    w = np.exp(np.take_along_axis(logits, top, axis=1))
    return top.tolist(), (w / w.sum(axis=1, keepdims=True)).round(6).tolist()


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def decode_only_dump(rng, problems, steps, dropped=(), wrong_k=(), out_of_range=(), ascending=()):
    """Decode-only dump as the hook writes it: problems batched in each forward pass (records interleaved
    layer by layer), token_idx = the hook's per-(problem, layer) counter, so a dropped 0.5/0.5 cell leaves
    that layer's later token_idx one behind. Returns the lines and the truth {(problem, step, layer): experts}."""
    truth, records = {}, []
    counter = {}
    for step in range(steps):
        for layer in range(L):
            experts, probs = routing(rng, len(problems))
            for p, pid in enumerate(problems):
                cell = (pid, step, layer)
                if cell in dropped:  # the hook lost it: nothing written, the counter does not move
                    continue
                ex, pr = experts[p], probs[p]
                if cell in wrong_k:
                    ex, pr = ex + [int(np.setdiff1d(np.arange(E), ex)[0])], pr + [0.0]
                elif cell in out_of_range:
                    ex = [ex[0], E + 3]
                elif cell in ascending:
                    ex, pr = ex[::-1], pr[::-1]
                else:
                    truth[cell] = experts[p]
                if cell in ascending:
                    truth[cell] = experts[p]
                idx = counter.get((pid, layer), 0)
                counter[(pid, layer)] = idx + 1
                records.append({"dataset": "gsm8k", "problem_id": pid, "layer": layer, "token_idx": idx,
                                "experts": ex, "gating_probs": pr})
    return records, truth


def cells_by_key(cells):
    return {(int(r), int(ph), int(pos), int(l)): e for r, ph, pos, l, e in
            zip(cells.request, cells.phase, cells.position, cells.layer, cells.experts.tolist())}


def test_vllm_decode_only_realigns_after_dropped_cells(tmp_path, rng, mixtral_config):
    steps = 10
    dropped = {(17, 3, 1), (17, 7, L - 1), (4, 0, 0), (4, 4, 2)}
    records, truth = decode_only_dump(rng, [17, 4], steps, dropped=dropped, wrong_k={(17, 5, 2)},
                                      out_of_range={(4, 6, 0)}, ascending={(17, 2, 0)})
    src = write_jsonl(tmp_path / "dump.jsonl", records)
    out = tmp_path / "dump.parquet"
    r = run_cli("import", "--format", "vllm-jsonl", str(src), "--model-config", mixtral_config, "--out", str(out))
    assert r.exit_code == 0, r.output
    tr = read_trace(out)
    got = cells_by_key(tr.cells)
    request_of = {17: 0, 4: 1}  # order of first appearance
    want = {(request_of[pid], DECODE, step, layer): ex for (pid, step, layer), ex in truth.items()}
    assert got == want  # every kept cell at its true step, in rank order; nothing else
    rep = tr.meta.source.details["repairs"]
    # later token_idx of each layer that lost a cell: (17,L1) steps 4-9, (17,L3) 8-9, (4,L0) 1-9, (4,L2) 5-9
    assert rep["realigned_token_idx"] == 6 + 2 + 9 + 5  # counted before (4, 6, 0) is dropped as out of range
    assert rep["shifted_layers"] == 4 and rep["missing_cells"] == 4
    assert rep["dropped_wrong_k"] == 1 and rep["dropped_out_of_range"] == 1 and rep["reordered_by_weight"] == 1
    assert tr.meta.source.details["requests"] == [{"dataset": "gsm8k", "problem_id": 17},
                                                  {"dataset": "gsm8k", "problem_id": 4}]
    assert "re-aligned token_idx of 22 cells" in r.output and "4 cells missing" in r.output
    assert "dropped 1 cells with the wrong number of experts" in r.output
    w = tr.weights
    assert (w[:, 0] >= w[:, 1]).all()


def test_vllm_decode_only_out_of_order_lines(tmp_path, rng, mixtral_config):
    """Lines sorted by (problem, layer, token_idx): execution order is lost. Every layer that lost no cell is
    kept at its token_idx; the one layer that lost a cell cannot be re-aligned and is dropped alone, and said so."""
    records, truth = decode_only_dump(rng, [1, 2], 6, dropped={(2, 2, 1)})
    records.sort(key=lambda r: (r["problem_id"], r["layer"], r["token_idx"]))
    res = import_trace("vllm-jsonl", write_jsonl(tmp_path / "d.jsonl", records),
                       ImportOptions(model_config=mixtral_config))
    got = cells_by_key(res.cells)
    request_of = {1: 0, 2: 1}
    assert got == {(request_of[pid], DECODE, s, layer): ex for (pid, s, layer), ex in truth.items()
                   if not (pid == 2 and layer == 1)}
    rep = res.meta.source.details["repairs"]
    assert rep["dropped_unlocatable_layers"] == 1 and rep["dropped_unlocatable_cells"] == 6 - 1
    assert rep["missing_cells"] == 1
    assert any("1 (problem, layer) pairs that lost a cell at an unknown step" in line for line in res.summary)


def test_vllm_raw_form_prefill_then_decode_passes(tmp_path, rng, mixtral_config):
    """Raw form: token_pos is the position in the forward batch; two problems share every pass; the first pass
    is the prefill; passes start where the layer index stops increasing."""
    prompt = {"a": 5, "b": 3}
    decode_steps = 6
    dropped = {("a", 2, 1), ("b", prompt["b"] + 3, L - 1), ("a", prompt["a"], 0)}  # (problem, position, layer)
    truth, records = {}, []
    for j in range(1 + decode_steps):
        for layer in range(L):
            batch = []  # (problem, position, token_pos)
            if j == 0:
                offset = 0
                for pid in ("a", "b"):
                    batch += [(pid, pos, offset + pos) for pos in range(prompt[pid])]
                    offset += prompt[pid]
            else:
                batch = [("a", prompt["a"] + j - 1, 0), ("b", prompt["b"] + j - 1, 1)]
            experts, probs = routing(rng, len(batch))
            for (pid, pos, tpos), ex, pr in zip(batch, experts, probs):
                if (pid, pos, layer) in dropped:
                    continue
                truth[(pid, pos, layer)] = ex
                records.append({"dataset": "d", "problem_id": pid, "layer": layer, "token_pos": tpos,
                                "experts": ex, "gating_probs": pr})
    records.insert(7, dict(records[6]))  # a repeated line
    res = import_trace("vllm-jsonl", write_jsonl(tmp_path / "raw.jsonl", records),
                       ImportOptions(model_config=mixtral_config))
    req = {"a": 0, "b": 1}
    want = {(req[pid], PREFILL if pos < prompt[pid] else DECODE, pos, layer): ex
            for (pid, pos, layer), ex in truth.items()}
    assert cells_by_key(res.cells) == want
    rep = res.meta.source.details["repairs"]
    assert rep["missing_cells"] == 3 and rep["dropped_duplicate_cell"] == 1 and rep["form"] == "token_pos"
    out = tmp_path / "raw.parquet"
    write_imported(res, out)
    tr = read_trace(out)
    assert tr.meta.model.top_k == 2 and tr.meta.dtype == "bfloat16"
    assert tr.meta.expert_bytes == (tr.meta.model.expert_params * 2,) * L


def test_vllm_decoder_layer_ids_map_to_moe_layers(tmp_path, rng):
    cfg = dict(TINY_QWEN, num_hidden_layers=4, mlp_only_layers=[0], num_experts=8, num_experts_per_tok=2)
    (tmp_path / "q.json").write_text(json.dumps(cfg))
    records = []
    for step in range(3):
        experts, probs = routing(rng, 3)
        for i, layer in enumerate((1, 2, 3)):  # decoder layers; layer 0 is dense
            records.append({"problem_id": 0, "layer": layer, "token_idx": step, "experts": experts[i],
                            "gating_probs": probs[i]})
    res = import_trace("vllm-jsonl", write_jsonl(tmp_path / "d.jsonl", records),
                       ImportOptions(model_config=str(tmp_path / "q.json")))
    assert sorted(set(res.cells.layer.tolist())) == [0, 1, 2] and len(res.cells) == 9
    assert res.meta.source.details["repairs"]["layer_ids_were_decoder_layers"]


@pytest.mark.parametrize("lines,fragments", [
    (['{"problem_id": 0, "layer": 0, "token_idx": 0, "experts": [1, 2], "gating_probs": [0.6, 0.4]}', "{oops"],
     ["line 2", "not valid JSON"]),
    (['{"problem_id": 0, "layer": 0, "token_idx": 0, "gating_probs": [0.6, 0.4]}'], ["line 1", "'experts'"]),
    (['{"problem_id": 0, "layer": 0, "token_idx": 0, "experts": [1, 2], "gating_probs": [0.6, 0.4]}',
      '{"problem_id": 0, "layer": 1, "token_pos": 0, "experts": [1, 2], "gating_probs": [0.6, 0.4]}'],
     ["line 2", "one form"]),
    (['{"problem_id": 0, "layer": -1, "token_idx": 0, "experts": [1, 2], "gating_probs": [0.6, 0.4]}'],
     ["line 1", "'layer'"]),
    (['{"problem_id": 0, "layer": 0, "token_idx": 0, "experts": ["a", 2], "gating_probs": [0.6, 0.4]}'],
     ["line 1", "'experts'"]),
    (['{"problem_id": 0, "layer": 0, "token_idx": 0, "experts": [1, 2, 3, 4], "gating_probs": [1, 1, 1, 1]}'],
     ["top_k is 2"]),
    ([""], ["no records"]),
])
def test_vllm_bad_input_is_one_line_exit_2_and_no_output(tmp_path, mixtral_config, lines, fragments):
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "bad.parquet"
    r = run_cli("import", "--format", "vllm-jsonl", str(src), "--model-config", mixtral_config, "--out", str(out))
    assert_one_line_error(r, *fragments)
    assert not out.exists()


def test_vllm_needs_a_model_config(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"problem_id": 0, "layer": 0, "token_idx": 0, "experts": [1, 2],
                                             "gating_probs": [0.5, 0.5]}])
    assert_one_line_error(run_cli("import", "--format", "vllm-jsonl", str(src)), "--model-config")
    assert_one_line_error(run_cli("import", "--format", "vllm-jsonl", str(src), "--model-config", "mixtral-8x7b",
                                  "--engine-cache-budget", "1GiB"), "--engine-cache-budget")
    assert not (Path.cwd() / "d.parquet").exists()


def test_vllm_layer_major_dump_with_dropped_cells_imports(tmp_path, rng, mixtral_config):
    """#15 finding 4: a real dump written layer-major (all tokens of layer 0, then layer 1, ...) with a few cells
    dropped by the hook in every problem was refused whole ("no usable cells left ... not in execution order")."""
    steps = 12
    dropped = {(0, 3, 1), (1, 7, 2), (2, 0, 0)}
    records, truth = decode_only_dump(rng, [0, 1, 2], steps, dropped=dropped)
    records.sort(key=lambda r: (r["layer"], r["problem_id"], r["token_idx"]))  # layer-major
    src = write_jsonl(tmp_path / "mixtral.jsonl", records)
    out = tmp_path / "mixtral.parquet"
    r = run_cli("import", "--format", "vllm-jsonl", str(src), "--model-config", mixtral_config, "--out", str(out))
    assert r.exit_code == 0, r.output
    got = cells_by_key(read_trace(out).cells)
    lost_layers = {(pid, layer) for pid, _, layer in dropped}
    want = {(pid, DECODE, s, layer): ex for (pid, s, layer), ex in truth.items() if (pid, layer) not in lost_layers}
    assert got == want
    assert "dropped 33 cells of 3 (problem, layer) pairs" in r.output and "3 cells missing" in r.output
    # the same lines in execution order re-align those layers instead
    records.sort(key=lambda r: (r["token_idx"], r["layer"]))
    in_order = import_trace("vllm-jsonl", write_jsonl(tmp_path / "exec.jsonl", records),
                            ImportOptions(model_config=mixtral_config))
    assert len(in_order.cells) == len(truth)


def test_vllm_any_line_order_gives_the_same_trace(tmp_path, rng, mixtral_config):
    records, truth = decode_only_dump(rng, [5, 6], 8, dropped={(5, 2, 3)})
    # shuffled, the lines lose their execution order: the (problem, layer) that lost a cell cannot be
    # re-aligned and is dropped alone; every other cell is kept at its true step
    want = {(pid, DECODE, step, layer): ex for (pid, step, layer), ex in truth.items() if (pid, layer) != (5, 3)}
    base = None
    for seed in range(6):
        shuffled = list(records)
        np.random.default_rng(seed).shuffle(shuffled)
        res = import_trace("vllm-jsonl", write_jsonl(tmp_path / f"s{seed}.jsonl", shuffled),
                           ImportOptions(model_config=mixtral_config))
        key = (cells_by_key(res.cells), res.summary)
        # request numbers follow first appearance; compare by problem instead
        problems = [d["problem_id"] for d in res.meta.source.details["requests"]]
        key = ({(problems[k[0]],) + k[1:]: v for k, v in key[0].items()}, key[1])
        base = base or key
        assert key == base
        assert key[0] == want


def test_vllm_a_negative_gating_prob_drops_its_cell(tmp_path, rng, mixtral_config):
    records, truth = decode_only_dump(rng, [3], 4)
    records[5]["gating_probs"] = [-3.0, 0.4]
    lost = (records[5]["problem_id"], records[5]["token_idx"], records[5]["layer"])
    res = import_trace("vllm-jsonl", write_jsonl(tmp_path / "neg.jsonl", records),
                       ImportOptions(model_config=mixtral_config))
    assert res.meta.source.details["repairs"]["dropped_bad_weights"] == 1
    assert (res.cells.weights >= 0).all() and len(res.cells) == len(truth) - 1
    assert lost in truth
