"""Real transformers modules of a model's shape, with random weights, for timing the non-expert work.

:func:`build_attention_layer` builds the model on the meta device (no memory), takes its first MoE
decoder layer, swaps the routed experts for a module that returns zeros (so the layer forward is
exactly norms + attention + router + residuals, plus shared experts where the model has them), then
materialises only that layer on the device with random weights. :func:`decoder_step` times that layer
over ``context`` random past tokens held in transformers' own dynamic cache.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moesim.errors import MoesimError
from moesim.hfcompat import PastContext, cache_argument, declares
from moesim.modelspec import ModelShape, find_moe_layers, load_hf_config


class NoExperts(nn.Module):
    """Stands in for the routed experts: the router still runs, the expert FFNs do not."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def hf_config_for(spec: str, shape: ModelShape):
    """The transformers config behind ``spec``; for a trace file, rebuilt from its ModelShape."""
    if str(spec).endswith(".parquet"):
        from transformers import AutoConfig

        kw = dict(
            hidden_size=shape.hidden_size, intermediate_size=shape.expert_intermediate_size,
            moe_intermediate_size=shape.expert_intermediate_size, num_hidden_layers=shape.num_model_layers,
            num_attention_heads=shape.num_attention_heads, num_key_value_heads=shape.num_key_value_heads,
            head_dim=shape.head_dim, vocab_size=shape.vocab_size, num_local_experts=shape.num_experts,
            num_experts=shape.num_experts, num_experts_per_tok=shape.top_k,
        )
        try:
            return AutoConfig.for_model(shape.architecture, **kw)
        except Exception as exc:
            raise MoesimError(
                f"{spec}: cannot rebuild a '{shape.architecture}' config from the trace ({exc})") from None
    return load_hf_config(spec)


def _text_config(config):
    return getattr(config, "text_config", None) or config


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList) and len(module) > 0:
            return module
    raise MoesimError(f"model type '{model.config.model_type}': no decoder layer list found")


def _rotary(model: nn.Module) -> nn.Module | None:
    for name, module in model.named_modules():
        if name.endswith("rotary_emb"):
            return module
    return None


@torch.no_grad()
def _init_random(module: nn.Module, seed: int) -> None:
    g = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() == 1:
            # norm weights ~1 keep activations at unit scale; biases 0
            p.copy_(torch.ones_like(p) if "norm" in name or name.endswith("weight") else torch.zeros_like(p))
        else:
            std = p.shape[-1] ** -0.5
            p.copy_((torch.randn(p.shape, generator=g) * std).to(p.dtype))
    for name, b in module.named_buffers():
        if b.is_floating_point():
            b.zero_()


@dataclass
class AttentionLayer:
    layer: nn.Module
    rotary: nn.Module | None
    layer_idx: int
    hidden_size: int
    device: torch.device
    dtype: torch.dtype

    def position_embeddings(self, hidden: torch.Tensor, positions: torch.Tensor):
        if self.rotary is None:
            return None
        return self.rotary(hidden, positions)


def build_attention_layer(config, device: torch.device, dtype: torch.dtype, first_moe_layer: int = 0,
                          seed: int = 0) -> AttentionLayer:
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    config._attn_implementation = "sdpa"
    text = _text_config(config)
    if text is not config:
        text._attn_implementation = "sdpa"
    # only layers up to the first MoE layer are needed; building the rest (even on meta) takes seconds
    _truncate_layers(text, first_moe_layer + 1)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    moe = find_moe_layers(model)
    if not moe:
        raise MoesimError(f"model type '{config.model_type}': no MoE layer to time")
    idx, block = moe[0]
    block.experts = NoExperts()
    layer = _decoder_layers(model)[idx]
    layer.to_empty(device=device)
    layer.to(dtype)
    _init_random(layer, seed)
    layer.eval()
    rot = _rotary(model)
    rotary = None
    if rot is not None:
        with torch.device(device):
            rotary = type(rot)(rot.config)
    return AttentionLayer(layer, rotary, idx, int(text.hidden_size), device, dtype)


def decoder_step(layer: nn.Module, hidden: torch.Tensor, position_embeddings, positions: torch.Tensor,
                 layer_idx: int, context: int, seed: int = 0):
    """A zero-argument callable running ``layer`` on ``hidden`` over ``context`` random past tokens.

    The past lives in the library's own dynamic cache (:class:`moesim.hfcompat.PastContext`), passed under
    the keyword the installed transformers declares; each call appends the step and rewinds it, so every
    timed call sees the same KV length and, like a real decode step, pays the cache append.
    """
    kwargs = {"position_embeddings": position_embeddings, "attention_mask": None, "position_ids": positions,
              "use_cache": True}
    if declares(layer, "cache_position"):
        kwargs["cache_position"] = torch.arange(context, context + hidden.shape[1], device=hidden.device)
    keyword = cache_argument(layer)

    def forward(cache):
        with torch.no_grad():
            return layer(hidden, **kwargs, **{keyword: cache})

    past = PastContext(layer_idx, context, forward, seed=seed)

    def run():
        try:
            return forward(past.cache)
        finally:
            past.rewind()

    return run


def decode_call(al: AttentionLayer, batch: int, context: int, seed: int = 0):
    """A zero-argument callable running one decode step of ``batch`` sequences at KV length ``context``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(batch, 1, al.hidden_size, generator=g).to(al.device, al.dtype)
    positions = torch.full((batch, 1), context, device=al.device, dtype=torch.long)
    pe = al.position_embeddings(hidden, positions)
    return decoder_step(al.layer, hidden, pe, positions, al.layer_idx, context, seed=seed)


def prefill_call(al: AttentionLayer, tokens: int, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(1, tokens, al.hidden_size, generator=g).to(al.device, al.dtype)
    positions = torch.arange(tokens, device=al.device)[None, :]
    pe = al.position_embeddings(hidden, positions)

    def run():
        with torch.no_grad():
            return al.layer(hidden, position_embeddings=pe, attention_mask=None, position_ids=positions,
                            use_cache=False)

    return run


def _truncate_layers(text, num_layers: int) -> None:
    if getattr(text, "num_hidden_layers", 0) > num_layers:
        text.num_hidden_layers = num_layers
        if getattr(text, "layer_types", None):
            text.layer_types = list(text.layer_types)[:num_layers]


def tiny_config(config, num_layers: int | None = None):
    """The same architecture shrunk to tiny widths: timing it measures Python/launch overhead only."""
    tiny = copy.deepcopy(config)
    text = _text_config(tiny)
    for key, value in (("hidden_size", 64), ("intermediate_size", 64), ("moe_intermediate_size", 64),
                       ("shared_expert_intermediate_size", 64), ("num_attention_heads", 4), ("head_dim", 16),
                       ("vocab_size", 256), ("q_lora_rank", None), ("kv_lora_rank", 16), ("qk_rope_head_dim", 8),
                       ("qk_nope_head_dim", 8), ("v_head_dim", 16)):
        if hasattr(text, key):
            setattr(text, key, value)
    if hasattr(text, "num_key_value_heads"):
        kv = getattr(text, "num_key_value_heads") or 4
        heads = getattr(text, "num_attention_heads")
        setattr(text, "num_key_value_heads", max(1, min(kv, heads)) if heads % max(1, min(kv, heads)) == 0 else heads)
    if num_layers is not None:
        _truncate_layers(text, num_layers)
    text._attn_implementation = "sdpa"
    tiny._attn_implementation = "sdpa"
    return tiny


def build_tiny_model(config, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to(device).eval()
