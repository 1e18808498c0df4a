"""Record routing from a Hugging Face MoE causal LM through forward hooks on its routers.

What a trace row means
----------------------
``generate`` runs one *prefill* forward over the P prompt tokens, which yields the first new token,
then one *decode* forward per further token, each feeding the token generated last. With G tokens
generated the model runs 1 + (G - 1) forwards: the last generated token is never fed back, so it has
no routing. The trace holds exactly the forwards that ran:

* prefill rows: positions 0..P-1, ``token_id`` = the prompt token at that position;
* decode rows: positions P..P+G-2; the row at position p is the forward that fed the token at position
  p (the (p-P+1)-th generated token), and ``token_id`` is that token.

So a request has P x L prefill rows and (G - 1) x L decode rows for L MoE layers, and
``--max-new-tokens N`` gives at most N - 1 decode steps (fewer when the model stops at its EOS token).

``experts``/``weights`` are what the router handed to the experts, in rank order (descending weight;
families whose router takes ``topk(sorted=False)``, e.g. DeepSeek, are sorted here). ``weights`` are the
values applied, after any renormalisation or routed scaling factor, at the dtype the model ran.
``next_layer_guess`` at MoE layer l is the top-k that the router of MoE layer l+1 (the next layer that
has experts) gives on layer l's router input, as speculative expert loading (Mixtral-Offloading) and
AdapMoE's prefetch compute it; the last MoE layer has none.

Hooks keep device tensors per forward and copy them to the host once per request.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from moesim.errors import MoesimError
from moesim.progress import Progress
from moesim.modelspec import hub_unreachable_reason
from moesim.modelspec import ModelShape, find_moe_layers, shape_from_config
from moesim.tracer.format import DECODE, PREFILL, TraceCells, TraceMeta, TraceSource, TraceWriter
from moesim.tracer.prompts import PromptSet

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# Router adapters ---------------------------------------------------------------------------------
# (moe block, router output) -> (experts [T, k] integer, weights [T, k] float) as the block applies them.
PickFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, torch.Tensor]"]


@dataclass(frozen=True)
class RouterAdapter:
    name: str
    pick: PickFn
    description: str


def _pick_topk_tuple(block: nn.Module, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    # transformers 5.x routers return (router_logits, routing_weights, expert_indices[, ...]).
    if isinstance(output, (tuple, list)) and len(output) >= 3:
        weights, experts = output[1], output[2]
        if (isinstance(experts, torch.Tensor) and isinstance(weights, torch.Tensor)
                and not experts.is_floating_point() and experts.shape == weights.shape):
            return experts, weights
    raise MoesimError(
        f"the router of {type(block).__name__} does not return (logits, weights, indices); "
        f"this model family needs a router adapter in moesim.tracer.capture.ROUTER_ADAPTERS"
    )


def _pick_llama4(block: nn.Module, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    # Llama4Router returns (dense scores with sigmoid(top-k logits) and 0 elsewhere, logits).
    scores, logits = output
    experts = torch.topk(logits, block.top_k, dim=-1).indices
    return experts, scores.gather(-1, experts)


def _pick_dbrx(block: nn.Module, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    # DbrxRouter returns only logits; the FFN block picks the experts itself.
    weights, experts = block.route_tokens_to_experts(output)
    return experts, weights


TOPK_TUPLE = RouterAdapter("topk-tuple", _pick_topk_tuple, "router returns (logits, weights, indices)")

# model_type -> adapter; families not listed use TOPK_TUPLE.
ROUTER_ADAPTERS: dict[str, RouterAdapter] = {
    "llama4": RouterAdapter("llama4-scores", _pick_llama4, "router returns (dense sigmoid scores, logits)"),
    "llama4_text": RouterAdapter("llama4-scores", _pick_llama4, "router returns (dense sigmoid scores, logits)"),
    "dbrx": RouterAdapter("dbrx-logits", _pick_dbrx, "router returns logits; block.route_tokens_to_experts picks"),
}


@dataclass(frozen=True)
class MoeLayerTap:
    """One MoE layer: its block, the router module inside it, and how to read the router's output."""

    moe_layer: int  # 0..num_moe_layers-1
    decoder_layer: int
    block: nn.Module
    router: nn.Module
    adapter: RouterAdapter


def _router_classes(model: nn.Module) -> tuple[type, ...]:
    """Router classes the model itself declares for ``output_router_logits``."""
    found: list[type] = []
    for module in model.modules():
        spec = getattr(type(module), "_can_record_outputs", None)
        if not isinstance(spec, dict) or "router_logits" not in spec:
            continue
        recorders = spec["router_logits"]
        for rec in recorders if isinstance(recorders, (list, tuple)) else [recorders]:
            target = getattr(rec, "target_class", rec)
            if isinstance(target, type) and issubclass(target, nn.Module):
                found.append(target)
    return tuple(found)


def find_router_taps(model: nn.Module, model_type: str) -> list[MoeLayerTap]:
    """The router of every MoE layer, in layer order (same layers as ``ModelShape.moe_layer_ids``)."""
    adapter = ROUTER_ADAPTERS.get(model_type, TOPK_TUPLE)
    declared = _router_classes(model)
    taps = []
    for moe_idx, (decoder_idx, block) in enumerate(find_moe_layers(model)):
        children = dict(block.named_children())
        router = next((m for n, m in children.items() if declared and isinstance(m, declared) and n != "experts"), None)
        if router is None:
            router = children.get("gate", children.get("router"))
        if router is None:
            raise MoesimError(
                f"model type '{model_type}': MoE layer {decoder_idx} ({type(block).__name__}) has no router module "
                f"named gate/router; add an adapter in moesim.tracer.capture.ROUTER_ADAPTERS"
            )
        taps.append(MoeLayerTap(moe_idx, decoder_idx, block, router, adapter))
    return taps


# Recording ---------------------------------------------------------------------------------------
@dataclass
class RequestRouting:
    """One request's routing, host arrays indexed [moe_layer, position, rank]."""

    experts: np.ndarray  # int16 [L, N, k]
    weights: np.ndarray  # float32 [L, N, k]
    next_layer_guess: Optional[np.ndarray]  # int16 [L, N, k], -1 on the last layer; None when not recorded


def _rank_order(experts: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    weights, order = torch.sort(weights.float(), dim=-1, descending=True, stable=True)
    return experts.gather(-1, order), weights


class RoutingRecorder:
    """Forward hooks on every router; collects per-forward device tensors, hands back host arrays per request.

    The next-layer guess for a multi-token forward (prefill) is computed in the hook; single-token
    (decode) inputs are kept and guessed in one batched router call per layer when the request is
    collected, so decode steps pay no extra kernel launches. Routers act on each token independently, so
    batching does not change what they pick.
    """

    def __init__(self, taps: list[MoeLayerTap], next_layer_guess: bool = True):
        if not taps:
            raise MoesimError("model has no MoE layers to record")
        self.taps = taps
        self.record_guess = next_layer_guess
        self._handles: list[Any] = []
        self.reset()

    def reset(self) -> None:
        n = len(self.taps)
        self._experts: list[list[torch.Tensor]] = [[] for _ in range(n)]
        self._weights: list[list[torch.Tensor]] = [[] for _ in range(n)]
        self._guess_experts: list[list[torch.Tensor]] = [[] for _ in range(n)]
        self._guess_weights: list[list[torch.Tensor]] = [[] for _ in range(n)]
        self._pending_inputs: list[list[torch.Tensor]] = [[] for _ in range(n)]

    def _flush_guesses(self, i: int) -> None:
        pending = self._pending_inputs[i]
        if not pending:
            return
        nxt = self.taps[i + 1]
        x = pending[0] if len(pending) == 1 else torch.cat(pending)
        # .forward, not __call__: the next router's own hook must not fire for a guess.
        ge, gw = nxt.adapter.pick(nxt.block, nxt.router.forward(x))
        self._guess_experts[i].append(ge)
        self._guess_weights[i].append(gw)
        pending.clear()

    def _make_hook(self, i: int):
        tap = self.taps[i]
        guess = self.record_guess and i + 1 < len(self.taps)
        pick = tap.adapter.pick

        def hook(module, args, kwargs, output):
            e, w = pick(tap.block, output)
            self._experts[i].append(e)
            self._weights[i].append(w)
            if guess:
                x = args[0] if args else next(iter(kwargs.values()))
                x = x.reshape(-1, x.shape[-1])
                self._pending_inputs[i].append(x)
                if x.shape[0] > 1:
                    self._flush_guesses(i)

        return hook

    def attach(self) -> "RoutingRecorder":
        if not self._handles:
            for i, tap in enumerate(self.taps):
                self._handles.append(tap.router.register_forward_hook(self._make_hook(i), with_kwargs=True))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "RoutingRecorder":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    @torch.inference_mode()
    def collect(self, num_positions: int) -> RequestRouting:
        """The first ``num_positions`` recorded tokens of every layer as host arrays; then reset."""
        for i in range(len(self.taps) - 1):
            self._flush_guesses(i)
        counts = [sum(_tokens(t) for t in bufs) for bufs in self._experts]
        if min(counts) < num_positions or len(set(counts)) != 1:
            raise RuntimeError(
                f"routers saw {counts} tokens per MoE layer, expected the same >= {num_positions} in every layer "
                f"(was the model run without a KV cache, or does a layer skip its router?)"
            )

        def stacked(buffers: list[list[torch.Tensor]]) -> torch.Tensor:  # [layers, positions, k]
            return torch.stack([_concat(b)[:num_positions] for b in buffers])

        experts, weights = _rank_order(stacked(self._experts), stacked(self._weights))
        L = len(self.taps)
        to_host = [experts]
        if self.record_guess and L > 1:
            to_host.append(_rank_order(stacked(self._guess_experts[:-1]), stacked(self._guess_weights[:-1]))[0])
        # One device->host copy for all indices and one for all weights.
        indices = torch.cat(to_host).to("cpu", torch.int16).numpy()
        host_weights = weights.to("cpu", torch.float32).numpy()
        guess = None
        if self.record_guess:
            guess = np.full_like(indices[:L], -1)
            guess[: L - 1] = indices[L:]
        self.reset()
        return RequestRouting(experts=indices[:L], weights=host_weights, next_layer_guess=guess)


def _tokens(t: torch.Tensor) -> int:
    return t.numel() // t.shape[-1]


def _concat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1, t.shape[-1]) for t in tensors])


def request_cells(request: int, prompt_len: int, token_ids: np.ndarray, routing: RequestRouting) -> TraceCells:
    """Rows of one request: every (position, MoE layer) of the forwards that ran."""
    L, N, k = routing.experts.shape
    position = np.repeat(np.arange(N, dtype=np.int32)[None, :], L, axis=0).reshape(-1)
    layer = np.repeat(np.arange(L, dtype=np.int16)[:, None], N, axis=1).reshape(-1)
    return TraceCells(
        request=np.full(L * N, request, dtype=np.int32),
        phase=np.where(position < prompt_len, PREFILL, DECODE).astype(np.uint8),
        position=position,
        layer=layer,
        experts=routing.experts.reshape(L * N, k),
        weights=routing.weights.reshape(L * N, k),
        next_layer_guess=None if routing.next_layer_guess is None else routing.next_layer_guess.reshape(L * N, k),
        token_id=np.tile(token_ids[:N].astype(np.int32), L),
    )


# Loading -----------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    spec: str  # --model as given
    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    shape: ModelShape
    dtype: str  # "bfloat16", ...
    device: torch.device
    expert_bytes: tuple[int, ...]  # one routed expert, per MoE layer, as loaded
    non_expert_bytes: int
    taps: list[MoeLayerTap] = field(default_factory=list)


def resolve_device(spec: Optional[str]) -> torch.device:
    """``None``/"auto": cuda if available else cpu; otherwise "cpu", "cuda" or "cuda:N" that exists."""
    if spec is None or spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise MoesimError(f"--device {spec}: expected cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise MoesimError(f"--device {spec}: expected cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise MoesimError(f"--device {spec}: CUDA is not available on this machine; use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise MoesimError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _load_config(spec: str) -> tuple[Any, bool]:
    """The model's config and whether to load with ``local_files_only``."""
    from transformers import AutoConfig

    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MoesimError(f"--model {spec}: folder has no config.json")
        try:
            return AutoConfig.from_pretrained(str(path)), True
        except Exception as exc:
            raise MoesimError(f"--model {spec}: config.json is not a usable transformers config ({_first_line(exc)})") from None
    if path.exists():
        raise MoesimError(f"--model {spec}: is a file, expected a model folder (config.json, weights, tokenizer) or a hub id")
    reason = hub_unreachable_reason()
    try:
        return AutoConfig.from_pretrained(spec, local_files_only=reason is not None), reason is not None
    except Exception as exc:
        if reason is not None:
            raise MoesimError(
                f"--model {spec}: not a local folder, not in the Hugging Face cache, and the hub is unreachable "
                f"({reason}); pass a folder with config.json, weights and tokenizer"
            ) from None
        raise MoesimError(f"--model {spec}: cannot load its config from the hub ({_first_line(exc)})") from None


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def load_model(spec: str, device: Optional[str] = None, dtype: str = "auto") -> LoadedModel:
    """Load an MoE causal LM and its tokenizer from a local folder or the hub, or raise MoesimError."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype != "auto" and dtype not in DTYPES:
        raise MoesimError(f"--dtype {dtype}: expected auto, {', '.join(DTYPES)}")
    target = resolve_device(device)
    config, local_only = _load_config(spec)
    shape = shape_from_config(config, model_id=spec)  # raises for a model without routed experts
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=local_only)
    except Exception as exc:
        raise MoesimError(f"--model {spec}: cannot load its tokenizer ({_first_line(exc)})") from None
    # Straight onto the GPU when accelerate can place it (no host copy of a large model); else via the host.
    placed = target.type == "cuda" and importlib.util.find_spec("accelerate") is not None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            spec, config=config, dtype=DTYPES.get(dtype, "auto"), local_files_only=local_only,
            **({"device_map": str(target)} if placed else {}),
        )
        if not placed:
            model.to(target)
    except (OSError, ValueError, RuntimeError) as exc:  # missing/corrupt weights, out of memory
        raise MoesimError(f"--model {spec}: cannot load its weights onto {target} ({_first_line(exc)})") from None
    return wrap_model(spec, model, tokenizer, shape)


def wrap_model(spec: str, model: Any, tokenizer: Any, shape: Optional[ModelShape] = None) -> LoadedModel:
    """A :class:`LoadedModel` for a model already in memory (its device and dtype as they are)."""
    config = model.config
    shape = shape or shape_from_config(config, model_id=spec)
    model.eval()
    taps = find_router_taps(model, str(config.model_type))
    if [t.decoder_layer for t in taps] != list(shape.moe_layer_ids):
        raise MoesimError(
            f"--model {spec}: loaded model has MoE layers {[t.decoder_layer for t in taps]}, "
            f"its config says {list(shape.moe_layer_ids)}"
        )
    expert_bytes = tuple(_param_bytes(t.block.experts) // shape.num_experts for t in taps)
    non_expert = _param_bytes(model) - sum(b * shape.num_experts for b in expert_bytes)
    return LoadedModel(
        spec=spec, model=model, tokenizer=tokenizer, shape=shape,
        dtype=str(model.dtype).replace("torch.", ""), device=model.device,
        expert_bytes=expert_bytes, non_expert_bytes=int(non_expert), taps=taps,
    )


# Generation --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 32
    do_sample: bool = False  # greedy unless asked
    seed: int = 0  # request i samples with torch seed (seed + i), so a request does not depend on --limit
    temperature: Optional[float] = None  # sampling only; None keeps the model's generation_config value
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    chat_template: Optional[bool] = None  # None: use the tokenizer's chat template when it has one
    ignore_eos: bool = False  # generate exactly max_new_tokens, past the EOS token
    next_layer_guess: bool = True

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise MoesimError(f"--max-new-tokens {self.max_new_tokens}: expected at least 1")
        if self.temperature is not None and self.temperature <= 0:
            raise MoesimError(f"--temperature {self.temperature}: expected a positive number")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise MoesimError(f"--top-p {self.top_p}: expected a number in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise MoesimError(f"--top-k {self.top_k}: expected a positive integer")


def generation_config_for(model: Any, settings: GenerationSettings):
    """The model's own generation config with decoding fixed by ``settings``; eager, with a KV cache."""
    cfg = copy.deepcopy(model.generation_config)
    cfg.max_new_tokens = settings.max_new_tokens
    cfg.min_new_tokens = 0
    cfg.do_sample = settings.do_sample
    cfg.num_beams = 1
    cfg.use_cache = True  # decode must feed one token a forward for positions to line up
    cfg.disable_compile = True  # generate() may compile the forward on GPUs; Python hooks need it eager
    cfg.return_dict_in_generate = False
    if settings.do_sample:
        for name in ("temperature", "top_p", "top_k"):
            value = getattr(settings, name)
            if value is not None:
                setattr(cfg, name, value)
    else:
        cfg.temperature, cfg.top_p, cfg.top_k = None, None, None
    if cfg.pad_token_id is None:
        eos = cfg.eos_token_id
        cfg.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    if settings.ignore_eos:
        # An empty list, not None: generate() refills None from the model's own generation config.
        cfg.eos_token_id = []
    return cfg


def uses_chat_template(tokenizer: Any, settings: GenerationSettings) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if settings.chat_template is None:
        return has_template
    if settings.chat_template and not has_template:
        raise MoesimError("--chat-template: the model's tokenizer has no chat template; use --no-chat-template")
    return settings.chat_template


def encode_prompt(tokenizer: Any, text: str, chat: bool) -> list[int]:
    if chat:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text)["input_ids"])


@dataclass(frozen=True)
class TraceSummary:
    path: Optional[Path]
    requests: int
    rows: int
    prefill_tokens: int
    decode_tokens: int  # decode forwards recorded
    generated_tokens: int
    seconds: float
    complete: bool
    resumed: int = 0  # finished requests taken over from an interrupted earlier run


def resumable_trace(out_path: Path, meta: TraceMeta):
    """(the interrupted trace at ``out_path`` when it was recorded from the same prompts file, model weights
    and settings, so its finished requests are the ones this run would record, else None; why an interrupted
    trace found there is not continued, else "")."""
    from moesim.tracer.format import read_trace

    if not Path(out_path).is_file():
        return None, ""
    from moesim.atomic import forget_input

    try:
        old = read_trace(out_path)
    except MoesimError:
        return None, ""  # not a trace we can continue: it is replaced
    finally:
        forget_input(out_path)  # this command's own output, read to resume it
    if old.complete or old.meta.source.kind != "prompts":
        return None, ""
    before, now = old.meta.source.details, meta.source.details
    if before.get("weights_sha256") != now.get("weights_sha256"):
        return None, (f"{out_path} holds an interrupted trace of other model weights (SHA-256 "
                      f"{str(before.get('weights_sha256', 'not recorded'))[:12]}, now {now['weights_sha256'][:12]}): "
                      f"its requests are not reused, recording afresh")
    same = (old.meta.source.sha256 == meta.source.sha256 and before == now and old.meta.model == meta.model
            and old.meta.dtype == meta.dtype and tuple(old.meta.expert_bytes) == tuple(meta.expert_bytes))
    if not same:
        return None, (f"{out_path} holds an interrupted trace of other prompts, model or settings: its requests are "
                      f"not reused, recording afresh")
    return old, ""


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 of the loaded weights: every tensor of the state dict by name, dtype, shape and bytes.

    The config and tensor shapes of a fine-tuned or re-initialised checkpoint are those of the original, so
    only the values tell its routing apart. Hashing what was loaded (not the files) covers a local folder, a
    hub id and every weight file format alike.
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            t = tensor.detach().to("cpu").contiguous().reshape(-1)
            h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)};".encode())
            h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def trace_meta(loaded: LoadedModel, prompts: PromptSet, settings: GenerationSettings, chat: bool) -> TraceMeta:
    import transformers

    details = {
        "max_new_tokens": settings.max_new_tokens,
        "do_sample": settings.do_sample,
        "seed": settings.seed,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "top_k": settings.top_k,
        "chat_template": chat,
        "ignore_eos": settings.ignore_eos,
        "field": prompts.field,
        "prompts": len(prompts),
        "device": str(loaded.device),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "decode_rows": "one per forward that ran: position p feeds the token at p; the last generated token is not fed",
        "weights_sha256": weights_sha256(loaded.model),
    }
    return TraceMeta(
        model=loaded.shape,
        dtype=loaded.dtype,
        expert_bytes=loaded.expert_bytes,
        non_expert_bytes=loaded.non_expert_bytes,
        source=TraceSource(kind="prompts", path=str(prompts.path), sha256=prompts.sha256, details=details),
    )


def generate_one(loaded: LoadedModel, input_ids: list[int], gen_config: Any, seed: Optional[int]) -> np.ndarray:
    """Generate for one prompt (batch 1); returns prompt + generated token ids."""
    ids = torch.tensor([input_ids], dtype=torch.long, device=loaded.device)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        out = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen_config)
    return out[0].cpu().numpy()


def record_request(loaded: LoadedModel, recorder: RoutingRecorder, writer: TraceWriter, request: int,
                   input_ids: list[int], gen_config: Any, seed: Optional[int]) -> int:
    """Generate for one prompt with ``recorder`` attached and write its rows; returns tokens generated."""
    recorder.reset()
    sequence = generate_one(loaded, input_ids, gen_config, seed)
    new_tokens = len(sequence) - len(input_ids)
    routing = recorder.collect(len(input_ids) + new_tokens - 1)  # the last generated token is not fed back
    writer.write_request(request_cells(request, len(input_ids), sequence, routing))
    return new_tokens


def trace_prompts(
    loaded: LoadedModel,
    prompts: PromptSet,
    settings: GenerationSettings,
    out_path: str | os.PathLike,
    progress: bool = True,
    log: Callable[[str], None] = lambda message: None,
) -> TraceSummary:
    """Generate for every prompt and write one row group per finished request.

    Every finished request is saved at once, so any interruption (Ctrl-C, SIGKILL) leaves a valid trace of
    the finished requests, marked interrupted; rerunning the same command resumes from it.
    """
    chat = uses_chat_template(loaded.tokenizer, settings)
    encoded = [encode_prompt(loaded.tokenizer, p.text, chat) for p in prompts.prompts]
    vocab = loaded.shape.vocab_size
    for prompt, ids in zip(prompts.prompts, encoded):
        if not ids:
            raise MoesimError(f"{prompts.path}: line {prompt.line_number} tokenizes to no tokens")
        if max(ids) >= vocab:
            raise MoesimError(
                f"{prompts.path}: line {prompt.line_number} has token id {max(ids)} >= the model's vocab_size {vocab}; "
                f"tokenizer and model do not match"
            )
    gen_config = generation_config_for(loaded.model, settings)
    meta = trace_meta(loaded, prompts, settings, chat)
    recorder = RoutingRecorder(loaded.taps, next_layer_guess=settings.next_layer_guess)
    prefill = decode = generated = 0
    start = time.perf_counter()
    previous, not_resumed = resumable_trace(Path(out_path), meta)
    if not_resumed:
        log(f"moesim: {not_resumed}")
    done = set(np.unique(previous.cells.request).tolist()) if previous is not None else set()
    if previous is not None:
        meta = previous.meta  # the same run continued: keep its creation time
    writer = TraceWriter(out_path, meta, resume_from=previous)
    complete = True
    bar = Progress(len(prompts), "trace", "prompt", initial=len(done)) if progress else None
    try:
        with writer, recorder:
            for prompt, ids in zip(prompts.prompts, encoded):
                if prompt.index in done:
                    continue
                seed = settings.seed + prompt.index if settings.do_sample else None
                new_tokens = record_request(loaded, recorder, writer, prompt.index, ids, gen_config, seed)
                prefill += len(ids)
                decode += new_tokens - 1
                generated += new_tokens
                if bar is not None:
                    bar.update(1)
    except KeyboardInterrupt:
        # The writer has already kept the finished requests (or removed an empty file).
        complete = False
    finally:
        if bar is not None:
            bar.close()
    return TraceSummary(
        path=writer.path if complete or writer.requests_written else None, requests=writer.requests_written,
        rows=writer.rows_written, prefill_tokens=prefill, decode_tokens=decode, generated_tokens=generated,
        seconds=time.perf_counter() - start, complete=complete, resumed=writer.resumed_requests,
    )
