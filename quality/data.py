"""Evaluation text: named data sets in the shared data folder, or a user's text file, cut into token windows."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moesim.errors import MoesimError

# quality/ sits at the repository root, and the shared data folder sits beside the repository.
REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR_ENV = "MOESIM_DATA_DIR"

# Named data sets, relative to the shared data folder.
NAMED_TEXTS = {
    "wikitext-2": "wikitext-2/test.txt",
    "wikitext-2-test": "wikitext-2/test.txt",
    "wikitext-2-valid": "wikitext-2/valid.txt",
}


def shared_data_dir() -> Path:
    """``$MOESIM_DATA_DIR`` if set, else ``../shared/data`` relative to the repository."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@dataclass(frozen=True)
class EvalText:
    name: str  # the data set name, or the file path as given
    path: Path
    sha256: str
    text: str


def resolve_text_path(data: str | os.PathLike, flag: str = "--data") -> Path:
    key = str(data)
    if key in NAMED_TEXTS:
        path = shared_data_dir() / NAMED_TEXTS[key]
        if not path.is_file():
            raise MoesimError(
                f"{flag} {key}: expected the file {path} (set ${DATA_DIR_ENV} to the folder holding wikitext-2/)"
            )
        return path
    path = Path(key)
    if not path.is_file():
        names = ", ".join(sorted(NAMED_TEXTS))
        raise MoesimError(f"{flag} {key}: no such text file, and not a named data set ({names})")
    return path


def load_eval_text(data: str | os.PathLike, flag: str = "--data") -> EvalText:
    path = resolve_text_path(data, flag)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MoesimError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if not text.strip():
        raise MoesimError(f"{path}: the text file is empty")
    return EvalText(name=str(data), path=path, sha256=hashlib.sha256(raw).hexdigest(), text=text)


def tokenize_text(tokenizer, text: str) -> np.ndarray:
    """Token ids of the whole text as one stream (special tokens as the tokenizer adds them once, e.g. a BOS)."""
    ids = tokenizer(text, add_special_tokens=True, return_attention_mask=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def token_windows(ids: np.ndarray, seq_len: int, max_tokens: int | None = None) -> np.ndarray:
    """Non-overlapping windows [n, seq_len] from the start of the stream; a short tail is dropped.

    ``max_tokens`` bounds the tokens used (whole windows only), so a quick run scores a prefix.
    """
    if seq_len < 2:
        raise MoesimError(f"--seq-len {seq_len}: expected at least 2 (one token of context, one to predict)")
    usable = len(ids) if max_tokens is None else min(len(ids), int(max_tokens))
    n = usable // seq_len
    if n == 0:
        raise MoesimError(
            f"the text has {len(ids)} tokens{'' if max_tokens is None else f' (--max-tokens {max_tokens})'}, "
            f"fewer than one window of --seq-len {seq_len}"
        )
    return np.ascontiguousarray(ids[: n * seq_len].reshape(n, seq_len))
