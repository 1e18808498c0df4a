"""Model shapes: what every stage needs to know about an MoE model, independent of its weights.

A :class:`ModelShape` is read from a Hugging Face config (a bundled name such as ``mixtral-8x7b``, a
local ``config.json`` or folder, or a hub id when the hub is reachable) or from a trace's metadata.
Parameter counts come from instantiating the model on PyTorch's ``meta`` device, so they are exact for
every architecture transformers supports without any weights being allocated.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from moesim.atomic import note_input
from moesim.errors import MoesimError

BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "int8": 1.0, "float8": 1.0}

# Attribute names that different transformers families use for the same quantity.
_NUM_EXPERTS_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_TOP_K_KEYS = ("num_experts_per_tok", "top_k_experts", "moe_topk", "moe_k")
_EXPERT_INTERMEDIATE_KEYS = ("moe_intermediate_size", "expert_intermediate_size", "intermediate_size")
_SHARED_EXPERT_KEYS = ("n_shared_experts", "num_shared_experts")


@dataclass(frozen=True)
class ModelShape:
    """Shapes and parameter counts of an MoE causal LM (no weights)."""

    model_id: str
    architecture: str  # the transformers model_type, e.g. "mixtral"
    num_model_layers: int  # decoder layers, MoE or dense
    moe_layer_ids: tuple[int, ...]  # decoder-layer index of each MoE layer, in order
    num_experts: int  # routed experts per MoE layer
    top_k: int
    hidden_size: int
    expert_intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    expert_params: int  # parameters of one routed expert
    non_expert_params: int  # everything else: embeddings, attention, norms, routers, shared experts, lm_head
    num_shared_experts: int = 0
    kv_bytes_per_token_per_layer_fp16: int = 0  # K and V of one token in one attention layer at 16 bit
    # one decoder layer's self-attention parameters, counted on the built model (0: not known, as in traces
    # written before it was recorded; then sized as q, k, v and o projections of the heads)
    attention_params: int = 0
    # query-key and value widths per head where they differ from head_dim (multi-head latent attention:
    # DeepSeek's q/k heads are nope + rope wide, its v heads v_head_dim); 0: head_dim
    qk_head_dim: int = 0
    v_head_dim: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_ids)

    @property
    def total_params(self) -> int:
        return self.non_expert_params + self.expert_params * self.num_experts * self.num_moe_layers

    def expert_bytes(self, dtype: str = "bfloat16") -> int:
        return int(self.expert_params * _bytes_per_param(dtype))

    def non_expert_bytes(self, dtype: str = "bfloat16") -> int:
        return int(self.non_expert_params * _bytes_per_param(dtype))

    def kv_cache_bytes(self, tokens: int, bytes_per_value: float = 2.0) -> int:
        """KV cache of ``tokens`` tokens across all attention layers."""
        per_token = self.kv_bytes_per_token_per_layer_fp16 / 2.0 * bytes_per_value
        return int(per_token * self.num_model_layers * tokens)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["moe_layer_ids"] = list(self.moe_layer_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "model shape") -> "ModelShape":
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                     if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(d))
        if missing:
            raise MoesimError(f"{where}: missing field '{missing[0]}'")
        kwargs = {k: v for k, v in d.items() if k in names}
        for f in dataclasses.fields(cls):
            value = kwargs.get(f.name)
            if f.name not in kwargs:
                continue
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise MoesimError(f"{where}: field '{f.name}' is {value!r}, expected a non-negative integer")
            if f.type == "str" and not isinstance(value, str):
                raise MoesimError(f"{where}: field '{f.name}' is {value!r}, expected a string")
        ids = kwargs["moe_layer_ids"]
        if not isinstance(ids, (list, tuple)) or not ids or any(isinstance(x, bool) or not isinstance(x, int)
                                                                    or x < 0 for x in ids):
            raise MoesimError(f"{where}: field 'moe_layer_ids' is {ids!r}, expected a non-empty list of layer "
                              f"indices")
        for positive in ("num_experts", "top_k", "hidden_size"):
            if kwargs[positive] < 1:
                raise MoesimError(f"{where}: field '{positive}' is {kwargs[positive]}, expected at least 1")
        if kwargs["top_k"] > kwargs["num_experts"]:
            raise MoesimError(f"{where}: field 'top_k' is {kwargs['top_k']}, more than num_experts "
                              f"{kwargs['num_experts']}")
        kwargs["moe_layer_ids"] = tuple(ids)
        return cls(**kwargs)


def _bytes_per_param(dtype: str) -> float:
    key = str(dtype).replace("torch.", "")
    if key not in BYTES_PER_PARAM:
        raise MoesimError(f"dtype '{dtype}': expected one of {', '.join(sorted(BYTES_PER_PARAM))}")
    return BYTES_PER_PARAM[key]


def bundled_model_configs() -> dict[str, Path]:
    """Bundled HF configs by short name (``mixtral-8x7b``, ...)."""
    root = resources.files("moesim.model_configs")
    return {p.name[: -len(".json")]: Path(str(p)) for p in root.iterdir() if p.name.endswith(".json")}


def _first_attr(config: Any, keys: tuple[str, ...], default: Any = None) -> Any:
    for key in keys:
        value = getattr(config, key, None)
        if value is not None:
            return value
    return default


def hub_unreachable_reason(timeout: float = 5.0) -> str | None:
    """None when the Hugging Face hub answers a TCP connect; otherwise why not.

    A quick check before asking the hub, which spares the user the hub client's half minute of retries.
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"cannot connect to {host}:{port}: {exc.strerror or exc}"
    return None


def load_hf_config(spec: str | Path):
    """Load a transformers config from a bundled name, a local file or folder, or a hub id."""
    from transformers import AutoConfig

    spec_str = str(spec)
    bundled = bundled_model_configs()
    if spec_str in bundled:
        return AutoConfig.from_pretrained(str(bundled[spec_str]))
    path = Path(spec_str)
    if path.suffix == ".json" and path.is_file():
        note_input(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MoesimError(f"{path}: not a JSON model config ({exc})") from None
        if not isinstance(data, dict):
            raise MoesimError(f"{path}: expected a JSON object (a transformers config), found {type(data).__name__}")
        model_type = data.get("model_type")
        if not model_type:
            raise MoesimError(f"{path}: missing field 'model_type' in the config")
        try:
            return AutoConfig.for_model(model_type, **{k: v for k, v in data.items() if k != "model_type"})
        except (ValueError, TypeError, KeyError) as exc:
            first = (str(exc).splitlines() or [""])[0].split(". ")[0][:160]  # e.g. not the list of 900 types
            raise MoesimError(f"{path}: transformers cannot read this config ({type(exc).__name__}: {first})") from None
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MoesimError(f"{path}: folder has no config.json")
        note_input(path / "config.json")
        return AutoConfig.from_pretrained(str(path))
    offline = hub_unreachable_reason()
    try:
        return AutoConfig.from_pretrained(spec_str, local_files_only=offline is not None)
    except Exception as exc:  # unknown id, not cached while offline, ...
        known = ", ".join(sorted(bundled))
        why = offline or type(exc).__name__
        raise MoesimError(
            f"model config '{spec_str}': not a bundled name ({known}), a local config, or a reachable hub id ({why})"
        ) from None


def _decoder_layers(model):
    """The model's list of decoder layers (the first non-empty module named ``...layers``), or None."""
    for name, module in model.named_modules():
        if name.endswith("layers") and hasattr(module, "__len__") and len(module) > 0:
            return module
    return None


def find_moe_layers(model) -> list[tuple[int, Any]]:
    """(decoder-layer index, MoE block) for every decoder layer whose MLP is a routed-expert block."""
    layers = _decoder_layers(model)
    if layers is None:
        return []
    found = []
    for idx, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if hasattr(module, "experts") and not name.endswith("experts") and "shared" not in name:
                found.append((idx, module))
                break
    return found


def _expert_param_count(moe_block, num_experts: int) -> int:
    experts = moe_block.experts
    total = sum(p.numel() for p in experts.parameters())
    return total // num_experts


def shape_from_config(config, model_id: str | None = None) -> ModelShape:
    """Build a :class:`ModelShape` by instantiating ``config`` on the meta device (no memory used)."""
    import torch
    from transformers import AutoModelForCausalLM

    text_config = getattr(config, "text_config", None) or config
    num_experts = _first_attr(text_config, _NUM_EXPERTS_KEYS)
    top_k = _first_attr(text_config, _TOP_K_KEYS)
    if not num_experts or not top_k:
        raise MoesimError(
            f"model '{model_id or getattr(config, '_name_or_path', '?')}': config has no routed experts "
            f"(no {'/'.join(_NUM_EXPERTS_KEYS)}); expected a Mixture-of-Experts model"
        )
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config)
        except ValueError as exc:
            raise MoesimError(f"model type '{config.model_type}': not a causal LM transformers can build ({exc})") from None
    moe = find_moe_layers(model)
    if not moe:
        raise MoesimError(f"model '{model_id or config.model_type}': no MoE layers found in the built model")
    expert_params = _expert_param_count(moe[0][1], int(num_experts))
    total = sum(p.numel() for p in model.parameters())
    non_expert = total - sum(_expert_param_count(b, int(num_experts)) * int(num_experts) for _, b in moe)
    heads = int(text_config.num_attention_heads)
    kv_heads = int(getattr(text_config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text_config, "head_dim", None) or text_config.hidden_size // heads)
    kv_per_token = _kv_bytes_per_token(text_config, kv_heads, head_dim)
    nope, rope = (int(getattr(text_config, k, 0) or 0) for k in ("qk_nope_head_dim", "qk_rope_head_dim"))
    return ModelShape(
        model_id=model_id or getattr(config, "_name_or_path", "") or config.model_type,
        architecture=str(config.model_type),
        num_model_layers=int(text_config.num_hidden_layers),
        moe_layer_ids=tuple(i for i, _ in moe),
        num_experts=int(num_experts),
        top_k=int(top_k),
        hidden_size=int(text_config.hidden_size),
        expert_intermediate_size=int(_first_attr(text_config, _EXPERT_INTERMEDIATE_KEYS)),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=int(text_config.vocab_size),
        expert_params=int(expert_params),
        non_expert_params=int(non_expert),
        num_shared_experts=int(_first_attr(text_config, _SHARED_EXPERT_KEYS, 0) or 0),
        kv_bytes_per_token_per_layer_fp16=kv_per_token,
        attention_params=_attention_param_count(moe[0][0], model),
        qk_head_dim=nope + rope if nope else 0,
        v_head_dim=int(getattr(text_config, "v_head_dim", 0) or 0) if nope else 0,
    )


def _attention_param_count(layer_index: int, model) -> int:
    """Parameters of the self-attention block of decoder layer ``layer_index`` (0 when none is found)."""
    layer = _decoder_layers(model)[layer_index]  # a layer find_moe_layers found
    for child in ("self_attn", "attention", "attn"):
        block = getattr(layer, child, None)
        if block is not None:
            return int(sum(p.numel() for p in block.parameters()))
    return 0


def _kv_bytes_per_token(config, kv_heads: int, head_dim: int) -> int:
    # Multi-head latent attention (DeepSeek-V2/V3) caches the compressed latent and the rope key.
    kv_lora_rank = getattr(config, "kv_lora_rank", None)
    if kv_lora_rank:
        return int((kv_lora_rank + getattr(config, "qk_rope_head_dim", 0)) * 2)
    return int(2 * kv_heads * head_dim * 2)


def load_model_shape(spec: str | Path) -> ModelShape:
    """A :class:`ModelShape` from a bundled name, a config file or folder, or a hub id (a trace file's shape:
    :func:`moesim.tracer.load_shape`, which the trace format's own stage reads)."""
    known = _precomputed_shape(str(spec))
    if known is not None:
        return known
    config = load_hf_config(spec)
    return shape_from_config(config, model_id=str(spec))


def _precomputed_shape(name: str) -> ModelShape | None:
    """A bundled config's shape without torch (see :mod:`moesim.bundled_shapes`), if its file is unchanged."""
    import hashlib

    from moesim.bundled_shapes import shapes

    entry = shapes().get(name)
    path = bundled_model_configs().get(name)
    if entry is None or path is None:
        return None
    if hashlib.sha256(path.read_bytes()).hexdigest() != entry["config_sha256"]:
        return None
    return ModelShape.from_dict(entry["shape"], where=f"bundled shape '{name}'")
