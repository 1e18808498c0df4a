"""The moesim trace format: one Parquet file per trace, one row per (request, phase, position, MoE layer).

Columns
-------
``request``           int32   request index within the trace
``phase``             string  "prefill" or "decode" (dictionary-encoded)
``position``          int32   token position in its sequence (prefill 0..P-1, decode continues from P)
``layer``             int16   MoE layer index (0..num_moe_layers-1; ``ModelShape.moe_layer_ids`` maps it
                              to the decoder layer)
``experts``           list<int16>    the top-k experts in rank order
``weights``           list<float32>  the routing weights applied, same order
``next_layer_guess``  list<int16>    optional: top-k that layer+1's router gives on this layer's MoE input
                                     (null on the last layer)
``token_id``          int32   optional: the token at this position
``recorded_hit``      list<bool>     optional: a real engine's own cache hit per routed expert

File metadata (key ``moesim.trace``) holds a JSON :class:`TraceMeta`. Rows are stored in execution
order: for each request its prefill layer by layer (all prompt tokens of a layer together), then each
decode step layer by layer.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moesim import __version__
from moesim.atomic import atomic_path, note_input, prepare_output_path
from moesim.errors import MoesimError
from moesim.modelspec import ModelShape, load_model_shape

FORMAT_VERSION = 1
METADATA_KEY = b"moesim.trace"
STATUS_KEY = b"moesim.trace.status"
PHASES = ("prefill", "decode")
PREFILL, DECODE = 0, 1

SCHEMA = pa.schema(
    [
        pa.field("request", pa.int32(), nullable=False),
        pa.field("phase", pa.dictionary(pa.int8(), pa.string()), nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("experts", pa.list_(pa.int16()), nullable=False),
        pa.field("weights", pa.list_(pa.float32()), nullable=False),
        pa.field("next_layer_guess", pa.list_(pa.int16()), nullable=True),
        pa.field("token_id", pa.int32(), nullable=True),
        pa.field("recorded_hit", pa.list_(pa.bool_()), nullable=True),
    ]
)
REQUIRED_COLUMNS = ("request", "phase", "position", "layer", "experts", "weights")
OPTIONAL_COLUMNS = ("next_layer_guess", "token_id", "recorded_hit")


@dataclass(frozen=True)
class TraceSource:
    """Where a trace came from: a prompts file that was traced, or a file that was imported."""

    kind: str  # "prompts" | "import" | "synthetic"
    path: str
    sha256: str
    format: str = ""  # importer format name, or "" for traced prompts
    details: dict[str, Any] = field(default_factory=dict)  # e.g. generation settings, repairs made


@dataclass(frozen=True)
class RecordedEngine:
    """The engine that recorded ``recorded_hit``, with what is needed to replay its cache."""

    name: str
    cache_policy: str  # e.g. "global-lru-bytes"
    cache_budget_bytes: int
    notes: str = ""


@dataclass(frozen=True)
class TraceMeta:
    model: ModelShape
    dtype: str  # dtype the experts were traced (or served) at, e.g. "bfloat16", "gguf-q4_k_m"
    expert_bytes: tuple[int, ...]  # bytes of one expert at that dtype, per MoE layer
    non_expert_bytes: int  # non-expert bytes at that dtype
    source: TraceSource
    recorded_engine: Optional[RecordedEngine] = None
    moesim_version: str = __version__
    created: str = ""  # ISO-8601 UTC
    format_version: int = FORMAT_VERSION

    @property
    def num_layers(self) -> int:
        return self.model.num_moe_layers

    @property
    def num_experts(self) -> int:
        return self.model.num_experts

    @property
    def top_k(self) -> int:
        return self.model.top_k

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        d["expert_bytes"] = list(self.expert_bytes)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> "TraceMeta":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MoesimError(f"{where}: trace metadata is not valid JSON ({exc.msg})") from None
        for key in ("model", "dtype", "expert_bytes", "non_expert_bytes", "source"):
            if key not in d:
                raise MoesimError(f"{where}: trace metadata is missing field '{key}'")
        if d.get("format_version", 0) > FORMAT_VERSION:
            raise MoesimError(
                f"{where}: trace format version {d['format_version']} is newer than this moesim reads "
                f"({FORMAT_VERSION}); upgrade moesim"
            )
        model = ModelShape.from_dict(d["model"], where=f"{where}: trace metadata 'model'")
        check_byte_counts(d["expert_bytes"], d["non_expert_bytes"], model.num_moe_layers, f"{where}: trace metadata")
        engine = d.get("recorded_engine")
        return cls(
            model=model,
            dtype=d["dtype"],
            expert_bytes=tuple(int(x) for x in d["expert_bytes"]),
            non_expert_bytes=int(d["non_expert_bytes"]),
            source=TraceSource(**d["source"]),
            recorded_engine=RecordedEngine(**engine) if engine else None,
            moesim_version=d.get("moesim_version", ""),
            created=d.get("created", ""),
            format_version=int(d.get("format_version", FORMAT_VERSION)),
        )


def check_byte_counts(expert_bytes: Any, non_expert_bytes: Any, layers: int, where: str) -> None:
    """One expert's bytes per MoE layer (positive) and the non-expert bytes (non-negative), as a trace's
    metadata and a routing file hold them; else a one-line error (a negative size surfaced as the profile's)."""
    if (not isinstance(expert_bytes, list) or len(expert_bytes) != layers
            or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in expert_bytes)):
        raise MoesimError(f"{where} field 'expert_bytes': expected a list of {layers} positive integers (one "
                          f"expert's bytes per MoE layer)")
    if isinstance(non_expert_bytes, bool) or not isinstance(non_expert_bytes, int) or non_expert_bytes < 0:
        raise MoesimError(f"{where} field 'non_expert_bytes' is {non_expert_bytes!r}, expected a non-negative "
                          f"integer")


def utc_now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def sha256_of_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class TraceCells:
    """A batch of rows as column arrays (one request's rows, or a whole trace)."""

    request: np.ndarray  # int32 [N]
    phase: np.ndarray  # uint8 [N], PREFILL or DECODE
    position: np.ndarray  # int32 [N]
    layer: np.ndarray  # int16 [N]
    experts: np.ndarray  # int16 [N, k]
    weights: np.ndarray  # float32 [N, k]
    next_layer_guess: Optional[np.ndarray] = None  # int16 [N, k], -1 where absent
    token_id: Optional[np.ndarray] = None  # int32 [N], -1 where absent
    recorded_hit: Optional[np.ndarray] = None  # bool [N, k]

    def __len__(self) -> int:
        return int(self.request.shape[0])

    def execution_order(self) -> np.ndarray:
        """Row permutation into execution order (prefill layer-major, decode step-major)."""
        phase = self.phase.astype(np.int64)
        major = np.where(phase == PREFILL, self.layer.astype(np.int64), self.position.astype(np.int64))
        minor = np.where(phase == PREFILL, self.position.astype(np.int64), self.layer.astype(np.int64))
        return np.lexsort((minor, major, phase, self.request.astype(np.int64)))

    def take(self, index: np.ndarray) -> "TraceCells":
        def pick(a):
            return None if a is None else a[index]

        return TraceCells(
            request=self.request[index], phase=self.phase[index], position=self.position[index],
            layer=self.layer[index], experts=self.experts[index], weights=self.weights[index],
            next_layer_guess=pick(self.next_layer_guess), token_id=pick(self.token_id),
            recorded_hit=pick(self.recorded_hit),
        )

    def to_arrow(self) -> pa.Table:
        n = len(self)
        k = self.experts.shape[1]

        def list_array(values: np.ndarray, value_type: pa.DataType, valid: Optional[np.ndarray] = None):
            offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
            arr = pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=value_type))
            if valid is not None and not valid.all():
                arr = pa.ListArray.from_arrays(offsets, arr.values, mask=pa.array(~valid))
            return arr

        phase = pa.DictionaryArray.from_arrays(
            pa.array(self.phase.astype(np.int8)), pa.array(list(PHASES), type=pa.string())
        )
        cols = {
            "request": pa.array(self.request.astype(np.int32)),
            "phase": phase,
            "position": pa.array(self.position.astype(np.int32)),
            "layer": pa.array(self.layer.astype(np.int16)),
            "experts": list_array(self.experts.astype(np.int16), pa.int16()),
            "weights": list_array(self.weights.astype(np.float32), pa.float32()),
        }
        if self.next_layer_guess is not None:
            guess = self.next_layer_guess.astype(np.int16)
            cols["next_layer_guess"] = list_array(guess, pa.int16(), valid=(guess >= 0).all(axis=1))
        else:
            cols["next_layer_guess"] = pa.nulls(n, pa.list_(pa.int16()))
        if self.token_id is not None:
            tok = self.token_id.astype(np.int32)
            cols["token_id"] = pa.array(tok, mask=tok < 0)
        else:
            cols["token_id"] = pa.nulls(n, pa.int32())
        if self.recorded_hit is not None:
            cols["recorded_hit"] = list_array(self.recorded_hit.astype(bool), pa.bool_())
        else:
            cols["recorded_hit"] = pa.nulls(n, pa.list_(pa.bool_()))
        return pa.Table.from_pydict(cols, schema=SCHEMA)


@dataclass
class LayerSteps:
    """Execution-order groups of rows: one group per (request, phase, step, layer).

    A prefill group holds all prompt tokens of one layer; a decode group holds one token's cell.
    ``start``/``stop`` index into the trace's row arrays.
    """

    start: np.ndarray
    stop: np.ndarray
    request: np.ndarray
    phase: np.ndarray
    step: np.ndarray  # decode position, or -1 for a prefill group
    layer: np.ndarray

    def __len__(self) -> int:
        return int(self.start.shape[0])


@dataclass
class Trace:
    """A validated trace in execution order, with typed numpy columns."""

    meta: TraceMeta
    cells: TraceCells
    path: Optional[Path] = None
    complete: bool = True  # False when the run that wrote it was interrupted

    # Convenience views ---------------------------------------------------------------------
    @property
    def request(self) -> np.ndarray:
        return self.cells.request

    @property
    def phase(self) -> np.ndarray:
        return self.cells.phase

    @property
    def position(self) -> np.ndarray:
        return self.cells.position

    @property
    def layer(self) -> np.ndarray:
        return self.cells.layer

    @property
    def experts(self) -> np.ndarray:
        return self.cells.experts

    @property
    def weights(self) -> np.ndarray:
        return self.cells.weights

    @property
    def next_layer_guess(self) -> Optional[np.ndarray]:
        return self.cells.next_layer_guess

    @property
    def token_id(self) -> Optional[np.ndarray]:
        return self.cells.token_id

    @property
    def recorded_hit(self) -> Optional[np.ndarray]:
        return self.cells.recorded_hit

    def __len__(self) -> int:
        return len(self.cells)

    @property
    def num_requests(self) -> int:
        return int(np.unique(self.cells.request).size)

    def layer_steps(self) -> LayerSteps:
        c = self.cells
        step = np.where(c.phase == DECODE, c.position, -1).astype(np.int64)
        key_change = np.ones(len(c), dtype=bool)
        if len(c) > 1:
            key_change[1:] = (
                (c.request[1:] != c.request[:-1])
                | (c.phase[1:] != c.phase[:-1])
                | (step[1:] != step[:-1])
                | (c.layer[1:] != c.layer[:-1])
            )
        start = np.flatnonzero(key_change)
        stop = np.append(start[1:], len(c))
        return LayerSteps(start=start, stop=stop, request=c.request[start], phase=c.phase[start],
                          step=step[start], layer=c.layer[start])

    def iter_layer_steps(self) -> Iterator[tuple[int, int, int, int, slice]]:
        """(request, phase, step, layer, row slice) in execution order."""
        g = self.layer_steps()
        for i in range(len(g)):
            yield int(g.request[i]), int(g.phase[i]), int(g.step[i]), int(g.layer[i]), slice(int(g.start[i]), int(g.stop[i]))

    def select(self, mask: np.ndarray) -> "Trace":
        return Trace(meta=self.meta, cells=self.cells.take(np.flatnonzero(mask)), path=self.path, complete=self.complete)


# Writing ---------------------------------------------------------------------------------------
class TraceWriter:
    """Writes a trace one request (row group) at a time, so that a kill loses at most the request in flight.

    After every finished request the output file is replaced (temp file, then an atomic rename) by a valid
    trace of all finished requests, marked ``interrupted`` in its metadata until :meth:`close` marks it
    ``complete``. So whatever stops the run (an exception, Ctrl-C, SIGKILL, a power cut after the rename),
    the output path holds either nothing or a readable trace of the finished requests, and a rerun can
    resume from it (``resume_from``). With no finished request nothing is left behind.
    """

    def __init__(self, path: str | os.PathLike, meta: TraceMeta, resume_from: Optional["Trace"] = None):
        self.path = prepare_output_path(path)
        if not meta.created:
            meta = dataclasses.replace(meta, created=utc_now_iso())
        self.meta = meta
        self._schema = SCHEMA.with_metadata({METADATA_KEY: meta.to_json().encode()})
        self._tables: list[pa.Table] = []
        self.requests_written = 0
        self.rows_written = 0
        if resume_from is not None:
            for req in np.unique(resume_from.cells.request):
                self._tables.append(resume_from.cells.take(np.flatnonzero(resume_from.cells.request == req)).to_arrow())
                self.requests_written += 1
                self.rows_written += int(self._tables[-1].num_rows)
        self.resumed_requests = self.requests_written

    def write_request(self, cells: TraceCells) -> None:
        """Append one request's rows (sorted into execution order) as one row group, and save."""
        if len(cells) == 0:
            return
        k = self.meta.model.top_k
        if cells.experts.ndim != 2 or cells.experts.shape[1] != k:
            raise MoesimError(f"{self.path}: experts must have shape [rows, {k}], got {cells.experts.shape}")
        ordered = cells.take(cells.execution_order())
        self._tables.append(ordered.to_arrow())
        self._save("interrupted")
        self.requests_written += 1
        self.rows_written += len(ordered)

    def _save(self, status: str) -> None:
        with atomic_path(self.path) as tmp:
            writer = pq.ParquetWriter(tmp, self._schema, compression="zstd")
            for table in self._tables:
                writer.write_table(table, row_group_size=max(table.num_rows, 1))
            writer.add_key_value_metadata({STATUS_KEY: status.encode()})
            writer.close()

    def close(self) -> Path:
        self._save("complete")
        return self.path

    def abort(self) -> Optional[Path]:
        """The finished requests are already saved (marked interrupted); None when there are none."""
        return self.path if self.requests_written else None

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_trace(path: str | os.PathLike, meta: TraceMeta, cells: TraceCells) -> Path:
    """Write a whole trace, one row group per request."""
    with TraceWriter(path, meta) as writer:
        for req in np.unique(cells.request):
            writer.write_request(cells.take(np.flatnonzero(cells.request == req)))
    return Path(path)


# Reading ---------------------------------------------------------------------------------------
def _open_parquet(path: Path) -> pq.ParquetFile:
    if not path.exists():
        raise MoesimError(f"{path}: trace file not found")
    if path.is_dir():
        raise MoesimError(f"{path}: is a folder, expected a trace .parquet file")
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise MoesimError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None


def load_shape(spec: str | os.PathLike) -> ModelShape:
    """The model shape a ``--model-config`` names: a trace file's recorded model, or what
    :func:`moesim.modelspec.load_model_shape` reads (a bundled name, a config file or folder, a hub id)."""
    if Path(str(spec)).suffix == ".parquet":
        return read_trace_meta(spec).model
    return load_model_shape(spec)


def read_trace_meta(path: str | os.PathLike) -> TraceMeta:
    """Only the metadata of a trace file (cheap)."""
    path = Path(path)
    note_input(path)
    meta = _open_parquet(path).schema_arrow.metadata or {}
    if METADATA_KEY not in meta:
        raise MoesimError(f"{path}: not a moesim trace (no '{METADATA_KEY.decode()}' metadata)")
    return TraceMeta.from_json(meta[METADATA_KEY].decode(), where=str(path))


def _fixed_lists(table: pa.Table, name: str, k: int, dtype, path: Path, fill=-1) -> Optional[np.ndarray]:
    col = table.column(name).combine_chunks()
    n = len(col)
    if col.null_count == n:
        return None
    if col.null_count:
        col = col.fill_null(pa.scalar([fill] * k, type=col.type))
    offsets = np.asarray(col.offsets)
    lengths = np.diff(offsets)
    bad = np.flatnonzero(lengths != k)
    if bad.size:
        raise MoesimError(f"{path}: row {int(bad[0])} column '{name}' has {int(lengths[bad[0]])} entries, expected top_k={k}")
    values = np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=dtype)
    return values.reshape(n, k)


def read_trace(path: str | os.PathLike) -> Trace:
    """Read and validate a trace file; rows come back in execution order."""
    path = Path(path)
    note_input(path)
    pf = _open_parquet(path)
    meta = read_trace_meta(path)
    kv = pf.metadata.metadata or {}
    complete = kv.get(STATUS_KEY, b"complete") == b"complete"
    names = set(pf.schema_arrow.names)
    for col in REQUIRED_COLUMNS:
        if col not in names:
            raise MoesimError(f"{path}: trace is missing column '{col}'")
    table = pf.read()
    for col in REQUIRED_COLUMNS + tuple(c for c in OPTIONAL_COLUMNS if c in names):
        expected = SCHEMA.field(col).type
        got = table.schema.field(col).type
        if col == "phase":
            if not (pa.types.is_dictionary(got) or pa.types.is_string(got)):
                raise MoesimError(f"{path}: column 'phase' has type {got}, expected string")
        elif got != expected:
            raise MoesimError(f"{path}: column '{col}' has type {got}, expected {expected}")
    k = meta.model.top_k
    import pyarrow.compute as pc

    # compared in Arrow, not as a numpy array of Python strings (about 60 bytes a row on a long trace)
    phase_col = table.column("phase").cast(pa.string())
    phase = np.full(len(phase_col), 255, dtype=np.uint8)
    for name, code in (("prefill", PREFILL), ("decode", DECODE)):
        phase[pc.equal(phase_col, name).fill_null(False).to_numpy(zero_copy_only=False)] = code
    if (phase == 255).any():
        bad = int(np.flatnonzero(phase == 255)[0])
        raise MoesimError(f"{path}: row {bad} column 'phase' is '{phase_col[bad].as_py()}', expected prefill or "
                          "decode")
    cells = TraceCells(
        request=table.column("request").to_numpy().astype(np.int32),
        phase=phase,
        position=table.column("position").to_numpy().astype(np.int32),
        layer=table.column("layer").to_numpy().astype(np.int16),
        experts=_fixed_lists(table, "experts", k, np.int16, path),
        weights=_fixed_lists(table, "weights", k, np.float32, path),
    )
    if "next_layer_guess" in names:
        cells.next_layer_guess = _fixed_lists(table, "next_layer_guess", k, np.int16, path)
    if "token_id" in names:
        tok = table.column("token_id")
        if tok.null_count < len(tok):
            cells.token_id = tok.fill_null(-1).to_numpy().astype(np.int32)
    if "recorded_hit" in names:
        cells.recorded_hit = _fixed_lists(table, "recorded_hit", k, bool, path, fill=False)
    del table
    # Arrow's allocator keeps the freed table's pages for reuse: hand them back (a long trace's table is
    # larger than its numpy columns, and nothing here reads Parquet again soon)
    pa.default_memory_pool().release_unused()
    _validate_cells(cells, meta, path)
    order = cells.execution_order()
    if not np.array_equal(order, np.arange(len(cells))):
        cells = cells.take(order)
    return Trace(meta=meta, cells=cells, path=path, complete=complete)


def _validate_cells(cells: TraceCells, meta: TraceMeta, path: Path) -> None:
    def fail(mask: np.ndarray, column: str, expected: str) -> None:
        row = int(np.flatnonzero(mask)[0])
        raise MoesimError(f"{path}: row {row} column '{column}' is out of range, expected {expected}")

    L, E = meta.num_layers, meta.num_experts
    if len(cells) == 0:
        raise MoesimError(f"{path}: trace has no rows")
    if (cells.layer < 0).any() or (cells.layer >= L).any():
        fail((cells.layer < 0) | (cells.layer >= L), "layer", f"0..{L - 1}")
    if (cells.experts < 0).any() or (cells.experts >= E).any():
        fail(((cells.experts < 0) | (cells.experts >= E)).any(axis=1), "experts", f"0..{E - 1}")
    if (cells.position < 0).any():
        fail(cells.position < 0, "position", ">= 0")
    if cells.weights is not None:
        # a NaN or negative weight fits a routing model that its own synthesizer then refuses
        bad = ~np.isfinite(cells.weights) | (cells.weights < 0)
        if bad.any():
            row = int(np.flatnonzero(bad.any(axis=1))[0])
            raise MoesimError(f"{path}: row {row} column 'weights' is {cells.weights[row].tolist()}, expected "
                              f"finite non-negative routing weights (or the whole column null)")
    if cells.next_layer_guess is not None and (cells.next_layer_guess >= E).any():
        fail((cells.next_layer_guess >= E).any(axis=1), "next_layer_guess", f"-1..{E - 1}")


def trace_requests(path) -> int:
    """How many requests a trace holds (reads only its request column)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    read_trace_meta(path)  # "not a moesim trace" before any column is looked for
    try:
        column = pq.read_table(path, columns=["request"]).column("request")
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input
        raise MoesimError(f"{path}: cannot read its request column ({str(exc).splitlines()[0]})") from None
    if len(column) == 0:
        raise MoesimError(f"{path}: trace has no rows")  # as read_trace says it (not "0 requests" under --batch)
    return int(pc.count_distinct(column).as_py())
