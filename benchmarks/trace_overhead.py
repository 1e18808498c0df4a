"""How much slower generation gets when `moesim trace` records it (goal: under 5%).

Builds a small random-weight Mixtral (hidden 384, 6 layers, 8 experts, top-2) with a byte-level BPE
tokenizer trained on GSM8K questions, saves both to a temp folder and loads them the way `moesim trace`
does. Then it times the same prompts in three arms that take turns request by request (rotating which
goes first): plain ``generate`` (baseline); ``generate`` with the router hooks recording (next-layer
guesses and one host copy per request included, no file); and ``record_request``, the per-request step
of `moesim trace` (the same plus rows and one Parquet row group written). It prints, for
wall and process-CPU time, each arm's median run and the median of its per-request ratios to the
baseline, all measured in this one run. Close pairs keep the ratio steady on busy shared machines.

    python benchmarks/trace_overhead.py [--prompts 8] [--new-tokens 32] [--repeats 9] [--device cpu|cuda]
                                        [--dtype auto|bfloat16|float16|float32] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "test.jsonl"


def build_model_folder(folder: Path, hidden: int, layers: int, vocab: int, seed: int = 0) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, MixtralConfig, PreTrainedTokenizerFast

    lines = [json.loads(line)["question"] for line in GSM8K.read_text().splitlines()[:500]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=vocab - 8, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    config = MixtralConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=6, num_key_value_heads=2, head_dim=hidden // 6, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=1024, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers.utils import logging as hf_logging

    from moesim.tracer import TraceWriter
    from moesim.tracer.capture import (GenerationSettings, RoutingRecorder, encode_prompt, generate_one,
                                       generation_config_for, load_model, record_request, request_cells,
                                       trace_meta)
    from moesim.tracer.prompts import load_prompts

    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "mixtral-bench"
        build_model_folder(folder, args.hidden, args.layers, vocab=1024)
        loaded = load_model(str(folder), device=args.device, dtype=args.dtype)
        prompts = load_prompts(GSM8K, limit=args.prompts)
        # Both arms generate exactly the same number of tokens.
        settings = GenerationSettings(max_new_tokens=args.new_tokens, ignore_eos=True)
        gen_config = generation_config_for(loaded.model, settings)
        encoded = [encode_prompt(loaded.tokenizer, p.text, False) for p in prompts.prompts]

        def timed(fn) -> tuple[float, float]:
            """(wall seconds, process CPU seconds); CPU time is steadier where other jobs share the cores."""
            _sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            fn()
            _sync()
            return time.perf_counter() - start, time.process_time() - cpu_start

        recorder = RoutingRecorder(loaded.taps)

        def plain(i: int) -> None:
            generate_one(loaded, encoded[i], gen_config, None)

        def hooks_only(i: int) -> None:
            # The recording alone: router hooks, next-layer guesses, one host copy per request; no file.
            with recorder:
                recorder.reset()
                sequence = generate_one(loaded, encoded[i], gen_config, None)
                request_cells(i, len(encoded[i]), sequence, recorder.collect(len(sequence) - 1))

        writer = TraceWriter(Path(tmp) / "bench.parquet", trace_meta(loaded, prompts, settings, chat=False))

        def full(i: int) -> None:
            # What trace_prompts does per request: hooks, host copy, rows, one Parquet row group.
            with recorder:
                assert record_request(loaded, recorder, writer, i, encoded[i], gen_config, None) == args.new_tokens

        arms = {"generate": plain, "generate + hooks": hooks_only, "moesim trace": full}
        names = list(arms)
        for fn in arms.values():  # warm-up: allocator, kernels, first-call imports
            fn(0)
        # times[arm][repeat][prompt] = (wall, cpu); the arms take turns request by request, in rotating order,
        # so that drift on a shared machine hits every arm alike.
        times = {name: [[(0.0, 0.0)] * len(encoded) for _ in range(args.repeats)] for name in names}
        for r in range(args.repeats):
            for i in range(len(encoded)):
                k = (r + i) % 3
                for name in names[k:] + names[:k]:
                    times[name][r][i] = timed(lambda: arms[name](i))
        shape = loaded.shape
        tokens = sum(len(ids) for ids in encoded)
        print(f"model: random Mixtral, hidden {shape.hidden_size}, {shape.num_moe_layers} MoE layers, "
              f"{shape.num_experts} experts top-{shape.top_k}, {loaded.dtype} on {loaded.device}, "
              f"torch threads {torch.get_num_threads()}")
        print(f"workload: {len(encoded)} GSM8K prompts ({tokens} prompt tokens), {args.new_tokens} new tokens each, "
              f"{args.repeats} repeats; arms interleaved request by request")
        headline = {}
        for kind, col in (("wall", 0), ("cpu", 1)):
            base_runs = [sum(t[col] for t in run) for run in times["generate"]]
            for name in names:
                runs = [sum(t[col] for t in run) for run in times[name]]
                pairs = [times[name][r][i][col] / times["generate"][r][i][col]
                         for r in range(args.repeats) for i in range(len(encoded))]
                ratio = statistics.median(runs) / statistics.median(base_runs)
                headline[kind, name] = statistics.median(pairs)
                print(f"{kind:4s} {name:17s}: median run {statistics.median(runs):.3f} s (ratio {ratio:.3f}); "
                      f"median per-request ratio {statistics.median(pairs):.3f} over {len(pairs)} pairs, "
                      f"quartiles {_quartiles(pairs)}")
        writer.close()
        print(f"slowdown of moesim trace over plain generate (median per-request ratio): "
              f"{100 * (headline['wall', 'moesim trace'] - 1):+.1f}% wall, "
              f"{100 * (headline['cpu', 'moesim trace'] - 1):+.1f}% CPU time; "
              f"hooks alone {100 * (headline['wall', 'generate + hooks'] - 1):+.1f}% wall (goal < +5%)")


def _quartiles(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4)
    return f"{q[0]:.3f}..{q[2]:.3f}"

if __name__ == "__main__":
    main()
