"""Load a Hugging Face MoE model from a folder and find its routers and expert weights.

transformers 5 stores a layer's routed experts fused in one module (``MixtralExperts``: ``gate_up_proj``
[E, 2I, H] and ``down_proj`` [E, H, I], ``nn.functional.linear`` layout, input dim last; ``is_transposed``
models keep the input dim first). Older and remote-code models keep one ``nn.Linear`` per projection
per expert. Both are handled: :func:`expert_matrices` yields each weight with the dim it multiplies the
input along, which is the dim group-wise quantization groups along.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from moesim.errors import MoesimError
from moesim.modelspec import find_moe_layers

WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class MoELayer:
    """One MoE block of a loaded model."""

    moe_index: int  # 0.. over MoE layers (the trace's ``layer``)
    decoder_layer: int  # index among all decoder layers
    block: object  # the sparse-MoE nn.Module
    router: object  # its router (``block.gate``)
    experts: object  # its experts container (``block.experts``)

    @property
    def num_experts(self) -> int:
        return int(getattr(self.router, "num_experts", None) or getattr(self.experts, "num_experts"))

    @property
    def top_k(self) -> int:
        return int(self.router.top_k)


@dataclass
class LoadedModel:
    path: Path
    model_id: str
    checkpoint_sha256: str
    model: object  # a transformers PreTrainedModel, in eval mode
    tokenizer: object
    layers: list[MoELayer]

    @property
    def max_positions(self) -> int | None:
        value = getattr(self.model.config, "max_position_embeddings", None)
        return int(value) if value else None


def checkpoint_sha256(folder: Path) -> str:
    """Hash of config.json and every weight file (names and contents), so a retrained model gets a new key."""
    files = [folder / "config.json"] + sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_FILE_SUFFIXES
    )
    outer = hashlib.sha256()
    for path in files:
        inner = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                inner.update(chunk)
        outer.update(path.name.encode() + b"\0" + inner.hexdigest().encode() + b"\n")
    return outer.hexdigest()


def moe_layers_of(model) -> list[MoELayer]:
    layers: list[MoELayer] = []
    for decoder_layer, block in find_moe_layers(model):
        router = getattr(block, "gate", None)
        if router is None:
            router = getattr(block, "router", None)
        experts = getattr(block, "experts", None)
        if router is None or experts is None or not hasattr(router, "top_k"):
            continue
        layers.append(MoELayer(len(layers), decoder_layer, block, router, experts))
    return layers


def load_moe_model(path: str | os.PathLike, model_id: str | None = None) -> LoadedModel:
    """Load model and tokenizer from a local folder (AutoModelForCausalLM / AutoTokenizer), on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise MoesimError(f"--model {folder}: no such model folder")
    if not (folder / "config.json").is_file():
        raise MoesimError(f"--model {folder}: folder has no config.json (expected a save_pretrained folder)")
    if not any(p.suffix in WEIGHT_FILE_SUFFIXES for p in folder.iterdir()):
        raise MoesimError(f"--model {folder}: folder has no weight files (*.safetensors or *.bin)")
    try:
        # The eager experts loop is the reference implementation and the fastest on CPU.
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto", experts_implementation="eager")
    except (OSError, ValueError, KeyError) as exc:
        raise MoesimError(f"--model {folder}: transformers cannot load it ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    layers = moe_layers_of(model)
    if not layers:
        raise MoesimError(
            f"--model {folder}: {type(model).__name__} has no MoE layers (expected blocks with a router and experts)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as exc:
        raise MoesimError(f"--model {folder}: no usable tokenizer in the folder ({type(exc).__name__})") from None
    model.eval()
    return LoadedModel(
        path=folder, model_id=model_id or folder.resolve().name, checkpoint_sha256=checkpoint_sha256(folder),
        model=model, tokenizer=tokenizer, layers=layers,
    )


@dataclass
class ExpertMatrix:
    """One expert weight tensor (or a stack of E of them) and the dim it multiplies the input along."""

    name: str
    param: object  # torch.nn.Parameter, [E, out, in], [E, in, out] or [out, in]
    input_dim: int  # a negative dim index


def expert_matrices(layer: MoELayer) -> Iterator[ExpertMatrix]:
    """The expert weight matrices of a layer (biases and routers are left alone)."""
    import torch

    experts = layer.experts
    transposed = bool(getattr(experts, "is_transposed", False))
    found = False
    for name, param in experts.named_parameters():
        if "bias" in name.rsplit(".", 1)[-1]:
            continue
        if param.ndim == 3:
            found = True
            yield ExpertMatrix(name, param, -2 if transposed else -1)
    if found:
        return
    for name, module in experts.named_modules():
        if isinstance(module, torch.nn.Linear):
            found = True
            yield ExpertMatrix(f"{name}.weight", module.weight, -1)
    if not found:
        raise MoesimError(
            f"MoE layer {layer.moe_index} ({type(experts).__name__}): no expert weight matrices found "
            "(expected fused 3-D expert parameters or nn.Linear experts)"
        )
