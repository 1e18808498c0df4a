"""Prompt files for `moesim trace`: JSON Lines, one object a line, the prompt text in one field.

The field is ``--field NAME`` or, by default, the first of :data:`DEFAULT_FIELDS` that the first record
has; every record must then have that field as a non-empty string. Blank lines are skipped. Errors name
the file, the line number and the field.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from moesim.errors import MoesimError
from moesim.tracer.format import sha256_of_file

DEFAULT_FIELDS = ("prompt", "question", "text", "instruction")


@dataclass(frozen=True)
class Prompt:
    index: int  # request index in the trace (0-based, in file order)
    line_number: int  # 1-based line in the prompts file
    text: str


@dataclass(frozen=True)
class PromptSet:
    path: Path
    sha256: str  # of the whole file, whatever --limit selected
    field: str
    prompts: tuple[Prompt, ...]

    def __len__(self) -> int:
        return len(self.prompts)


def load_prompts(path: str | os.PathLike, field: Optional[str] = None, limit: Optional[int] = None) -> PromptSet:
    """Read the first ``limit`` prompts (all when None) of a JSONL file, or raise a one-line MoesimError."""
    path = Path(path)
    if limit is not None and limit < 1:
        raise MoesimError(f"--limit {limit}: expected a positive number of prompts")
    if not path.exists():
        raise MoesimError(f"{path}: prompts file not found")
    if path.is_dir():
        raise MoesimError(f"{path}: is a folder, expected a JSONL prompts file")
    from moesim.atomic import note_input

    note_input(path)
    chosen = field
    prompts: list[Prompt] = []
    try:
        with open(path, "rb") as f:
            for line_number, raw in enumerate(f, start=1):
                if limit is not None and len(prompts) >= limit:
                    break
                try:
                    line = raw.decode("utf-8").strip()
                except UnicodeDecodeError:
                    raise MoesimError(f"{path}: line {line_number} is not UTF-8 text") from None
                if not line:
                    continue
                record = _parse_record(path, line_number, line)
                if chosen is None:
                    chosen = _default_field(path, line_number, record)
                prompts.append(Prompt(len(prompts), line_number, _prompt_text(path, line_number, record, chosen)))
    except OSError as exc:
        raise MoesimError(f"{path}: cannot read the prompts file ({exc.strerror or exc})") from None
    if not prompts:
        raise MoesimError(f"{path}: prompts file is empty, expected one JSON object a line")
    assert chosen is not None
    return PromptSet(path=path, sha256=sha256_of_file(path), field=chosen, prompts=tuple(prompts))


def _parse_record(path: Path, line_number: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise MoesimError(f"{path}: line {line_number} is not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise MoesimError(f"{path}: line {line_number} is a JSON {type(record).__name__}, expected an object")
    return record


def _default_field(path: Path, line_number: int, record: dict) -> str:
    for name in DEFAULT_FIELDS:
        if name in record:
            return name
    raise MoesimError(
        f"{path}: line {line_number} has none of the fields {', '.join(DEFAULT_FIELDS)}; "
        f"name the prompt field with --field"
    )


def _prompt_text(path: Path, line_number: int, record: dict, field: str) -> str:
    if field not in record:
        raise MoesimError(f"{path}: line {line_number} has no field '{field}'")
    text = record[field]
    if not isinstance(text, str) or not text.strip():
        raise MoesimError(f"{path}: line {line_number} field '{field}' is not a non-empty string")
    return text
