"""Shared helpers for the simulator tests: a hardware profile with round numbers (built with the real
profile classes) and tiny hand-written traces whose timings can be computed by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_meta, tiny_shape
from moesim.calib.profile import (
    CopyModel,
    DeviceInfo,
    ExpertKernelModel,
    HardwareProfile,
    HostInfo,
    RooflineModel,
    copy_key,
)
from moesim.tracer import DECODE, PREFILL, Trace, TraceCells, write_trace

FAST = 1e30  # a rate so high that the roofline term is negligible: the time is the model's latency


def _const(seconds: float) -> RooflineModel:
    return RooflineModel(latency_s=seconds, flops_per_s=FAST, bytes_per_s=FAST, ranges=(), extrapolation="roofline")


def round_profile(h2d_bytes_per_s: float = 1e9, d2h_bytes_per_s: float = 1e9, expert_s: float = 1e-3,
                  cpu_expert_s: float = 4e-3, non_expert_s: float = 2e-3, head_s: float = 0.0,
                  layer_overhead_s: float = 0.0, step_overhead_s: float = 0.0, memory_bytes: int = 1 << 34,
                  reserve_bytes: int = 0, pageable_factor: float = 2.0) -> HardwareProfile:
    """Every expert FFN takes ``expert_s`` whatever its token count; copies are bytes / bandwidth."""
    copies = {}
    for direction, bw in (("h2d", h2d_bytes_per_s), ("d2h", d2h_bytes_per_s)):
        for pinned in (True, False):
            for concurrent in (False, True):
                rate = bw if pinned else bw / pageable_factor
                copies[copy_key(direction, pinned, concurrent)] = CopyModel(latency_s=0.0, bytes_per_s=rate)
    return HardwareProfile(
        name="round", derived_from_specs=False,
        device=DeviceInfo("test GPU", "cuda", memory_bytes), host=HostInfo("test CPU", 8, 1 << 36),
        runtime_reserve_bytes=reserve_bytes, cpu_threads=8,
        expert_models={k: ExpertKernelModel(k, "test", 16.0, _const(expert_s)) for k in ("bf16", "int8", "int4")},
        cpu_expert_models={"bf16": {8: ExpertKernelModel("bf16", "test", 16.0, _const(cpu_expert_s))}},
        copy_models=copies,
        non_expert_models={"bf16": {"prefill": _const(non_expert_s), "decode": _const(non_expert_s)}},
        head_model=_const(head_s), layer_overhead_s=layer_overhead_s, step_overhead_s=step_overhead_s,
    )


def write_tiny_trace(path: Path, tokens: list[list[list[int]]], prompt: int = 1, num_experts: int = 4,
                     top_k: int = 1, weights: list[list[list[float]]] | None = None,
                     guesses: list[list[list[int]]] | None = None, requests: int = 1) -> Path:
    """``tokens[t][layer]`` = the experts of token t at that layer; the first ``prompt`` tokens are the prompt.
    Every request gets the same tokens."""
    num_layers = len(tokens[0])
    shape = tiny_shape(num_layers=num_layers, num_experts=num_experts, top_k=top_k)
    rows = []
    for r in range(requests):
        for t, layers in enumerate(tokens):
            for layer, experts in enumerate(layers):
                w = weights[t][layer] if weights else [1.0 / top_k] * top_k
                g = guesses[t][layer] if guesses else [-1] * top_k
                rows.append((r, PREFILL if t < prompt else DECODE, t, layer, experts, w, g))
    cells = TraceCells(
        request=np.array([x[0] for x in rows], np.int32), phase=np.array([x[1] for x in rows], np.uint8),
        position=np.array([x[2] for x in rows], np.int32), layer=np.array([x[3] for x in rows], np.int16),
        experts=np.array([x[4] for x in rows], np.int16), weights=np.array([x[5] for x in rows], np.float32),
        next_layer_guess=np.array([x[6] for x in rows], np.int16) if guesses else None,
    )
    return write_trace(path, tiny_meta(shape), cells)


def replay_path_of(trace, profile, config) -> str:
    """Which replay a default ``simulate`` of ``config`` takes: "compiled", "engine: <why>" or "does not fit"."""
    from moesim.simulator.run import build_policy_objects, load_trace_cached, prepare, replay_path

    if not isinstance(trace, Trace):
        trace = load_trace_cached(str(trace))
    prep = prepare(trace, profile, config)
    return replay_path(prep, build_policy_objects(prep)) if prep.plan.fits else "does not fit"


EXPERT_BYTES = tiny_shape().expert_params * 2  # bf16 bytes of one tiny expert (49152)


def test_round_profile_answers_the_contract_with_round_numbers():
    p = round_profile(h2d_bytes_per_s=1e9, expert_s=1e-3)
    shape = tiny_shape()
    assert p.copy_time(1e6, "h2d") == pytest.approx(1e-3)
    assert p.copy_time(1e6, "h2d", pinned=False) == pytest.approx(2e-3)
    assert p.expert_time(shape, 1) == pytest.approx(1e-3, rel=1e-9)
    assert p.expert_time(shape, 0) == 0.0
    assert p.non_expert_time(shape, "decode", 1, 10, 1) == pytest.approx(2e-3, rel=1e-9)


def test_tiny_trace_roundtrips(tmp_path):
    from moesim.tracer import read_trace

    path = write_tiny_trace(tmp_path / "t.parquet", [[[0], [1]], [[2], [3]]], prompt=1)
    tr = read_trace(path)
    assert tr.meta.num_layers == 2 and len(tr) == 4
    assert tr.experts[:, 0].tolist() == [0, 1, 2, 3]
