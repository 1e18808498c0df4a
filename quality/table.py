"""The quality table: perplexity per (model, checkpoint, expert format, gating, top-k), as JSON with a schema.

``moesim quality`` writes it; the cost model and ``moesim search --max-ppl`` read it through
:func:`load_quality_table` and :func:`lookup_perplexity`. One file can hold many models and settings:
writing merges new rows into an existing file, replacing rows with the same key. Rows are sorted by key
and nothing time-dependent is stored, so the same measurements give the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from moesim import __version__
from moesim.atomic import write_text_atomic
from moesim.errors import MoesimError
from moesim.quant import WeightFormat

TABLE_FORMAT = "moesim.quality-table"
TABLE_VERSION = 1


@dataclass(frozen=True)
class QualityRow:
    model_id: str  # a name for the model (the folder name unless --model-id was given)
    checkpoint_sha256: str  # hash of config.json and the weight files
    quantizer: str  # "rtn" | "hqq"; "none" for 16-bit experts
    expert_bits: int  # 16, 8, 4, 3 or 2 (16 = bfloat16)
    group_size: int  # weights per scale/zero group along the input dim; 0 for 16-bit experts
    weight_format: str  # moesim.quant.WeightFormat name, e.g. "bf16", "int4-g64"
    gating_threshold: float  # AdapMoE adaptive-gating threshold t; 0.0 = off
    gating_sensitivity: str  # "" = naive threshold; else the per-layer sensitivities used (sqrt(t/s_l))
    top_k: int  # experts per token the router selects
    model_top_k: int  # the model's own top-k (to tell an override from the default)
    data: str  # data set name or text file as given
    data_sha256: str  # hash of the text file
    seq_len: int  # tokens per window
    windows: int  # windows scored
    predicted_tokens: int  # tokens whose NLL is summed: windows * (seq_len - 1)
    perplexity: float
    mean_nll: float  # natural-log NLL per predicted token
    experts_per_token: float  # routed experts used per token per MoE layer, after gating
    moesim_version: str = __version__

    def key(self) -> tuple:
        return (self.model_id, self.checkpoint_sha256, self.quantizer, -self.expert_bits, self.group_size,
                self.gating_sensitivity, self.gating_threshold, self.top_k, self.data_sha256, self.seq_len)


KEY_FIELDS = ("model_id", "checkpoint_sha256", "quantizer", "expert_bits", "group_size", "gating_sensitivity",
              "gating_threshold", "top_k", "data_sha256", "seq_len")

_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(QualityRow)}
_PY_TYPES = {"str": str, "int": int, "float": (int, float)}

SCHEMA = {
    "format": TABLE_FORMAT,
    "format_version": TABLE_VERSION,
    "key": list(KEY_FIELDS),
    "columns": {name: typ for name, typ in _FIELD_TYPES.items()},
}


@dataclass(frozen=True)
class QualityTable:
    rows: tuple[QualityRow, ...]
    path: str = ""

    def models(self) -> list[str]:
        return sorted({r.model_id for r in self.rows})

    def rows_for(self, model: str) -> list[QualityRow]:
        """Rows of a model id, or of a checkpoint hash (a prefix of 8+ hex digits will do)."""
        return [r for r in self.rows if r.model_id == model
                or (len(model) >= 8 and r.checkpoint_sha256.startswith(model.lower()))]


def make_row(*, expert_bits: int, group_size: int, quantizer: str, **fields) -> QualityRow:
    """A row with the 16-bit case normalized (no quantizer, no groups) and the format name filled in."""
    fmt = WeightFormat(expert_bits, group_size)
    if not fmt.is_quantized:
        quantizer, group_size = "none", 0
    return QualityRow(expert_bits=expert_bits, group_size=group_size, quantizer=quantizer,
                      weight_format=fmt.name, **fields)


def _row_from_dict(d: dict, where: str) -> QualityRow:
    if not isinstance(d, dict):
        raise MoesimError(f"{where}: expected an object")
    values = {}
    for name, typ in _FIELD_TYPES.items():
        if name not in d:
            if name == "moesim_version":
                continue
            raise MoesimError(f"{where}: missing field '{name}'")
        value = d[name]
        py = _PY_TYPES[typ]
        if isinstance(value, bool) or not isinstance(value, py):
            raise MoesimError(f"{where}: field '{name}' is {type(value).__name__}, expected {typ}")
        values[name] = float(value) if typ == "float" else value
    # search compares perplexities against --max-ppl, where a zero or negative one would meet any bound
    ppl, nll = values["perplexity"], values["mean_nll"]
    if not (math.isfinite(ppl) and ppl > 0):
        raise MoesimError(f"{where}: field 'perplexity' is {ppl!r}, expected a positive finite number")
    if not math.isfinite(nll):
        raise MoesimError(f"{where}: field 'mean_nll' is {nll!r}, expected a finite number")
    return QualityRow(**values)


def load_quality_table(path: str | os.PathLike) -> QualityTable:
    path = Path(path)
    if not path.is_file():
        raise MoesimError(f"{path}: no such quality table")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MoesimError(f"{path}: not a JSON quality table ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != TABLE_FORMAT:
        raise MoesimError(f"{path}: not a quality table (expected \"format\": \"{TABLE_FORMAT}\")")
    version = doc.get("format_version")
    if not isinstance(version, int) or version > TABLE_VERSION:
        raise MoesimError(f"{path}: quality table version {version!r}; this moesim reads up to {TABLE_VERSION}")
    rows = doc.get("rows")
    if not isinstance(rows, list):
        raise MoesimError(f"{path}: field 'rows' must be a list")
    parsed = tuple(_row_from_dict(r, f"{path}: rows[{i}]") for i, r in enumerate(rows))
    return QualityTable(rows=parsed, path=str(path))


def table_json(rows: list[QualityRow] | tuple[QualityRow, ...]) -> str:
    ordered = sorted(rows, key=QualityRow.key)
    doc = dict(SCHEMA)
    doc["rows"] = [dataclasses.asdict(r) for r in ordered]
    return json.dumps(doc, indent=1, sort_keys=False) + "\n"


def write_quality_table(path: str | os.PathLike, rows: list[QualityRow], merge: bool = True) -> QualityTable:
    """Write ``rows`` to ``path`` atomically; with ``merge``, keep the file's other rows (same key: replaced)."""
    by_key: dict[tuple, QualityRow] = {}
    if merge and Path(path).exists():
        for row in load_quality_table(path).rows:
            by_key[row.key()] = row
    for row in rows:
        by_key[row.key()] = row
    merged = tuple(sorted(by_key.values(), key=QualityRow.key))
    write_text_atomic(path, table_json(merged))
    return QualityTable(rows=merged, path=str(path))


def _describe(r: QualityRow) -> str:
    gate = f"gating {r.gating_threshold:g}{'/' + r.gating_sensitivity if r.gating_sensitivity else ''}"
    return f"{r.weight_format} {gate} top-{r.top_k} on {r.data} seq {r.seq_len} ({r.quantizer})"


def lookup_row(
    table: QualityTable,
    model: str,
    expert_bits: int,
    group_size: int = 64,
    gating: float = 0.0,
    top_k: int | None = None,
    *,
    quantizer: str | None = None,
    gating_sensitivity: str | None = None,
    data: str | None = None,
    seq_len: int | None = None,
) -> QualityRow:
    """The one row for a setting. ``model`` is a model id or a checkpoint hash (a prefix of 8+ hex digits
    will do); ``top_k`` None means the model's own; ``group_size`` is ignored for 16-bit experts; the
    keyword filters narrow a table holding several quantizers, data sets or sequence lengths."""
    WeightFormat(expert_bits, group_size)  # validates bits and group size
    of_model = table.rows_for(model)
    if not of_model:
        known = ", ".join(table.models()) or "none"
        raise MoesimError(f"quality table {table.path or ''}: no rows for model '{model}' (models: {known})")
    if len({r.checkpoint_sha256 for r in of_model}) > 1:
        raise MoesimError(
            f"quality table {table.path}: model '{model}' has rows for several checkpoints; pass a checkpoint hash"
        )

    def matches(r: QualityRow) -> bool:
        return (
            r.expert_bits == expert_bits
            and (expert_bits == 16 or r.group_size == group_size)
            and abs(r.gating_threshold - float(gating)) <= 1e-12
            and (gating_sensitivity is None or r.gating_sensitivity == gating_sensitivity)
            and (r.top_k == top_k if top_k is not None else r.top_k == r.model_top_k)
            and (quantizer is None or expert_bits == 16 or r.quantizer == quantizer)
            and (data is None or r.data == data or r.data_sha256 == data)
            and (seq_len is None or r.seq_len == seq_len)
        )

    found = [r for r in of_model if matches(r)]
    wanted = (f"{WeightFormat(expert_bits, group_size).name} gating {float(gating):g} "
              f"top-{top_k if top_k is not None else 'default'}")
    if not found:
        have = "; ".join(sorted({_describe(r) for r in of_model}))
        raise MoesimError(f"quality table {table.path}: no row for model '{model}' at {wanted} (has: {have})")
    if len(found) > 1:
        have = "; ".join(_describe(r) for r in found)
        raise MoesimError(
            f"quality table {table.path}: {len(found)} rows match model '{model}' at {wanted} ({have}); "
            "narrow with quantizer=, gating_sensitivity=, data= or seq_len="
        )
    return found[0]


def lookup_perplexity(
    table: QualityTable,
    model: str,
    expert_bits: int,
    group_size: int = 64,
    gating: float = 0.0,
    top_k: int | None = None,
    **filters,
) -> float:
    """Perplexity of ``model`` with experts at ``expert_bits`` (see :func:`lookup_row` for the arguments)."""
    return lookup_row(table, model, expert_bits, group_size, gating, top_k, **filters).perplexity
