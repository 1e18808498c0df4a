"""A small Mixtral-architecture MoE trained here on WikiText-2, so quality and routing can be shown on learned
routing when no pretrained MoE can be downloaded.

The recipe: a byte-level BPE tokenizer trained with ``tokenizers`` on ``valid.txt``; a Mixtral model (8
experts, top-2) trained from scratch on the same text with AdamW, a warm-up then cosine learning rate,
and the router load-balancing loss (``output_router_logits``, ``router_aux_loss_coef``) so routing is
learned but does not collapse; then scored on ``test.txt`` against an add-one unigram baseline fitted on
``valid.txt``. Everything is seeded and runs on a fixed number of CPU threads, so the same seed gives
the same weights. The folder loads with ``AutoModelForCausalLM`` / ``AutoTokenizer``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from moesim.atomic import write_text_atomic
from moesim.errors import MoesimError

REPORT_NAME = "demo_report.json"
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class DemoConfig:
    # A narrow model trained for more steps beat a wider one trained for fewer in the same time (test
    # perplexity 71 against 99 at hidden 256 / 600 steps, both ~8 min here), and its experts matter more:
    # 4-bit experts cost it +0.34% perplexity, against -0.02% for the wider model, whose quality barely
    # reacted to weight rounding at all.
    vocab_size: int = 4096
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    num_experts: int = 8
    top_k: int = 2
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 1500
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    final_lr_ratio: float = 0.02  # cosine decay ends at this share of the peak learning rate
    weight_decay: float = 0.1
    router_aux_loss_coef: float = 0.01
    initializer_range: float = 0.02
    eval_max_tokens: int | None = None  # test tokens scored at the end (None: all of test.txt)
    train_chars: int | None = None  # train on this prefix of valid.txt (None: all of it)
    seed: int = 0
    threads: int = 2


FULL = DemoConfig()
# A few seconds of training: routing and perplexity are already well above chance, enough for tests.
QUICK = DemoConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                   num_kv_heads=2, seq_len=64, batch_size=8, steps=30, learning_rate=5e-3, warmup_steps=3,
                   eval_max_tokens=16384, train_chars=300_000)


@dataclass(frozen=True)
class DemoReport:
    config: DemoConfig
    train_text_sha256: str
    test_text_sha256: str
    train_tokens: int
    parameters: int
    train_seconds: float
    steps_per_second: float
    final_train_loss: float
    test_tokens: int
    test_perplexity: float
    unigram_perplexity: float  # add-one unigram fitted on valid, scored on the same test tokens
    top_expert_share: tuple[float, ...]  # per MoE layer, on the test tokens
    reuse_rate: tuple[float, ...]  # per MoE layer: share of experts the previous token also used
    uniform_reuse_rate: float
    trained_steps: int  # steps run: config.steps, or fewer where training stopped early (stop_at_step)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1) + "\n"


def train_tokenizer(text: str, vocab_size: int):
    """Byte-level BPE trained on ``text``, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   model_max_length=1 << 20)


def build_model(cfg: DemoConfig, vocab_size: int, eos_id: int):
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k, max_position_embeddings=cfg.seq_len,
        router_aux_loss_coef=cfg.router_aux_loss_coef, output_router_logits=False, tie_word_embeddings=True,
        initializer_range=cfg.initializer_range,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, sliding_window=None,
        experts_implementation="eager",
    )
    torch.manual_seed(cfg.seed)
    return MixtralForCausalLM(config)


def _learning_rate(cfg: DemoConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    low = cfg.final_lr_ratio
    return cfg.learning_rate * (low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _batches(ids: np.ndarray, cfg: DemoConfig, rng: np.random.Generator):
    """Endless batches: each epoch cuts the stream at a random offset into windows and shuffles them."""
    while True:
        offset = int(rng.integers(cfg.seq_len))
        n = (len(ids) - offset) // cfg.seq_len
        windows = ids[offset: offset + n * cfg.seq_len].reshape(n, cfg.seq_len)
        order = rng.permutation(n)
        for start in range(0, n - cfg.batch_size + 1, cfg.batch_size):
            yield windows[order[start:start + cfg.batch_size]]


@contextlib.contextmanager
def _torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


CHECKPOINT_EVERY = 25  # training steps between checkpoints: a kill loses at most this many


def checkpoint_path(out: Path) -> Path:
    return out.parent / f".{out.name}.checkpoint.pt"


def _checkpoint_key(cfg: DemoConfig, train_sha: str, test_sha: str) -> str:
    # threads change the speed only where torch's CPU kernels are thread-count independent; they are
    # part of the key anyway, since the same seed promises the same weights only at the same threads
    return json.dumps({"config": dataclasses.asdict(cfg), "train": train_sha, "test": test_sha}, sort_keys=True)


def _save_checkpoint(path: Path, key: str, step: int, model, optimizer, loss: float, seconds: float) -> None:
    import torch

    from moesim.atomic import atomic_path

    with atomic_path(path) as tmp:
        torch.save({"key": key, "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "loss": loss, "seconds": seconds}, tmp)


def _load_checkpoint(path: Path, key: str, log: Callable[[str], None]):
    import torch

    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - an unreadable checkpoint is only a lost head start
        log(f"checkpoint {path}: unreadable ({str(exc).splitlines()[0][:80]}); training from step 0")
        return None
    if state.get("key") != key:
        log(f"checkpoint {path}: from other settings or data; training from step 0")
        return None
    return state


def train_demo_model(
    out: str | os.PathLike,
    cfg: DemoConfig = FULL,
    train_text_path: str | os.PathLike | None = None,
    test_text_path: str | os.PathLike | None = None,
    log: Callable[[str], None] = lambda line: None,
    checkpoint_every: int = CHECKPOINT_EVERY,
    stop_at_step: Optional[int] = None,
) -> DemoReport:
    """Train, score and save the demo model into ``out`` (written beside it, then moved into place).

    ``stop_at_step``: stop after this many steps of ``cfg``'s schedule (its learning rate still decays over
    ``cfg.steps``), so ``out`` holds that checkpoint of the full run: the same weights as a run of ``cfg``
    has at that step. An early checkpoint routes less concentrated than the finished model.

    Every ``checkpoint_every`` steps the model, optimizer and step are saved beside ``out``; a rerun with the
    same settings and data resumes from there and ends with the same weights as an uninterrupted run (the
    batch stream is replayed from the seed). The checkpoint is removed once ``out`` is written.
    """
    import torch

    from moesim.quality.data import load_eval_text, token_windows
    from moesim.quality.gating import GatingSetting, applied_gating
    from moesim.quality.moe import moe_layers_of
    from moesim.quality.perplexity import evaluate_perplexity, unigram_perplexity
    from moesim.quality.routing import RoutingRecorder, routing_stats

    out = Path(out)
    _check_output_folder(out)
    last = cfg.steps if stop_at_step is None else stop_at_step
    if not 1 <= last <= cfg.steps:
        raise MoesimError(f"--stop-at-step {stop_at_step}: expected 1 to {cfg.steps} (the schedule's steps)")
    train_text = load_eval_text(train_text_path or "wikitext-2-valid", "--train-data")
    test_text = load_eval_text(test_text_path or "wikitext-2", "--test-data")

    with _torch_threads(cfg.threads):
        t0 = time.perf_counter()
        train_str = train_text.text if cfg.train_chars is None else train_text.text[: cfg.train_chars]
        # Only a prefix of test.txt is scored with eval_max_tokens; 16 characters a token is far more
        # than byte-level BPE averages, so the prefix holds enough tokens.
        test_str = test_text.text if cfg.eval_max_tokens is None else test_text.text[: 16 * cfg.eval_max_tokens]
        tokenizer = train_tokenizer(train_str, cfg.vocab_size)
        vocab = len(tokenizer)
        train_ids = np.asarray(tokenizer(train_str)["input_ids"], dtype=np.int64)
        test_ids = np.asarray(tokenizer(test_str)["input_ids"], dtype=np.int64)
        log(f"tokenizer: {vocab} tokens; valid {len(train_ids)} tokens, test {len(test_ids)} tokens "
            f"({time.perf_counter() - t0:.1f} s)")

        model = build_model(cfg, vocab, tokenizer.eos_token_id)
        params = sum(p.numel() for p in model.parameters())
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                      betas=(0.9, 0.95))
        rng = np.random.default_rng(cfg.seed)
        batches = _batches(train_ids, cfg, rng)
        ckpt = checkpoint_path(out)
        key = _checkpoint_key(cfg, train_text.sha256, test_text.sha256)
        state = _load_checkpoint(ckpt, key, log)
        if state is not None and int(state["step"]) > last:
            log(f"checkpoint {ckpt}: at step {state['step']}, past --stop-at-step {last}; training from step 0")
            state = None
        first, done_seconds = 0, 0.0
        loss_value = float("nan")
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            first, loss_value, done_seconds = int(state["step"]), float(state["loss"]), float(state["seconds"])
            for _ in range(first):
                next(batches)  # the same batch stream as an uninterrupted run
            log(f"resumed from {ckpt} at step {first}/{cfg.steps}")
        model.train()
        t_train = time.perf_counter() - done_seconds
        for step in range(first, last):
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(cfg, step)
            batch = torch.from_numpy(next(batches)).long()
            output = model(input_ids=batch, labels=batch, output_router_logits=True, use_cache=False)
            output.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = float(output.loss.detach())
            if step == 0 or (step + 1) % max(1, cfg.steps // 10) == 0 or step + 1 == last:
                elapsed = time.perf_counter() - t_train
                log(f"step {step + 1}/{cfg.steps}: loss {loss_value:.3f} (aux {float(output.aux_loss.detach()):.3f}), "
                    f"{(step + 1) / elapsed:.2f} steps/s")
            if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < last:
                _save_checkpoint(ckpt, key, step + 1, model, optimizer, loss_value, time.perf_counter() - t_train)
        train_seconds = time.perf_counter() - t_train
        model.eval()

        windows = token_windows(test_ids, cfg.seq_len, cfg.eval_max_tokens)
        recorder = RoutingRecorder()
        layers = moe_layers_of(model)
        with applied_gating(layers, GatingSetting(), observers=[recorder]):
            result = evaluate_perplexity(model, windows)
        unigram = unigram_perplexity(train_ids, windows, vocab)
        stats = routing_stats(recorder, cfg.seq_len, cfg.num_experts)
        log(f"test perplexity {result.perplexity:.2f} on {result.predicted_tokens} tokens; "
            f"unigram baseline {unigram.perplexity:.2f}")

    report = DemoReport(
        config=cfg, train_text_sha256=train_text.sha256, test_text_sha256=test_text.sha256,
        train_tokens=int(len(train_ids)), parameters=int(params), train_seconds=round(train_seconds, 3),
        steps_per_second=round(last / train_seconds, 4), final_train_loss=loss_value,
        test_tokens=result.predicted_tokens, test_perplexity=result.perplexity,
        unigram_perplexity=unigram.perplexity,
        top_expert_share=tuple(s.top_expert_share for s in stats), reuse_rate=tuple(s.reuse_rate for s in stats),
        uniform_reuse_rate=stats[0].uniform_reuse_rate, trained_steps=last,
    )
    _save_folder(out, model, tokenizer, report)
    checkpoint_path(out).unlink(missing_ok=True)
    return report


def _check_output_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise MoesimError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / REPORT_NAME).is_file():
        raise MoesimError(f"--out {out}: folder is not empty and holds no demo model; choose another folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MoesimError(f"--out {out}: cannot create its parent folder ({exc.strerror or exc})") from None
    if not os.access(out.parent, os.W_OK):
        raise MoesimError(f"--out {out}: folder {out.parent} is not writable")


def _save_folder(out: Path, model, tokenizer, report: DemoReport) -> None:
    """Write the whole folder beside ``out`` and swap it in, so ``out`` is never half-written."""
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        write_text_atomic(staging / REPORT_NAME, report.to_json())
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / "model")
        os.replace(staging, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def load_demo_report(folder: str | os.PathLike) -> dict:
    path = Path(folder) / REPORT_NAME
    if not path.is_file():
        raise MoesimError(f"{folder}: no {REPORT_NAME} (not a folder written by moesim demo-model)")
    return json.loads(path.read_text(encoding="utf-8"))
