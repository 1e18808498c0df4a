"""The offloading engine's parts: kernels, lanes, trace fitting, and outputs that do not depend on the policy."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from conftest import TEST_DEVICE, random_cells, tiny_meta, tiny_shape
from moesim.calib.kernels import ExpertFFN
from moesim.engine.kernels import ExpertFormat, pack_expert
from moesim.engine.lanes import Lane, Marker
from moesim.engine.shapes import fit_trace
from moesim.engine.store import BufferPool, copy_expert, new_bounce
from moesim.errors import MoesimError
from moesim.tracer import Trace, write_trace

TINY_CONFIG = dict(model_type="mixtral", hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=96, num_local_experts=8,
                   num_experts_per_tok=2, max_position_embeddings=256, tie_word_embeddings=False)


@pytest.mark.parametrize("kernel, mode", [("bf16", "pack"), ("int8", "pack"), ("int8", "int_mm"), ("int4", "pack")])
def test_packed_expert_runs_calibrations_kernel_and_survives_a_copy(kernel, mode):
    """A slot filled by copy_expert computes what calibration's ExpertFFN computes with the same weights."""
    device = torch.device(TEST_DEVICE)
    ref = ExpertFFN(128, 256, kernel, device, torch.bfloat16, seed=5, int8_mode=mode)
    g = torch.Generator().manual_seed(5)
    gate_up = torch.randn(512, 128, generator=g) * 128 ** -0.5
    down = torch.randn(128, 256, generator=g) * 256 ** -0.5
    fmt = ExpertFormat(kernel, mode)
    host = pack_expert(gate_up.to(device), down.to(device), fmt, torch.bfloat16)
    slot = host.empty_like(device)
    assert copy_expert(slot, host, pinned=False, bounce=new_bounce()) == host.nbytes
    x = torch.randn(3, 128, generator=g).to(device, torch.bfloat16)
    y = slot.forward(x).float()
    y_ref = ref(x).float()
    assert torch.allclose(y, y_ref, rtol=2e-2, atol=2e-2), (y - y_ref).abs().max()
    expected_bits = {"bf16": 16.0, "int8": 8.0, "int4": 4.25}[kernel]
    params = 3 * 128 * 256
    assert host.nbytes == pytest.approx(params * expected_bits / 8, rel=0.04)


def test_host_store_keeps_every_expert_in_one_slab():
    from moesim.engine.store import build_host_store

    store = build_host_store(2, 4, 128, 256, ExpertFormat("bf16"), torch.device("cpu"), torch.bfloat16, pinned=True)
    assert len(store.experts) == 8 and store.slab.how == "pageable"  # no CUDA here: nothing to pin
    ptrs = sorted(t.data_ptr() for e in store.experts.values() for t in e.tensors)
    assert len(set(ptrs)) == 16  # every expert has its own memory
    base = store.slab.tensor.data_ptr()
    assert all(base <= p < base + store.slab.tensor.numel() for p in ptrs)
    # synthetic experts cycle through a few random ones; distinct keys hold equal or different values
    a, b = store[0].tensors[0], store[1].tensors[0]
    assert not torch.equal(a, b) and torch.equal(store[0].tensors[0], store[4].tensors[0])
    assert store.with_pinning(False, cuda=False).experts is store.experts


def test_int4_needs_its_group_size():
    with pytest.raises(MoesimError, match="--expert-format int4: cannot pack"):
        pack_expert(torch.randn(128, 64), torch.randn(64, 64), ExpertFormat("int4"), torch.bfloat16)
    with pytest.raises(MoesimError, match="--expert-format 'int3'"):
        ExpertFormat("int3")


def test_lane_serves_demand_before_queued_prefetches_and_promotes():
    lane = Lane("test", torch.device("cpu"))
    order: list[str] = []
    gate = threading.Event()

    def work(name, block=False):
        def run(job, stream):
            if block:
                gate.wait(5)
            order.append(name)
        return run

    first = lane.submit(work("first", block=True), 1, "first")
    time.sleep(0.05)  # the worker is now inside "first"; the rest queue behind it
    b1 = lane.submit(work("bg1"), 1, "bg1", background=True)
    b2 = lane.submit(work("bg2"), 1, "bg2", background=True)
    lane.submit(work("demand"), 1, "demand")
    lane.promote(b2)
    gate.set()
    for job in (first, b1, b2):
        job.done.wait_done()
    lane.drain()
    assert order == ["first", "demand", "bg2", "bg1"]
    assert lane.jobs == 4 and lane.bytes == 4
    lane.close()


def test_buffer_pool_reuse_waits_for_the_last_reader():
    """A copy into a buffer whose previous expert is still to be computed waits for that compute."""
    from moesim.engine.kernels import ExpertTensors

    t = ExpertTensors(ExpertFormat("bf16"), (torch.zeros(8, 4), torch.zeros(4, 4)), 4)
    pool = BufferPool(t, 1, torch.device("cpu"))
    b = pool.take(lambda: False)
    reader = Marker(False, "reader")
    b.last_use = reader
    pool.release(b)
    lane = Lane("copy", torch.device("cpu"))
    events: list[str] = []
    fence = pool.take(lambda: False).last_use
    job = lane.submit(lambda j, s: (fence.make_stream_wait(s), events.append("copy")), 1, "copy")
    time.sleep(0.05)
    events.append("compute")
    reader.record()
    job.done.wait_done()
    assert events == ["compute", "copy"]
    lane.close()


def _trace(layers=4, experts=16, k=4, requests=2, prompt=5, decode=6, guess=True) -> Trace:
    shape = tiny_shape(num_layers=layers, num_experts=experts, top_k=k)
    cells = random_cells(np.random.default_rng(3), requests=requests, prompt=prompt, decode=decode, layers=layers,
                         experts=experts, k=k)
    if guess:
        cells.next_layer_guess = np.where(cells.layer[:, None] < layers - 1, np.roll(cells.experts, 1, axis=1),
                                          -1).astype(np.int16)
    cells = cells.take(cells.execution_order())
    return Trace(tiny_meta(shape), cells)


def test_fit_trace_identity_cuts_requests_and_decode_tokens():
    trace = _trace(layers=3, experts=8, k=2)
    shape = tiny_shape(3, 8, 2)
    fitted, fit = fit_trace(trace, shape, 1234, "bfloat16", 999, requests=1, decode_tokens=2)
    assert not fit.remapped and fit.requests == 1 and fit.decode_tokens == (2,) and fit.prompt_tokens == (5,)
    assert fitted.meta.expert_bytes == (1234,) * 3 and fitted.meta.non_expert_bytes == 999
    assert set(np.unique(fitted.cells.request)) == {0}
    np.testing.assert_array_equal(fitted.cells.experts, trace.cells.experts[: len(fitted)])


def test_fit_trace_remaps_layers_experts_and_top_k(tmp_path):
    trace = _trace(layers=4, experts=16, k=4)
    narrow = tiny_shape(2, 6, 2)
    fitted, fit = fit_trace(trace, narrow, 10, "int8", 5)
    assert fit.remapped and "first 2 of 4" in fit.layer_map and "mod 6" in fit.expert_map
    ex = fitted.cells.experts
    assert ex.shape[1] == 2 and ex.min() >= 0 and ex.max() < 6
    assert all(len(set(row)) == 2 for row in ex.tolist())  # distinct experts per token
    guess = fitted.cells.next_layer_guess
    assert (guess[fitted.cells.layer == 1] == -1).all()  # no next layer after the model's last
    # the first kept expert of a row is its first trace expert mod 6
    src = trace.cells.experts[trace.cells.layer < 2]
    assert (ex[:, 0] == src[:, 0] % 6).all()
    deep = tiny_shape(6, 16, 4)
    fitted2, fit2 = fit_trace(trace, deep, 10, "bfloat16", 5)
    assert "l mod 4" in fit2.layer_map and fitted2.meta.num_layers == 6
    l4 = fitted2.cells.layer == 4
    np.testing.assert_array_equal(fitted2.cells.experts[l4], trace.cells.experts[trace.cells.layer == 0])
    g = fitted2.cells.next_layer_guess
    assert (g[fitted2.cells.layer == 3] == -1).all() and (g[fitted2.cells.layer == 2] >= 0).all()
    # a fitted trace is an ordinary trace: it writes and reads back
    from moesim.tracer import read_trace

    back = read_trace(write_trace(tmp_path / "fit.parquet", fitted.meta, fitted.cells))
    np.testing.assert_array_equal(back.cells.experts, fitted.cells.experts)
    assert back.meta.source.format == "moesim-validate-fit" and back.meta.source.details["layers"] == 2
    with pytest.raises(MoesimError, match="--decode-tokens -1"):
        fit_trace(trace, narrow, 10, "int8", 5, decode_tokens=-1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Mixtral checkpoint with random weights, saved as Hugging Face files."""
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("ckpt")
    cfg = AutoConfig.for_model(**TINY_CONFIG)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, p.shape[-1] ** -0.5)
    model.save_pretrained(root)
    trace = _trace(layers=3, experts=8, k=2, requests=2, prompt=6, decode=5)
    shape = tiny_shape(3, 8, 2)
    path = write_trace(root / "trace.parquet", tiny_meta(shape), trace.cells)
    return root, path


def test_checkpoint_outputs_do_not_depend_on_the_policy(checkpoint, tmp_path):
    """Real weights, forced routing: every policy computes the same logits as all experts resident, so no
    buffer is ever overwritten before its expert was computed (streaming prefill through 1 slot included)."""
    from moesim.engine.validate import ValidateOptions, Validator

    root, trace_path = checkpoint
    v = Validator(ValidateOptions(trace=str(trace_path), model=str(root), cache_experts=1, device=TEST_DEVICE,
                                  profile="rtx-3060", requests=None, decode_tokens=None, warmup_steps=1,
                                  out=tmp_path))
    assert v.engine.store.source == str(root)
    v.engine.record_outputs = True
    from moesim.simulator.gating import GatingSpec
    from moesim.simulator.presets import get_preset

    policies = ("all-gpu", "lru", "mixtral-offloading", "static", "fiddler", "hybrimoe", "accelerate", "moe-infinity",
                "mixtral-offloading-paper", "belady", "llama-cpp")
    measured = {p: v.measure(p) for p in policies}
    outputs = {p: torch.stack(m.stats.outputs) for p, m in measured.items()}
    # llama.cpp's layers whose experts live on the host: one slot per layer holds no whole layer, so every
    # expert runs on the CPU, none is copied and the device holds no expert buffer at all
    cpu_moe = measured["llama-cpp"].stats
    assert cpu_moe.decode_cpu == sum(cpu_moe.decode_accesses) > 0 and sum(cpu_moe.decode_hits) == 0
    assert cpu_moe.cpu_expert_times and not cpu_moe.copy_times and cpu_moe.h2d_bytes < 1e5
    assert v.engine._pool.count == 0
    ref = outputs.pop("all-gpu")
    assert ref.shape[0] == 2 * (1 + 5)
    # AdapMoE's gating skips experts, so it is compared with every expert resident under the same gating
    gated = get_preset("all-gpu").with_parts(gating=GatingSpec("adapmoe"))
    gated_ref = torch.stack(v.measure(gated).stats.outputs)
    adap = torch.stack(v.measure("adapmoe").stats.outputs)
    assert not torch.allclose(gated_ref, ref, atol=1e-3)
    for policy, out, expected in [(p, o, ref) for p, o in outputs.items()] + [("adapmoe", adap, gated_ref)]:
        # bf16 sums in another order (CPU experts are added last) differ by a few roundings; a wrong or
        # half-overwritten expert would change logits by O(1)
        diff = (out - expected).abs()
        assert diff.max() < 0.15 and diff.mean() < 0.012, (policy, diff.max(), diff.mean())
    # the experts matter: without them the logits differ
    model = v.engine.model
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        # outside a run the hook adds nothing
        bare = model(input_ids=ids.to(model.device), logits_to_keep=1).logits.cpu()
        from transformers import AutoModelForCausalLM

        real = AutoModelForCausalLM.from_pretrained(root, dtype=torch.bfloat16)(input_ids=ids, logits_to_keep=1).logits
    assert not torch.allclose(bare, real, atol=1e-3)


def test_slow_copies_never_let_an_expert_compute_before_its_weights_land(checkpoint, tmp_path, monkeypatch):
    """The copy thread sleeps before every copy, so prefetches are still landing when their layer runs. A
    prefetched hit evicted by its own layer's misses (1 slot, top-2) once computed on half-copied weights."""
    import random

    import moesim.engine.runner as runner
    from moesim.engine.validate import ValidateOptions, Validator

    root, trace_path = checkpoint
    v = Validator(ValidateOptions(trace=str(trace_path), model=str(root), cache_experts=1, device=TEST_DEVICE,
                                  profile="rtx-3060", requests=None, decode_tokens=None, warmup_steps=1,
                                  out=tmp_path))
    v.engine.record_outputs = True
    ref = torch.stack(v.measure("all-gpu").stats.outputs)
    copy, rng = runner.copy_expert, random.Random(1)

    def slow_copy(dst, src, pinned, bounce):
        if threading.current_thread() is not threading.main_thread():
            time.sleep(rng.random() * 0.004)
        return copy(dst, src, pinned, bounce)

    monkeypatch.setattr(runner, "copy_expert", slow_copy)
    for policy in ("mixtral-offloading-paper", "lru", "moe-infinity"):
        diff = (torch.stack(v.measure(policy).stats.outputs) - ref).abs()
        assert diff.max() < 0.15, (policy, diff.max())
