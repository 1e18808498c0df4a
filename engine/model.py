"""The model's non-expert part as real transformers modules on the device, experts replaced by a hook.

:func:`build_model` instantiates the causal LM for a (layer-truncated) config on the meta device, swaps
every MoE block's ``experts`` module for :class:`OffloadedExperts` (which hands the block's hidden states
to the offloading executor and returns the routed experts' output), and materialises the rest on the
device: embeddings, attention, norms, routers, shared experts, lm_head. Weights come from a Hugging
Face checkpoint (:func:`load_checkpoint`) or are random (latency depends on shapes, not on values).

The router still runs (its cost is real) but its choice is ignored: routing is forced from the trace,
so the engine and the simulator see the same decisions. Each forward step is
``model(input_ids, <cache>, use_cache=True, logits_to_keep=1)`` and a greedy argmax, as a
generate loop does; calibration's non-expert, head and overhead models time the same modules.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moesim.errors import MoesimError
from moesim.modelspec import find_moe_layers

_POOL_VALUES = 1 << 20


class OffloadedExperts(nn.Module):
    """Stands in for a MoE block's experts: the executor runs the layer's routed experts."""

    def __init__(self, moe_layer: int, run_layer: Callable[[int, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.moe_layer = moe_layer
        self._run_layer = run_layer

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        shape = hidden_states.shape
        out = self._run_layer(self.moe_layer, hidden_states.reshape(-1, shape[-1]))
        return out.reshape(shape)


@dataclass
class CheckpointExperts:
    """Expert matrices read from a checkpoint: per MoE layer, fused gate+up [E, 2I, H] and down [E, H, I]."""

    gate_up: list[torch.Tensor]
    down: list[torch.Tensor]

    def expert(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_up[layer][expert], self.down[layer][expert]


def _text_config(config):
    return getattr(config, "text_config", None) or config


def expert_layout_error(config) -> Optional[str]:
    """Why the engine cannot run this architecture's experts, or None (checked on the meta device)."""
    from transformers import AutoModelForCausalLM

    probe = copy.deepcopy(config)
    text = _text_config(probe)
    text.num_hidden_layers = min(int(text.num_hidden_layers), 4)
    if getattr(text, "layer_types", None):
        text.layer_types = list(text.layer_types)[: text.num_hidden_layers]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(probe)
    moe = find_moe_layers(model)
    if not moe:
        return "no MoE layer in the first layers"
    experts = moe[0][1].experts
    gu, dn = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(gu, torch.Tensor) or not isinstance(dn, torch.Tensor) or gu.dim() != 3 or dn.dim() != 3:
        return f"experts module {type(experts).__name__} does not store fused gate_up_proj/down_proj tensors"
    e, two_i, h = gu.shape
    if dn.shape != (e, h, two_i // 2):
        return (f"experts module {type(experts).__name__} stores gate_up_proj {tuple(gu.shape)} and down_proj "
                f"{tuple(dn.shape)}, expected [E, 2I, H] and [E, H, I]")
    if getattr(experts, "gate_up_proj_bias", None) is not None or getattr(experts, "down_proj_bias", None) is not None:
        return f"experts module {type(experts).__name__} has biases"
    return None


def _fill_random(model: nn.Module, device: torch.device, seed: int) -> None:
    """Random weights without a per-parameter RNG pass: a pool of random values is copied in and scaled.

    Matrices get uniform values of scale fan_in^-1/2, vectors (norm weights) 1, rotary buffers their
    real values (transformers' own initialisation for those modules).
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    pool = (torch.rand(_POOL_VALUES, generator=g) * 2 - 1).to(device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.view(-1)
            if p.dim() >= 2:
                n = flat.numel()
                for off in range(0, n, _POOL_VALUES):
                    m = min(_POOL_VALUES, n - off)
                    flat[off:off + m].copy_(pool[:m])
                flat.mul_(p.shape[-1] ** -0.5)
            elif "bias" in name:
                flat.zero_()
            else:
                flat.fill_(1.0)
        for module in model.modules():
            if "RotaryEmbedding" in type(module).__name__:
                model._init_weights(module)
        for name, b in model.named_buffers():
            if b.is_floating_point() and not torch.isfinite(b).all():
                raise MoesimError(f"model buffer '{name}' has no initial value after materialisation; "
                                  f"this architecture is not supported by the engine")


def build_model(config, device: torch.device, dtype: torch.dtype,
                run_layer: Callable[[int, torch.Tensor], torch.Tensor], seed: int = 0,
                checkpoint: Optional[str] = None) -> tuple[nn.Module, Optional[CheckpointExperts]]:
    """The causal LM with offloaded experts, on ``device``; for a checkpoint also its expert matrices."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    config._attn_implementation = "sdpa"
    text = _text_config(config)
    if text is not config:
        text._attn_implementation = "sdpa"
    if checkpoint is None:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        _replace_experts(model, run_layer)
        model.to_empty(device=device)
        _fill_random(model, device, seed)
        return model.eval(), None
    try:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, config=config, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise MoesimError(f"--model {checkpoint}: cannot load the checkpoint ({str(exc).splitlines()[0][:200]})") from None
    experts = _replace_experts(model, run_layer)
    model.to(device)
    return model.eval(), experts


def _replace_experts(model: nn.Module, run_layer) -> CheckpointExperts:
    gate_up, down = [], []
    for moe_index, (_, block) in enumerate(find_moe_layers(model)):
        old = block.experts
        gu, dn = getattr(old, "gate_up_proj", None), getattr(old, "down_proj", None)
        if isinstance(gu, torch.Tensor) and gu.device.type != "meta":
            gate_up.append(gu.detach())
            down.append(dn.detach())
        block.experts = OffloadedExperts(moe_index, run_layer)
    return CheckpointExperts(gate_up, down)


def expert_activation(config) -> Callable:
    """The experts' activation function (SiLU for every supported architecture; read from the config)."""
    from transformers.activations import ACT2FN

    act = getattr(_text_config(config), "hidden_act", None) or getattr(_text_config(config), "hidden_activation", "silu")
    return ACT2FN[act] if act in ACT2FN else F.silu


def non_expert_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def checkpoint_path(text: str) -> Path:
    path = Path(text)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise MoesimError(f"--model {text}: expected a Hugging Face checkpoint folder with config.json "
                          f"(nothing can be downloaded here)")
    return path
