import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import random_cells, tiny_meta
from moesim.errors import MoesimError
from moesim.tracer import DECODE, PREFILL, TraceWriter, read_trace, read_trace_meta, write_trace
from moesim.tracer.format import METADATA_KEY


def test_roundtrip_keeps_every_column_and_execution_order(tmp_path, rng):
    cells = random_cells(rng)
    cells.next_layer_guess = rng.integers(0, 8, size=cells.experts.shape).astype(np.int16)
    cells.next_layer_guess[cells.layer == 2] = -1  # the last layer has no next layer
    cells.token_id = np.arange(len(cells), dtype=np.int32)
    shuffled = cells.take(rng.permutation(len(cells)))
    path = write_trace(tmp_path / "t.parquet", tiny_meta(), shuffled)
    trace = read_trace(path)
    assert len(trace) == len(cells) and trace.complete
    # execution order: per request, prefill layer-major, then decode step-major
    first = trace.cells.take(np.flatnonzero(trace.request == 0))
    pre = first.phase == PREFILL
    assert list(first.layer[pre][:4]) == [0, 0, 0, 0] and list(first.position[pre][:4]) == [0, 1, 2, 3]
    dec = first.phase == DECODE
    assert list(first.position[dec][:3]) == [4, 4, 4] and list(first.layer[dec][:3]) == [0, 1, 2]
    # the same cell has the same content after the round trip
    key = {(int(r), int(p), int(q), int(l)): i for i, (r, p, q, l) in
           enumerate(zip(cells.request, cells.phase, cells.position, cells.layer))}
    for j in range(len(trace)):
        i = key[(int(trace.request[j]), int(trace.phase[j]), int(trace.position[j]), int(trace.layer[j]))]
        assert np.array_equal(trace.experts[j], cells.experts[i])
        assert np.array_equal(trace.next_layer_guess[j], cells.next_layer_guess[i])
        assert trace.token_id[j] == cells.token_id[i]
    assert trace.recorded_hit is None
    assert read_trace_meta(path).model.top_k == 2


def test_layer_steps_group_prefill_tokens_and_decode_cells(tmp_path, rng):
    trace = read_trace(write_trace(tmp_path / "t.parquet", tiny_meta(), random_cells(rng, requests=1)))
    groups = list(trace.iter_layer_steps())
    # 3 prefill groups (one per layer, 4 tokens each) + 3 decode steps x 3 layers
    assert len(groups) == 3 + 9
    assert all(sl.stop - sl.start == 4 for _, ph, _, _, sl in groups[:3])
    assert all(sl.stop - sl.start == 1 for _, ph, _, _, sl in groups[3:])
    assert [g[2] for g in groups[3:6]] == [4, 4, 4]


def test_interrupted_writer_keeps_finished_requests(tmp_path, rng):
    cells = random_cells(rng, requests=3)
    path = tmp_path / "t.parquet"
    with pytest.raises(KeyboardInterrupt):
        with TraceWriter(path, tiny_meta()) as w:
            w.write_request(cells.take(np.flatnonzero(cells.request == 0)))
            w.write_request(cells.take(np.flatnonzero(cells.request == 1)))
            raise KeyboardInterrupt
    trace = read_trace(path)
    assert not trace.complete and trace.num_requests == 2
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]  # no temp file left


def test_interrupted_before_any_request_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with TraceWriter(tmp_path / "t.parquet", tiny_meta()):
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_bad_files_give_one_line_errors(tmp_path, rng):
    with pytest.raises(MoesimError, match="not found"):
        read_trace(tmp_path / "missing.parquet")
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(MoesimError, match="not a readable Parquet"):
        read_trace(junk)
    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"a": [1, 2]}), foreign)
    with pytest.raises(MoesimError, match="not a moesim trace"):
        read_trace(foreign)
    # an expert id outside the model's range names the row and column
    cells = random_cells(rng)
    cells.experts[5, 1] = 99
    bad = write_trace(tmp_path / "bad.parquet", tiny_meta(), cells)
    with pytest.raises(MoesimError, match="column 'experts' is out of range"):
        read_trace(bad)
    # metadata missing a field names the field
    table = pq.read_table(bad)
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    del meta["expert_bytes"]
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()}), tmp_path / "m.parquet")
    with pytest.raises(MoesimError, match="missing field 'expert_bytes'"):
        read_trace(tmp_path / "m.parquet")
    # a negative expert size names the metadata field (it surfaced as a negative copy in the profile)
    meta["expert_bytes"] = [-1] * tiny_meta().num_layers
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()}), tmp_path / "n.parquet")
    with pytest.raises(MoesimError, match="trace metadata field 'expert_bytes': expected a list of"):
        read_trace(tmp_path / "n.parquet")


@pytest.mark.parametrize("weight", [float("nan"), -5.0, float("inf")])
def test_a_non_finite_or_negative_routing_weight_names_the_row(tmp_path, rng, weight):
    cells = random_cells(rng)
    cells.weights[7, 0] = weight
    path = write_trace(tmp_path / "w.parquet", tiny_meta(), cells)
    with pytest.raises(MoesimError, match=r"row \d+ column 'weights' is \[.*\], expected finite non-negative"):
        read_trace(path)


def test_an_unknown_phase_names_the_row_and_the_value(tmp_path, rng):
    path = write_trace(tmp_path / "t.parquet", tiny_meta(), random_cells(rng))
    table = pq.read_table(path)
    phase = table.column("phase").cast(pa.string()).to_pylist()
    phase[3] = "warmup"
    table = table.set_column(table.schema.get_field_index("phase"), "phase", pa.array(phase, pa.string()))
    pq.write_table(table, path)
    with pytest.raises(MoesimError, match=r"row 3 column 'phase' is 'warmup', expected prefill or decode"):
        read_trace(path)
