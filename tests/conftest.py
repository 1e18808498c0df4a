from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from moesim.modelspec import ModelShape
from moesim.tracer import DECODE, PREFILL, TraceCells, TraceMeta, TraceSource

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
# Tests run on CPU; MOESIM_TEST_DEVICE=cuda repeats the device-dependent ones (engine, validate, calib) on a GPU.
TEST_DEVICE = os.environ.get("MOESIM_TEST_DEVICE", "cpu")
# The on-disk cache (moesim/diskcache.py) of each test process goes to a fresh folder, never ~/.cache.
os.environ["MOESIM_CACHE_DIR"] = tempfile.mkdtemp(prefix="moesim-test-cache-")


def tiny_shape(num_layers: int = 3, num_experts: int = 8, top_k: int = 2) -> ModelShape:
    return ModelShape(
        model_id="tiny", architecture="mixtral", num_model_layers=num_layers,
        moe_layer_ids=tuple(range(num_layers)), num_experts=num_experts, top_k=top_k, hidden_size=64,
        expert_intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        vocab_size=100, expert_params=3 * 64 * 128, non_expert_params=50_000,
        kv_bytes_per_token_per_layer_fp16=2 * 2 * 16 * 2,
    )


def tiny_meta(shape: ModelShape | None = None, **kw) -> TraceMeta:
    shape = shape or tiny_shape()
    return TraceMeta(
        model=shape, dtype="bfloat16", expert_bytes=tuple([shape.expert_params * 2] * shape.num_moe_layers),
        non_expert_bytes=shape.non_expert_params * 2,
        source=TraceSource(kind="synthetic", path="", sha256=""), **kw,
    )


def random_cells(rng: np.random.Generator, requests=2, prompt=4, decode=3, layers=3, experts=8, k=2) -> TraceCells:
    rows = []
    for r in range(requests):
        for pos in range(prompt):
            for layer in range(layers):
                rows.append((r, PREFILL, pos, layer))
        for pos in range(prompt, prompt + decode):
            for layer in range(layers):
                rows.append((r, DECODE, pos, layer))
    arr = np.array(rows)
    n = len(arr)
    ex = np.stack([rng.choice(experts, size=k, replace=False) for _ in range(n)]).astype(np.int16)
    w = rng.random((n, k)).astype(np.float32)
    w = -np.sort(-w, axis=1)
    return TraceCells(request=arr[:, 0].astype(np.int32), phase=arr[:, 1].astype(np.uint8),
                      position=arr[:, 2].astype(np.int32), layer=arr[:, 3].astype(np.int16), experts=ex, weights=w)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
