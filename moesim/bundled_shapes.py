"""Shapes of the bundled model configs, precomputed so listing profiles or sizing a bundled model does not
import torch and transformers (seconds).

They live in ``bundled_shapes.json`` beside this file; each entry holds the SHA-256 of its config file, so an
edited config is derived again. ``python -m moesim.bundled_shapes`` rewrites the file from a fresh
derivation; a test checks every entry against one.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

SHAPES_FILE = Path(__file__).with_name("bundled_shapes.json")


@lru_cache(maxsize=1)
def shapes() -> dict[str, dict]:
    return json.loads(SHAPES_FILE.read_text())


def derive() -> str:
    import hashlib

    from moesim.modelspec import bundled_model_configs, load_hf_config, shape_from_config

    fresh = {}
    for name, path in sorted(bundled_model_configs().items()):
        shape = shape_from_config(load_hf_config(name), model_id=name)
        fresh[name] = {"config_sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "shape": shape.to_dict()}
    return json.dumps(fresh, indent=1, sort_keys=True) + "\n"


if __name__ == "__main__":
    from moesim.atomic import write_text_atomic

    write_text_atomic(SHAPES_FILE, derive())
    print(f"wrote {SHAPES_FILE}")
