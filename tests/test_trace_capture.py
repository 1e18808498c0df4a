"""Recording routing from real (tiny, random-weight) Hugging Face MoE models of six families.

(OLMoE's router is the same code as Qwen3-MoE's, so it is not built separately.)

Each family's model is built from its transformers config, saved with a locally trained byte-level BPE
tokenizer, loaded back through ``load_model`` and traced on GSM8K questions. The rows are then checked
against what transformers itself reports: ``generate`` without hooks (tokens and counts), a full-sequence
forward with ``output_router_logits=True`` (experts and applied weights, recomputed per family from the
logits), and the next MoE layer's router applied to this layer's router input (next_layer_guess).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED
from moesim.errors import MoesimError
from moesim.modelspec import shape_from_config
from moesim.tracer import DECODE, PREFILL, read_trace
from moesim.tracer.capture import GenerationSettings, load_model, trace_prompts
from moesim.tracer.prompts import load_prompts

GSM8K = SHARED / "data" / "gsm8k" / "test.jsonl"
# The family checks run on CPU; MOESIM_TEST_DEVICE=cuda repeats them on a GPU.
DEVICE = os.environ.get("MOESIM_TEST_DEVICE", "cpu")
NEW_TOKENS = 6
PROMPTS = 2
NEAR_TIE = 1e-4  # score gap under which a full-sequence forward and a KV-cached step may rank differently

COMMON = dict(vocab_size=448, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              head_dim=12, max_position_embeddings=512, bos_token_id=0, eos_token_id=1, pad_token_id=2)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread, and shared CI cores then do not oversubscribe."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@dataclass(frozen=True)
class Family:
    model_type: str
    config: dict
    router_attr: str  # the router's attribute in the MoE block
    moe_layers: tuple[int, ...]  # decoder layers that have routed experts
    block_attr: str = "mlp"  # the MoE block's attribute in the decoder layer


FAMILIES = {
    "mixtral": Family("mixtral", dict(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2), "gate",
                      (0, 1, 2)),
    # A dense decoder layer in the middle: MoE layer 0's next layer is decoder layer 2.
    "qwen2_moe": Family("qwen2_moe", dict(intermediate_size=64, moe_intermediate_size=24, num_experts=8,
                                          shared_expert_intermediate_size=32, num_experts_per_tok=2,
                                          decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=False),
                        "gate", (0, 2)),
    "qwen3_moe": Family("qwen3_moe", dict(intermediate_size=64, moe_intermediate_size=24, num_experts=8,
                                          num_experts_per_tok=3, norm_topk_prob=True), "gate", (0, 1, 2)),
    # topk(sorted=False) and a routed scaling factor; first layer dense.
    "deepseek_v2": Family("deepseek_v2", dict(intermediate_size=64, moe_intermediate_size=24, n_routed_experts=8,
                                              n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                                              kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                                              qk_nope_head_dim=8, v_head_dim=16, topk_method="greedy", n_group=1,
                                              topk_group=1, routed_scaling_factor=1.5), "gate", (1, 2)),
    # Router with a bias; softmax over the top-k logits.
    "gpt_oss": Family("gpt_oss", dict(intermediate_size=24, num_local_experts=8, num_experts_per_tok=2,
                                      sliding_window=16), "router", (0, 1, 2)),
    # Router returns (dense sigmoid scores, logits): read through the llama4 adapter. MoE every 2nd layer.
    "llama4_text": Family("llama4_text", dict(num_hidden_layers=4, intermediate_size=24, intermediate_size_mlp=64,
                                              num_local_experts=8, num_experts_per_tok=1,
                                              interleave_moe_layer_step=2), "router", (1, 3), "feed_forward"),
}


def expected_routing(model_type: str, logits: torch.Tensor, config, k: int) -> torch.Tensor:
    """Dense [N, E] applied weights (0 for unrouted experts), recomputed from router logits per family."""
    logits = logits.float()
    if model_type == "llama4_text":
        top = torch.topk(logits, k, dim=-1)
        return torch.zeros_like(logits).scatter(-1, top.indices, torch.sigmoid(top.values))
    if model_type == "gpt_oss":
        top = torch.topk(logits, k, dim=-1)
        return torch.zeros_like(logits).scatter(-1, top.indices, torch.softmax(top.values, dim=-1))
    probs = torch.softmax(logits, dim=-1)
    top = torch.topk(probs, k, dim=-1)
    values = top.values
    if model_type == "mixtral" or getattr(config, "norm_topk_prob", False):
        values = values / values.sum(-1, keepdim=True)
    if model_type == "deepseek_v2":
        values = values * config.routed_scaling_factor
    return torch.zeros_like(logits).scatter(-1, top.indices, values)


def selection_scores(model_type: str, logits: torch.Tensor) -> torch.Tensor:
    """The scores each family ranks experts by (to find near-ties)."""
    return logits.float() if model_type in ("gpt_oss", "llama4_text") else torch.softmax(logits.float(), dim=-1)


def clear_topk_margin(scores: torch.Tensor, k: int) -> np.ndarray:
    top = torch.topk(scores, k + 1, dim=-1).values
    return ((top[:, k - 1] - top[:, k]) > NEAR_TIE).numpy()


# Building models ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def trained_bpe(vocab_size: int = 440):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    lines = [json.loads(line)["question"] for line in GSM8K.read_text().splitlines()[:300]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return bpe.to_str()


def build_tokenizer(vocab_size: int = 440):
    """A byte-level BPE trained on GSM8K questions, as a transformers fast tokenizer (no hub)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer.from_str(trained_bpe(vocab_size))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_model_folder(folder: Path, family: Family, seed: int = 0, chat_template: str | None = None) -> Path:
    """Random-weight model of ``family`` + local tokenizer, saved the way a hub checkout looks."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family.model_type, **{**COMMON, **family.config})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for decoder_idx in family.moe_layers:
            router = getattr(getattr(model.model.layers[decoder_idx], family.block_attr), family.router_attr)
            # Decisive routing (logits of order 1) instead of the near-uniform default initialisation.
            router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * 0.3)
    model.save_pretrained(folder)
    tokenizer = build_tokenizer()
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    return folder


@dataclass
class Traced:
    family: Family
    folder: Path
    loaded: object
    trace: object
    prompt_ids: list  # token ids per request
    sequences: list  # prompt + generated ids per request, from a plain generate() without hooks


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def traced(request, tmp_path_factory) -> Traced:
    family = FAMILIES[request.param]
    folder = build_model_folder(tmp_path_factory.mktemp(family.model_type), family)
    loaded = load_model(str(folder), device=DEVICE)
    prompts = load_prompts(GSM8K, limit=PROMPTS)
    out = folder.parent / "trace.parquet"
    summary = trace_prompts(loaded, prompts, GenerationSettings(max_new_tokens=NEW_TOKENS), out, progress=False)
    assert summary.complete and summary.requests == PROMPTS
    prompt_ids, sequences = [], []
    for p in prompts.prompts:
        ids = loaded.tokenizer(p.text)["input_ids"]
        x = torch.tensor([ids], device=loaded.model.device)
        with torch.no_grad():
            seq = loaded.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                                        do_sample=False)[0]
        prompt_ids.append(ids)
        sequences.append(seq.cpu().numpy())
    return Traced(family, folder, loaded, read_trace(out), prompt_ids, sequences)


def request_rows(trace, r: int):
    return trace.select(trace.request == r)


# Tests ------------------------------------------------------------------------------------------------
def test_meta_describes_the_loaded_model(traced: Traced):
    from transformers import AutoConfig

    meta = traced.trace.meta
    config = AutoConfig.from_pretrained(traced.folder)
    shape = shape_from_config(config, model_id=str(traced.folder))
    assert meta.model == shape
    assert meta.model.moe_layer_ids == traced.family.moe_layers
    assert meta.dtype == "float32"
    assert meta.expert_bytes == tuple([shape.expert_params * 4] * shape.num_moe_layers)
    assert meta.non_expert_bytes == shape.non_expert_params * 4
    assert meta.source.kind == "prompts"
    assert meta.source.path == str(GSM8K)
    assert meta.source.sha256 == hashlib.sha256(GSM8K.read_bytes()).hexdigest()
    assert meta.source.details["max_new_tokens"] == NEW_TOKENS
    assert meta.source.details["do_sample"] is False
    assert meta.source.details["field"] == "question"
    assert traced.trace.complete


def test_rows_cover_exactly_the_forwards_that_ran(traced: Traced):
    """Prefill: P x L rows at positions 0..P-1; decode: (G-1) x L rows at P..P+G-2 (the last token is not fed)."""
    L = traced.trace.meta.num_layers
    assert traced.trace.num_requests == PROMPTS
    for r, (ids, seq) in enumerate(zip(traced.prompt_ids, traced.sequences)):
        rows = request_rows(traced.trace, r)
        P, G = len(ids), len(seq) - len(ids)
        assert G >= 1
        prefill, decode = rows.phase == PREFILL, rows.phase == DECODE
        assert prefill.sum() == P * L
        assert decode.sum() == (G - 1) * L
        assert sorted(set(rows.position[prefill].tolist())) == list(range(P))
        assert sorted(set(rows.position[decode].tolist())) == list(range(P, P + G - 1))
        for layer in range(L):
            at = rows.layer == layer
            order = np.argsort(rows.position[at], kind="stable")
            # Same tokens as a plain generate() without hooks: recording does not change generation.
            np.testing.assert_array_equal(rows.token_id[at][order], seq[: P + G - 1])


def test_experts_and_weights_match_the_routers_own_logits(traced: Traced):
    model, config = traced.loaded.model, traced.loaded.model.config
    meta = traced.trace.meta
    k, L = meta.top_k, meta.num_layers
    compared = near_ties = 0
    for r, (ids, seq) in enumerate(zip(traced.prompt_ids, traced.sequences)):
        fed = torch.from_numpy(seq[None, : len(seq) - 1]).to(model.device)
        with torch.no_grad():
            router_logits = [t.cpu() for t in model(fed, output_router_logits=True).router_logits]
        assert len(router_logits) == L
        rows = request_rows(traced.trace, r)
        for layer in range(L):
            at = np.flatnonzero(rows.layer == layer)
            at = at[np.argsort(rows.position[at], kind="stable")]
            experts, weights = rows.experts[at].astype(np.int64), rows.weights[at]
            logits = router_logits[layer].reshape(-1, router_logits[layer].shape[-1])
            dense = expected_routing(traced.family.model_type, logits, config, k).numpy()
            clear = clear_topk_margin(selection_scores(traced.family.model_type, logits), k)
            near_ties += int((~clear).sum())
            compared += int(clear.sum())
            assert np.all(np.diff(weights, axis=1) <= 1e-7), "experts are not in rank (descending weight) order"
            assert (experts >= 0).all() and (experts < meta.num_experts).all()
            assert all(len(set(row)) == k for row in experts.tolist())
            got = np.take_along_axis(dense[clear], experts[clear], axis=1)
            np.testing.assert_allclose(weights[clear], got, rtol=1e-4, atol=1e-5)
            # Every routed weight is accounted for: the recorded experts are exactly the router's top-k.
            np.testing.assert_allclose(weights[clear].sum(1), dense[clear].sum(1), rtol=1e-4, atol=1e-5)
    assert compared > 0 and near_ties <= 0.05 * (compared + near_ties)


def test_next_layer_guess_is_next_routers_topk_on_this_layers_input(traced: Traced):
    family, model, config = traced.family, traced.loaded.model, traced.loaded.model.config
    meta = traced.trace.meta
    k, L = meta.top_k, meta.num_layers
    routers = [getattr(getattr(model.model.layers[i], family.block_attr), family.router_attr)
               for i in family.moe_layers]
    inputs: dict[int, torch.Tensor] = {}
    handles = [router.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0]))
               for i, router in enumerate(routers)]
    compared = 0
    try:
        for r, seq in enumerate(traced.sequences):
            fed = torch.from_numpy(seq[None, : len(seq) - 1]).to(model.device)
            with torch.no_grad():
                model(fed)
            rows = request_rows(traced.trace, r)
            for layer in range(L):
                at = np.flatnonzero(rows.layer == layer)
                at = at[np.argsort(rows.position[at], kind="stable")]
                guess = rows.next_layer_guess[at].astype(np.int64)
                if layer == L - 1:
                    assert (guess == -1).all(), "the last MoE layer has no next layer to guess"
                    continue
                x = inputs[layer].reshape(-1, inputs[layer].shape[-1])
                with torch.no_grad():
                    bias = getattr(routers[layer + 1], "bias", None)
                    logits = torch.nn.functional.linear(x.float(), routers[layer + 1].weight.float(),
                                                        None if bias is None else bias.float()).cpu()
                dense = expected_routing(family.model_type, logits, config, k).numpy()
                clear = clear_topk_margin(selection_scores(family.model_type, logits), k)
                want = [set(np.flatnonzero(row).tolist()) for row in dense[clear]]
                got = [set(row) for row in guess[clear].tolist()]
                assert got == want
                # Rank order: the guess is sorted by the next router's weights too.
                ranked = np.take_along_axis(dense[clear], guess[clear], axis=1)
                assert np.all(np.diff(ranked, axis=1) <= 1e-6)
                compared += int(clear.sum())
    finally:
        for h in handles:
            h.remove()
    assert compared > 0


# One family is enough for what does not depend on the router ------------------------------------
@pytest.fixture(scope="module")
def mixtral_folder(tmp_path_factory) -> Path:
    template = ("{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}"
                "{% if add_generation_prompt %}[assistant]{% endif %}")
    return build_model_folder(tmp_path_factory.mktemp("mixtral-chat"), FAMILIES["mixtral"], seed=3,
                              chat_template=template)


@pytest.fixture(scope="module")
def mixtral_loaded(mixtral_folder):
    return load_model(str(mixtral_folder), device="cpu")


def test_chat_template_is_used_when_the_tokenizer_has_one(mixtral_loaded, tmp_path):
    prompts = load_prompts(GSM8K, limit=1)
    out = tmp_path / "chat.parquet"
    trace_prompts(mixtral_loaded, prompts, GenerationSettings(max_new_tokens=2), out, progress=False)
    trace = read_trace(out)
    text = mixtral_loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompts.prompts[0].text}], tokenize=False, add_generation_prompt=True)
    want = mixtral_loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    prefill = (trace.phase == PREFILL) & (trace.layer == 0)
    assert trace.token_id[prefill].tolist() == want
    assert trace.meta.source.details["chat_template"] is True
    plain = tmp_path / "plain.parquet"
    trace_prompts(mixtral_loaded, prompts, GenerationSettings(max_new_tokens=2, chat_template=False), plain,
                  progress=False)
    t2 = read_trace(plain)
    assert t2.token_id[(t2.phase == PREFILL) & (t2.layer == 0)].tolist() == \
        mixtral_loaded.tokenizer(prompts.prompts[0].text)["input_ids"]


def test_ignore_eos_gives_exactly_n_minus_1_decode_steps_and_sampling_is_seeded(mixtral_loaded, tmp_path):
    prompts = load_prompts(GSM8K, limit=2)
    settings = GenerationSettings(max_new_tokens=5, do_sample=True, seed=7, temperature=1.5, ignore_eos=True,
                                  chat_template=False)
    a = read_trace(trace_prompts(mixtral_loaded, prompts, settings, tmp_path / "a.parquet", progress=False).path)
    b = read_trace(trace_prompts(mixtral_loaded, prompts, settings, tmp_path / "b.parquet", progress=False).path)
    L = a.meta.num_layers
    for r in range(2):
        assert ((a.request == r) & (a.phase == DECODE)).sum() == 4 * L
    np.testing.assert_array_equal(a.experts, b.experts)
    np.testing.assert_array_equal(a.token_id, b.token_id)
    other = GenerationSettings(max_new_tokens=5, do_sample=True, seed=8, temperature=1.5, ignore_eos=True,
                               chat_template=False)
    c = read_trace(trace_prompts(mixtral_loaded, prompts, other, tmp_path / "c.parquet", progress=False).path)
    assert not np.array_equal(a.token_id, c.token_id)


def test_bfloat16_load_records_its_byte_sizes(mixtral_folder, tmp_path):
    loaded = load_model(str(mixtral_folder), device="cpu", dtype="bfloat16")
    out = tmp_path / "bf16.parquet"
    trace_prompts(loaded, load_prompts(GSM8K, limit=1), GenerationSettings(max_new_tokens=3), out, progress=False)
    meta = read_trace(out).meta
    assert meta.dtype == "bfloat16"
    assert meta.expert_bytes == tuple([meta.model.expert_params * 2] * meta.num_layers)
    assert meta.non_expert_bytes == meta.model.non_expert_params * 2


def test_interrupt_keeps_finished_requests(mixtral_loaded, tmp_path, monkeypatch):
    import moesim.tracer.capture as capture

    real = capture.generate_one
    calls = {"n": 0}

    def interrupted_at(n):
        def fake(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return real(*args, **kwargs)
        return fake

    prompts = load_prompts(GSM8K, limit=3)
    monkeypatch.setattr(capture, "generate_one", interrupted_at(2))
    out = tmp_path / "int.parquet"
    summary = trace_prompts(mixtral_loaded, prompts, GenerationSettings(max_new_tokens=3), out, progress=False)
    assert not summary.complete and summary.requests == 1 and summary.path == out
    trace = read_trace(out)
    assert not trace.complete and trace.num_requests == 1
    assert list(tmp_path.iterdir()) == [out]

    calls["n"] = 0
    monkeypatch.setattr(capture, "generate_one", interrupted_at(1))
    empty = tmp_path / "none.parquet"
    summary = trace_prompts(mixtral_loaded, prompts, GenerationSettings(max_new_tokens=3), empty, progress=False)
    assert not summary.complete and summary.path is None and not empty.exists()
    assert list(tmp_path.iterdir()) == [out]


def test_model_without_moe_layers_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=448, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "dense")
    with pytest.raises(MoesimError, match="no routed experts"):
        load_model(str(tmp_path / "dense"), device="cpu")


def test_bad_model_and_device_specs():
    with pytest.raises(MoesimError, match="--device"):
        load_model(str(GSM8K.parent), device="tpu")
    with pytest.raises(MoesimError, match="no config.json"):
        load_model(str(GSM8K.parent), device="cpu")
    with pytest.raises(MoesimError, match="is a file"):
        load_model(str(GSM8K), device="cpu")


# Prompt files -------------------------------------------------------------------------------------
def test_prompt_file_field_choice_blank_lines_and_limit(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"id": 1, "text": "a", "prompt": "b"}\n\n{"prompt": "c"}\n{"prompt": "d"}\n')
    ps = load_prompts(f)
    assert ps.field == "prompt" and [p.text for p in ps.prompts] == ["b", "c", "d"]
    assert [p.line_number for p in ps.prompts] == [1, 3, 4]
    assert ps.sha256 == hashlib.sha256(f.read_bytes()).hexdigest()
    assert [p.text for p in load_prompts(f, limit=2).prompts] == ["b", "c"]
    with pytest.raises(MoesimError, match="line 3 has no field 'text'"):
        load_prompts(f, field="text")


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("\n  \n", "is empty"),
    ('{"prompt": "a"}\n{"prompt": "b"\n', "line 2 is not valid JSON"),
    ('{"prompt": "a"}\n[1, 2]\n', "line 2 is a JSON list, expected an object"),
    ('{"body": "a"}\n', "line 1 has none of the fields prompt, question, text, instruction"),
    ('{"question": "a"}\n{"question": ""}\n', "line 2 field 'question' is not a non-empty string"),
    ('{"question": "a"}\n{"prompt": "b"}\n', "line 2 has no field 'question'"),
])
def test_bad_prompt_files_name_the_line(tmp_path, content, message):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(MoesimError, match=message):
        load_prompts(f)


def test_missing_prompt_file_and_bad_limit(tmp_path):
    with pytest.raises(MoesimError, match="not found"):
        load_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(MoesimError, match="is a folder"):
        load_prompts(tmp_path)
    with pytest.raises(MoesimError, match="--limit 0"):
        load_prompts(GSM8K, limit=0)


# Recorder internals with real router modules ----------------------------------------------------------
class _AscendingRouter(torch.nn.Module):
    """A (logits, weights, indices) router that, like topk(sorted=False) may, hands experts over unsorted."""

    def __init__(self, hidden: int, experts: int, k: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(experts, hidden))
        self.k = k

    def forward(self, x):
        logits = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]), self.weight)
        top = torch.topk(logits.softmax(-1), self.k, dim=-1)
        return logits, top.values.flip(-1), top.indices.flip(-1)


def test_recorder_puts_experts_in_descending_weight_order_and_guesses_in_batches():
    from moesim.tracer.capture import TOPK_TUPLE, MoeLayerTap, RoutingRecorder

    torch.manual_seed(0)
    routers = [_AscendingRouter(16, 8, 3) for _ in range(2)]
    blocks = [torch.nn.Module() for _ in range(2)]
    taps = [MoeLayerTap(i, i, blocks[i], routers[i], TOPK_TUPLE) for i in range(2)]
    x = torch.randn(7, 16)
    with RoutingRecorder(taps) as recorder, torch.inference_mode():
        routers[0](x[:4])  # a 4-token "prefill": guessed at once
        routers[1](x[:4])
        for t in range(4, 7):  # single-token "decode": guessed when collected
            routers[0](x[t:t + 1])
            routers[1](x[t:t + 1])
        got = recorder.collect(6)  # the 7th token's forward is dropped, as for the last generated token
    with torch.no_grad():
        _, w0, e0 = routers[0](x)
        guess = routers[1](x)[2].flip(-1)[:6].numpy()
    want_experts = e0.flip(-1)[:6].numpy()
    np.testing.assert_array_equal(got.experts[0], want_experts)
    np.testing.assert_allclose(got.weights[0], w0.flip(-1)[:6].numpy(), rtol=1e-5)
    assert np.all(np.diff(got.weights, axis=-1) <= 0)
    # layer 0's guess: layer 1's router on layer 0's inputs, in rank order
    np.testing.assert_array_equal(got.next_layer_guess[0], guess)
    assert (got.next_layer_guess[1] == -1).all()
    with pytest.raises(RuntimeError, match="routers saw"):
        RoutingRecorder(taps).collect(1)  # nothing recorded


def test_dbrx_adapter_reads_the_blocks_own_routing():
    from transformers.models.dbrx.configuration_dbrx import DbrxConfig
    from transformers.models.dbrx.modeling_dbrx import DbrxFFN

    from moesim.tracer.capture import ROUTER_ADAPTERS, MoeLayerTap, RoutingRecorder

    config = DbrxConfig(d_model=32, n_heads=4, n_layers=1, attn_config={"kv_n_heads": 2, "rope_theta": 1e4},
                        ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 6, "moe_top_k": 2})
    torch.manual_seed(1)
    block = DbrxFFN(config).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(1, 5, 32)
    tap = MoeLayerTap(0, 0, block, block.router, ROUTER_ADAPTERS["dbrx"])
    with RoutingRecorder([tap]) as recorder, torch.inference_mode():
        block(x)
        got = recorder.collect(5)
        weights, experts = block.route_tokens_to_experts(block.router(x))
    order = torch.argsort(weights, dim=-1, descending=True, stable=True)
    np.testing.assert_array_equal(got.experts[0], experts.gather(-1, order).numpy())
    np.testing.assert_allclose(got.weights[0], weights.gather(-1, order).numpy(), rtol=1e-6)
    assert got.next_layer_guess is not None and (got.next_layer_guess == -1).all()
