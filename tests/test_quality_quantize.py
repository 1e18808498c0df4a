"""Expert quantization (RTN, HQQ) and gating hooks on small Mixtral models built in memory."""

from __future__ import annotations

import math

import pytest
import torch

from moesim.errors import MoesimError
from moesim.quant import WeightFormat
from moesim.quality.gating import (
    ADAPMOE_SENSITIVITIES,
    ExpertUsage,
    GatingSetting,
    Sensitivities,
    applied_gating,
    load_sensitivities,
)
from moesim.quality.moe import expert_matrices, moe_layers_of
from moesim.quality.perplexity import evaluate_perplexity, unigram_perplexity
from moesim.quality.quantize import quantized_experts, rtn_fake_quantize


def tiny_mixtral(seed: int = 0, layers: int = 2, top_k: int = 2):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                           num_experts_per_tok=top_k, max_position_embeddings=64, experts_implementation="eager")
    model = MixtralForCausalLM(config)
    # A wider init than the default 0.02 so routing and expert outputs are far from trivial.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.2)
    return model.eval()


def test_rtn_uses_at_most_2_pow_bits_levels_per_group_and_groups_are_independent():
    torch.manual_seed(0)
    w = torch.randn(3, 5, 256)
    for bits in (8, 4, 3, 2):
        deq = rtn_fake_quantize(w, WeightFormat(bits, 64), -1)
        assert deq.shape == w.shape and deq.dtype == w.dtype
        groups = deq.reshape(3, 5, 4, 64)
        levels = max(len(torch.unique(groups[i, j, g])) for i in range(3) for j in range(5) for g in range(4))
        assert 2 <= levels <= 2**bits
        # every value lies on its group's grid of 2^b levels from the group's min to its max (at 8 bits a
        # 64-value group cannot exceed 256 levels anyway: the grid is what is checked there)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        steps = (groups - low) / ((high - low) / (2**bits - 1))
        assert torch.allclose(steps, steps.round(), atol=2e-3), (bits, float((steps - steps.round()).abs().max()))
        # Min and max of each group are levels 0 and 2^b - 1, reproduced up to fp16 meta rounding.
        src = w.reshape(3, 5, 4, 64)
        assert torch.allclose(groups.amax(-1), src.amax(-1), atol=2e-3, rtol=2e-3)
        assert torch.allclose(groups.amin(-1), src.amin(-1), atol=2e-3, rtol=2e-3)
    changed = w.clone()
    changed[..., :64] *= 10
    a = rtn_fake_quantize(w, WeightFormat(4, 64), -1)
    b = rtn_fake_quantize(changed, WeightFormat(4, 64), -1)
    assert torch.equal(a[..., 64:], b[..., 64:])


def test_rtn_error_shrinks_with_bits_and_16_is_bf16():
    torch.manual_seed(1)
    w = torch.randn(4, 128, 192)
    errors = [float((rtn_fake_quantize(w, WeightFormat(b, 64), -1) - w).pow(2).mean()) for b in (8, 4, 3, 2)]
    assert errors == sorted(errors) and errors[0] < 1e-4 < errors[-1]
    assert torch.equal(rtn_fake_quantize(w, WeightFormat(16), -1), w.to(torch.bfloat16).float())


def test_rtn_groups_along_the_given_input_dim_and_handles_a_partial_group():
    torch.manual_seed(2)
    w = torch.randn(2, 40, 100)  # 100 = one group of 64 and a partial group of 36
    along_last = rtn_fake_quantize(w, WeightFormat(3, 64), -1)
    along_middle = rtn_fake_quantize(w.transpose(1, 2).contiguous(), WeightFormat(3, 64), -2)
    assert torch.equal(along_last, along_middle.transpose(1, 2))
    tail = along_last[..., 64:]
    assert max(len(torch.unique(tail[i, j])) for i in range(2) for j in range(40)) <= 8


def test_rtn_exact_on_a_grid():
    levels = torch.arange(16, dtype=torch.float32) * 0.25 - 1.0  # exactly representable scale and zero
    w = levels.repeat(4).reshape(1, 1, 64)
    assert torch.equal(rtn_fake_quantize(w, WeightFormat(4, 64), -1), w)


def test_quantized_experts_patches_only_expert_weights_and_restores_them():
    model = tiny_mixtral()
    layers = moe_layers_of(model)
    assert [l.decoder_layer for l in layers] == [0, 1]
    names = [m.name for m in expert_matrices(layers[0])]
    assert names == ["gate_up_proj", "down_proj"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with quantized_experts(layers, WeightFormat(2, 16)):
        after = model.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed == {f"model.layers.{i}.mlp.experts.{n}" for i in range(2) for n in names}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fewer_expert_bits_move_the_models_predictions_further():
    # random weights: whether quantization raises or lowers the loss means nothing here (2 bits lowered it),
    # but how far the next-token distribution moves from the 16-bit one must grow as the bits shrink
    model = tiny_mixtral(seed=3)
    ids = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(0))
    layers = moe_layers_of(model)
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
        kl = {}
        for bits in (8, 4, 2):
            with quantized_experts(layers, WeightFormat(bits, 16)):
                quant = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
            kl[bits] = float((full.exp() * (full - quant)).sum(-1).mean())
        assert torch.equal(torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1), full)  # restored
    assert 0.0 < kl[8] < kl[4] < kl[2], kl
    assert math.isfinite(evaluate_perplexity(model, ids.numpy()).mean_nll)


def test_top_k_override_and_adaptive_gating():
    model = tiny_mixtral(seed=4)
    layers = moe_layers_of(model)
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(input_ids=ids).logits
        usage1 = ExpertUsage(2)
        with applied_gating(layers, GatingSetting(top_k=1), usage=usage1):
            top1 = model(input_ids=ids).logits
        assert usage1.experts_per_token == 1.0
        # The normalized second weight is at most 0.5, so threshold 0.5 drops every second expert and the
        # first gets weight 1: exactly top-1 routing.
        usage_gate = ExpertUsage(2)
        with applied_gating(layers, GatingSetting(threshold=0.5), usage=usage_gate):
            gated = model(input_ids=ids).logits
        assert usage_gate.experts_per_token == 1.0
        assert torch.allclose(gated, top1, atol=1e-5)
        usage_small = ExpertUsage(2)
        with applied_gating(layers, GatingSetting(threshold=1e-9), usage=usage_small):
            same = model(input_ids=ids).logits
        assert usage_small.experts_per_token == 2.0 and torch.equal(same, base)
        # Hooks and top-k are restored on exit.
        assert torch.equal(model(input_ids=ids).logits, base)
        assert all(l.router.top_k == 2 and not l.router._forward_hooks for l in layers)


def test_adaptive_gating_drops_only_tokens_below_threshold():
    model = tiny_mixtral(seed=5)
    layers = moe_layers_of(model)
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(2))
    seconds = []
    with torch.no_grad(), applied_gating(layers, GatingSetting(), observers=[
        lambda i, logits, scores, idx: seconds.append(scores[:, 1].clone())
    ]):
        model(input_ids=ids)
    threshold = float(torch.cat(seconds).median())
    usage = ExpertUsage(2)
    with torch.no_grad(), applied_gating(layers, GatingSetting(threshold=threshold), usage=usage):
        model(input_ids=ids)
    dropped = sum(int((s < threshold).sum()) for s in seconds)
    rows = sum(len(s) for s in seconds)
    assert usage.experts_per_token == pytest.approx(2.0 - dropped / rows)


def test_gating_errors_and_sensitivities(tmp_path):
    model = tiny_mixtral(seed=6)
    layers = moe_layers_of(model)
    with pytest.raises(MoesimError, match="--top-k 9"):
        with applied_gating(layers, GatingSetting(top_k=9)):
            pass
    with pytest.raises(MoesimError, match="needs top-k 2"):
        with applied_gating(layers, GatingSetting(top_k=3, threshold=0.1)):
            pass
    assert layers[0].router.top_k == 2
    sens = load_sensitivities("mixtral-8x7b")
    assert len(sens.values) == 32 == len(ADAPMOE_SENSITIVITIES["mixtral-8x7b"])
    thresholds = GatingSetting(threshold=0.005, sensitivities=sens).layer_thresholds(32)
    assert thresholds[0] == pytest.approx(math.sqrt(0.005 / 46.69189453125))
    with pytest.raises(MoesimError, match="has 32 layers"):
        GatingSetting(threshold=0.005, sensitivities=sens).layer_thresholds(2)
    f = tmp_path / "sens.json"
    f.write_text("[4.0, 1.0]")
    own = load_sensitivities(str(f))
    assert own.name.startswith("file:")
    assert GatingSetting(threshold=0.04, sensitivities=own).layer_thresholds(2) == pytest.approx([0.1, 0.2])
    f.write_text('{"a": 1}')
    with pytest.raises(MoesimError, match="JSON list"):
        load_sensitivities(str(f))
    assert load_sensitivities("none") is None
    stretched = GatingSetting(threshold=0.005, sensitivities=load_sensitivities("adapmoe-loglinear"))
    t4 = stretched.layer_thresholds(4)
    assert t4[0] == pytest.approx(thresholds[0]) and t4[-1] == pytest.approx(thresholds[-1])
    assert t4 == sorted(t4) and stretched.sensitivity_name == "adapmoe-loglinear"
    assert GatingSetting(sensitivities=Sensitivities("x", (1.0,))).sensitivity_name == ""


def test_perplexity_matches_the_model_loss_and_unigram_by_hand():
    model = tiny_mixtral(seed=7)
    windows = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(3))
    result = evaluate_perplexity(model, windows.numpy(), batch_size=2)
    with torch.no_grad():
        loss = float(model(input_ids=windows, labels=windows).loss)
    assert result.predicted_tokens == 45 and result.windows == 3
    assert result.perplexity == pytest.approx(math.exp(loss), rel=1e-5)
    import numpy as np

    train = np.array([0, 0, 1, 2])  # counts 2, 1, 1, 0 over a vocabulary of 4; add-one: 3/8, 2/8, 2/8, 1/8
    uni = unigram_perplexity(train, np.array([[0, 0, 3]]), 4)
    assert uni.perplexity == pytest.approx(math.exp(-(math.log(3 / 8) + math.log(1 / 8)) / 2))


def test_hqq_quantizer_when_installed():
    pytest.importorskip("hqq.core.quantize")
    from moesim.quality.quantize import hqq_fake_quantize

    torch.manual_seed(8)
    w = torch.randn(2, 64, 128)
    errs = [float((hqq_fake_quantize(w, WeightFormat(b, 64), -1) - w).pow(2).mean()) for b in (8, 4, 2)]
    assert errs == sorted(errs) and errs[0] < 1e-3


def test_paired_difference_of_two_settings():
    from moesim.quality.perplexity import paired_nll_difference

    model = tiny_mixtral(seed=9)
    windows = torch.randint(0, 97, (6, 16), generator=torch.Generator().manual_seed(4)).numpy()
    base = evaluate_perplexity(model, windows, batch_size=4)
    assert base.window_nll.shape == (6,) and base.window_nll.sum() == pytest.approx(base.nll_sum)
    rebatched = evaluate_perplexity(model, windows, batch_size=3)
    assert paired_nll_difference(base, rebatched) == pytest.approx((0.0, 0.0), abs=1e-6)
    with quantized_experts(moe_layers_of(model), WeightFormat(2, 16)):
        low = evaluate_perplexity(model, windows)
    diff, se = paired_nll_difference(base, low)
    assert diff == pytest.approx(low.mean_nll - base.mean_nll) and se > 0
