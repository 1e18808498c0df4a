"""Run bad inputs through the real ``moesim`` command (one subprocess each) and print what a user sees.

Every case must end with exit status 2, exactly one line on stderr that starts ``moesim: error:``, no
traceback, and no output file. The script prints one table row per case (the message, the status and
whether the case held) and exits 1 if any case did not hold.

    python benchmarks/bad_inputs.py [--jobs 2] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TRACE = "gpt-oss-120b-bigmoeonedge"  # bundled: one request, 128 experts per layer, top-2


@dataclass(frozen=True)
class Case:
    area: str
    what: str
    args: tuple[str, ...]
    output: str = ""  # a path (relative to the work folder) that must not exist afterwards
    kept: str = ""  # a copy of the bundled trace (relative to the work folder) that must keep its bytes


@dataclass(frozen=True)
class Outcome:
    case: Case
    status: int
    message: str
    held: bool
    why: str


def make_inputs(d: Path) -> None:
    """The bad files the cases read."""
    from moesim.calib.profile import bundled_profiles
    from moesim.traces import resolve_trace

    (d / "empty.parquet").write_bytes(b"")
    (d / "text.parquet").write_text("this is not parquet\n")
    good = resolve_trace(TRACE).read_bytes()
    (d / "cut.parquet").write_bytes(good[: len(good) // 2])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"a": [1, 2]}), d / "foreign.parquet")
    (d / "folder.parquet").mkdir()
    profile = json.loads(bundled_profiles()["rtx-3060"].read_text())
    (d / "notjson.json").write_text("{ not json")
    (d / "list.json").write_text("[1, 2]")
    (d / "empty-object.json").write_text("{}")
    broken = dict(profile)
    broken.pop("device")
    (d / "nodevice.json").write_text(json.dumps(broken))
    neg = json.loads(json.dumps(profile))
    neg["device"]["memory_bytes"] = -5
    (d / "negmem.json").write_text(json.dumps(neg))
    nan = json.loads(json.dumps(profile))
    nan["copy"]["h2d/pinned/alone"]["bytes_per_s"] = "fast"
    (d / "badcopy.json").write_text(json.dumps(nan))
    (d / "prompts-empty.jsonl").write_text("")
    (d / "prompts-badjson.jsonl").write_text('{"question": "ok"}\n{oops\n')
    (d / "prompts-nofield.jsonl").write_text('{"answer": "4"}\n')
    (d / "prompts-notobject.jsonl").write_text('["a list"]\n')
    (d / "prompts-number.jsonl").write_text('{"question": 42}\n')
    header = ("# route_trace v1\n# model=/m/qwen.gguf arch=qwen3moe n_layer=1 n_expert=4 n_expert_used=2\n"
              "# layer=0 expert_bytes=100 dense_bytes=10\n"
              "turn,phase,step,layer,slot,expert,weight,residency,expert_bytes\n")
    (d / "noheader.route.csv").write_text("turn,phase,step,layer,slot,expert,weight,residency,expert_bytes\n")
    (d / "good.route.csv").write_text(header + "0,1,0,0,0,1,0.6,0,100\n0,1,0,0,1,2,0.4,0,100\n")
    (d / "badnum.route.csv").write_text(header + "0,1,0,0,0,x,0.6,0,100\n0,1,0,0,1,2,0.4,0,100\n")
    (d / "badexpert.route.csv").write_text(header + "0,1,0,0,0,9,0.6,0,100\n0,1,0,0,1,2,0.4,0,100\n")
    (d / "badphase.route.csv").write_text(header + "0,7,0,0,0,1,0.6,0,100\n0,7,0,0,1,2,0.4,0,100\n")
    (d / "empty.route.csv").write_text("")
    cfg = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 64,
           "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
           "vocab_size": 100, "decoder_sparse_step": 1, "mlp_only_layers": [], "max_position_embeddings": 128}
    (d / "qwen-cfg.json").write_text(json.dumps(cfg))
    line = {"problem_id": 0, "layer": 0, "token_idx": 0, "experts": [1, 2], "gating_probs": [0.6, 0.4]}
    (d / "badjson.jsonl").write_text(json.dumps(line) + "\n{oops\n")
    (d / "good.jsonl").write_text(json.dumps(line) + "\n")
    (d / "nofield.jsonl").write_text(json.dumps({k: v for k, v in line.items() if k != "experts"}) + "\n")
    (d / "mixed.jsonl").write_text(json.dumps(line) + "\n" + json.dumps({**line, "token_pos": 1, "token_idx": None})
                                   .replace('"token_idx": null, ', "") + "\n")
    (d / "neglayer.jsonl").write_text(json.dumps({**line, "layer": -1}) + "\n")
    (d / "strexperts.jsonl").write_text(json.dumps({**line, "experts": ["a", 2]}) + "\n")
    (d / "blank.jsonl").write_text("\n\n")
    (d / "wrongk.jsonl").write_text(json.dumps({**line, "experts": [1, 2, 3, 4], "gating_probs": [1, 1, 1, 1]}) + "\n")
    (d / "a-file").write_text("x")
    (d / "not-png.txt").write_text("x")
    # an output that names an input: the input must survive (the case checks it is still a trace)
    (d / "mine.parquet").write_bytes(good)
    from moesim.tracer import read_trace, write_trace

    tr = read_trace(resolve_trace(TRACE))
    tr.cells.weights = tr.cells.weights.copy()
    tr.cells.weights[3, 0] = float("nan")
    write_trace(d / "nanweight.parquet", tr.meta, tr.cells)
    routing = json.loads((REPO / "traces" / "routing" / "mixtral-8x7b-published.json").read_text())
    (d / "badbytes-routing.json").write_text(json.dumps({**routing, "non_expert_bytes": "big"}))


def cases() -> list[Case]:
    t = ("--trace", TRACE)
    sw = ("sweep", "--no-progress", "--no-plot")
    vj = ("trace", "import", "--format", "vllm-jsonl")
    lc = ("trace", "import", "--format", "llama-route-csv")
    c: list[Case] = []

    def add(area, what, *args, output="", kept=""):
        c.append(Case(area, what, tuple(args), output, kept))

    # traces
    for name, what in (("empty.parquet", "empty trace file"), ("text.parquet", "text file as a trace"),
                       ("cut.parquet", "trace cut in half"), ("foreign.parquet", "Parquet without moesim metadata"),
                       ("folder.parquet", "a folder as the trace"), ("missing.parquet", "missing trace file")):
        add("trace file", f"simulate: {what}", "simulate", "--trace", name, "--json", "r.json", output="r.json")
    add("trace file", "sweep: cut trace", *sw, "--trace", "cut.parquet", "--out", "o1", output="o1")
    add("trace file", "stats: text file", "trace", "stats", "text.parquet")
    add("trace file", "stats: missing", "trace", "stats", "nope.parquet")
    add("trace file", "search: foreign Parquet", "search", "--trace", "foreign.parquet")
    # profiles
    for name, what in (("notjson.json", "not JSON"), ("list.json", "a JSON list"), ("empty-object.json", "{}"),
                       ("nodevice.json", "no device"), ("negmem.json", "negative device memory"),
                       ("badcopy.json", "copy bandwidth a string"), ("missing.json", "missing file"),
                       ("nope-gpu", "unknown bundled name")):
        add("profile", f"simulate: profile {what}", "simulate", *t, "--profile", name)
    add("profile", "sweep: one of two profiles bad", *sw, *t, "--profile", "rtx-3060,list.json", "--out", "o2",
        output="o2")
    add("profile", "search: profile not JSON", "search", *t, "--profile", "notjson.json")
    # prompt files (checked before any model loads)
    for name, what in (("prompts-empty.jsonl", "empty"), ("prompts-badjson.jsonl", "bad JSON on line 2"),
                       ("prompts-nofield.jsonl", "no prompt field"), ("prompts-notobject.jsonl", "a list line"),
                       ("prompts-number.jsonl", "a number as the prompt"), ("missing.jsonl", "missing")):
        add("prompts", f"trace: prompts {what}", "trace", "--prompts", name, "--model", "no-such-model",
            "--out", "t.parquet", output="t.parquet")
    add("prompts", "trace: --limit 0", "trace", "--prompts", "prompts-nofield.jsonl", "--limit", "0", "--model", "x")
    add("prompts", "trace: --temperature without --sample", "trace", "--prompts", "prompts-empty.jsonl",
        "--temperature", "0.5")
    # route CSVs and vLLM dumps
    for name, what in (("noheader.route.csv", "no preamble"), ("badnum.route.csv", "expert not a number"),
                       ("badexpert.route.csv", "expert out of range"), ("badphase.route.csv", "unknown phase"),
                       ("empty.route.csv", "empty file"), ("missing.route.csv", "missing file")):
        add("route CSV", f"import: {what}", *lc, name, "--engine-cache-budget", "1MiB", "--model-config",
            "qwen-cfg.json", "--out", "i.parquet", output="i.parquet")
    add("route CSV", "import: no budget", *lc, "good.route.csv", "--model-config", "qwen-cfg.json",
        "--out", "i.parquet", output="i.parquet")
    add("route CSV", "import: budget not a size", *lc, "good.route.csv", "--engine-cache-budget", "lots",
        "--model-config", "qwen-cfg.json", "--out", "i.parquet", output="i.parquet")
    add("route CSV", "import: unknown format", "trace", "import", "--format", "sglang", "badnum.route.csv")
    for name, what in (("badjson.jsonl", "bad JSON on line 2"), ("nofield.jsonl", "no 'experts'"),
                       ("mixed.jsonl", "token_idx and token_pos mixed"), ("neglayer.jsonl", "negative layer"),
                       ("strexperts.jsonl", "experts not integers"), ("blank.jsonl", "only blank lines"),
                       ("wrongk.jsonl", "top-k differs from the config")):
        add("vLLM dump", f"import: {what}", *vj, name, "--model-config", "mixtral-8x7b", "--out", "v.parquet",
            output="v.parquet")
    add("vLLM dump", "import: no --model-config", *vj, "badjson.jsonl", "--out", "v.parquet", output="v.parquet")
    add("vLLM dump", "import: --engine-cache-budget on vllm", *vj, "badjson.jsonl", "--model-config",
        "mixtral-8x7b", "--engine-cache-budget", "1GiB")
    add("vLLM dump", "import: unknown model config", *vj, "badjson.jsonl", "--model-config", "no-such-config.json")
    # shared flags, the same rule in every command
    for cmd in (("simulate", *t), (*sw, *t, "--out", "o3"), ("search", *t)):
        name = cmd[0]
        add("flags", f"{name}: --cache-experts 500 (E=128)", *cmd, "--cache-experts", "500")
        add("flags", f"{name}: --cache-experts -2", *cmd, "--cache-experts", "-2")
        add("flags", f"{name}: --batch 8 on a one-request trace", *cmd, "--batch", "8")
        add("flags", f"{name}: --batch 0", *cmd, "--batch", "0")
        add("flags", f"{name}: --expert-bits 5", *cmd, "--expert-bits", "5")
    add("flags", "search: --cache-experts 5..2", "search", *t, "--cache-experts", "5..2")
    add("flags", "sweep: --cache-experts 5..2", *sw, *t, "--cache-experts", "5..2", "--out", "o4", output="o4")
    add("flags", "sweep: --gpu-mem 0", *sw, *t, "--gpu-mem", "0", "--out", "o5", output="o5")
    add("flags", "simulate: --gpu-mem 0", "simulate", *t, "--gpu-mem", "0")
    add("flags", "simulate: --gpu-mem lots", "simulate", *t, "--gpu-mem", "lots")
    add("flags", "search: --max-gpu-mem 0", "search", *t, "--max-gpu-mem", "0")
    add("flags", "sweep: --jobs -1", *sw, *t, "--jobs", "-1", "--out", "o6", output="o6")
    add("flags", "search: --jobs -1", "search", *t, "--jobs", "-1")
    add("flags", "sweep: --jobs many", *sw, *t, "--jobs", "many", "--out", "o7", output="o7")
    add("flags", "sweep: --policy ','", *sw, *t, "--policy", ",", "--out", "o8", output="o8")
    add("flags", "sweep: --cache-experts and --gpu-mem", *sw, *t, "--cache-experts", "2", "--gpu-mem", "8GiB",
        "--out", "o9", output="o9")
    add("flags", "simulate: --cache-experts and --cache-mem", "simulate", *t, "--cache-experts", "4",
        "--cache-mem", "1GiB")
    add("flags", "simulate: unknown policy", "simulate", *t, "--policy", "nope")
    add("flags", "simulate: --knob n_cpu_moe=-3", "simulate", *t, "--policy", "llama-cpp", "--knob", "n_cpu_moe=-3")
    add("flags", "simulate: --knob n_cpu_moe on lru", "simulate", *t, "--knob", "n_cpu_moe=4")
    add("flags", "simulate: unknown prefetcher", "simulate", *t, "--prefetch", "psychic")
    add("flags", "simulate: unknown eviction", "simulate", *t, "--eviction", "random")
    add("flags", "simulate: --gating often", "simulate", *t, "--gating", "often")
    add("flags", "simulate: --transfer teleport", "simulate", *t, "--transfer", "teleport")
    add("flags", "search: --max-tpot -1s", "search", *t, "--max-tpot", "-1s")
    add("flags", "search: --max-ttft soon", "search", *t, "--max-ttft", "soon")
    add("flags", "search: --max-ppl without a table", "search", *t, "--max-ppl", "10")
    add("flags", "search: --front-points 1", "search", *t, "--front-points", "1")
    add("flags", "search: unknown policy", "search", *t, "--policy", "nope")
    add("flags", "stats: --phase sideways", "trace", "stats", TRACE, "--phase", "sideways")
    add("flags", "stats: --plot not .png", "trace", "stats", TRACE, "--plot", "not-png.txt")
    # an output path that names an input (the input was replaced by the output)
    add("output is an input", "simulate --json onto its trace", "simulate", "--trace", "mine.parquet", "--json",
        "mine.parquet", kept="mine.parquet")
    add("output is an input", "simulate --timeline onto its trace", "simulate", "--trace", "mine.parquet",
        "--timeline", "mine.parquet", kept="mine.parquet")
    add("output is an input", "stats --json onto its trace", "trace", "stats", "mine.parquet", "--json",
        "mine.parquet", kept="mine.parquet")
    add("output is an input", "search --json onto its trace", "search", "--trace", "mine.parquet", "--json",
        "mine.parquet", kept="mine.parquet")
    add("output is an input", "costmodel fit --out onto its trace", "costmodel", "fit", "--trace", "mine.parquet",
        "--profile", "rtx-3060", "--out", "mine.parquet", kept="mine.parquet")
    # files of the wrong content, and sizes no machine holds
    add("model config", "profiles: --model-config not JSON", "profiles", "--model-config", "notjson.json")
    add("model config", "synth: --model-config a JSON list", "trace", "synth", "--routing", "mixtral-8x7b-published",
        "--model-config", "list.json", "--requests", "1", "--prompt-len", "4", "--output-len", "4", "--out",
        "s.parquet", output="s.parquet")
    add("routing file", "synth: non_expert_bytes a string", "trace", "synth", "--routing", "badbytes-routing.json",
        "--requests", "1", "--prompt-len", "4", "--output-len", "4", "--out", "s.parquet", output="s.parquet")
    add("routing file", "synth: 3.2e9 cells", "trace", "synth", "--routing", "mixtral-8x7b-published", "--requests",
        "1000", "--prompt-len", "100000", "--output-len", "1", "--out", "s.parquet", output="s.parquet")
    add("routing file", "synth: uniform with no --model-config", "trace", "synth", "--routing", "uniform",
        "--requests", "1", "--prompt-len", "4", "--output-len", "4", "--out", "s.parquet", output="s.parquet")
    add("trace file", "fit: a NaN routing weight", "trace", "fit", "nanweight.parquet", "--out", "r.json",
        output="r.json")
    # validate
    add("validate", "no profile", "validate", *t, "--cache-experts", "2", "--out", "v1", output="v1")
    add("validate", "--cache-experts 500", "validate", *t, "--cache-experts", "500", "--calibrate", "--out", "v2",
        output="v2")
    add("validate", "--expert-bits 2 (no engine kernel)", "validate", *t, "--cache-experts", "2", "--calibrate",
        "--expert-bits", "2", "--out", "v3", output="v3")
    add("validate", "--expert-bits and --expert-format disagree", "validate", *t, "--cache-experts", "2",
        "--calibrate", "--expert-bits", "8", "--expert-format", "int4", "--out", "v4", output="v4")
    add("validate", "unknown policy", "validate", *t, "--cache-experts", "2", "--profile", "rtx-3060", "--policy",
        "nope", "--out", "v5", output="v5")
    add("validate", "--out is a file", "validate", *t, "--cache-experts", "2", "--calibrate", "--out", "a-file")
    # calib, quality, demo-model
    add("calib", "--device tpu", "calib", "--device", "tpu", "--out", "p.json", output="p.json")
    add("calib", "unknown --model-config", "calib", "--model-config", "no-such.json", "--out", "p.json",
        output="p.json")
    add("calib", "--out is a folder", "calib", "--out", "folder.parquet")
    add("quality", "missing model folder", "quality", "--model", "no-such-model", "--out", "q.json", output="q.json")
    add("demo-model", "--steps 0", "demo-model", "--out", "dm", "--steps", "0", output="dm")
    add("demo-model", "--threads 0", "demo-model", "--out", "dm", "--threads", "0", output="dm")
    add("demo-model", "--out is a file", "demo-model", "--out", "a-file")
    # write targets
    add("output", "simulate --json into a file as folder", "simulate", *t, "--json", "a-file/r.json")
    add("output", "simulate --timeline is a folder", "simulate", *t, "--timeline", "folder.parquet")
    add("output", "sweep --out is a file", *sw, *t, "--cache-experts", "4", "--out", "a-file")
    add("output", "search --report under a file", "search", *t, "--report", "a-file/rep")
    add("output", "import --out is a folder", *vj, "good.jsonl", "--model-config", "mixtral-8x7b",
        "--out", "folder.parquet")
    return c


def run_case(case: Case, work: Path) -> Outcome:
    env = dict(os.environ, PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "moesim.cli", *case.args], cwd=work, capture_output=True, text=True,
                       env=env, timeout=600)
    err_lines = [l for l in r.stderr.splitlines() if l.strip() and not l.startswith(("sweep:", "search ["))]
    message = err_lines[0] if err_lines else (r.stdout.strip().splitlines() or [""])[0]
    why = []
    if r.returncode != 2:
        why.append(f"exit {r.returncode}")
    if len(err_lines) != 1 or not err_lines[0].startswith("moesim: error: "):
        why.append(f"{len(err_lines)} stderr lines")
    if "Traceback" in r.stderr:
        why.append("traceback")
    if case.output and (work / case.output).exists():
        why.append(f"left {case.output}")
    if case.kept:
        from moesim.traces import resolve_trace

        if (work / case.kept).read_bytes() != resolve_trace(TRACE).read_bytes():
            why.append(f"replaced {case.kept}")
    return Outcome(case, r.returncode, message.removeprefix("moesim: error: "), not why, ", ".join(why))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--markdown", default=None, help="also write the table as Markdown to this file")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="moesim-bad-inputs-"))
    try:
        make_inputs(work)
        todo = cases()
        with ThreadPoolExecutor(args.jobs) as pool:
            outcomes = list(pool.map(lambda c: run_case(c, work), todo))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = ["| # | area | case | exit | message | held |", "|---:|---|---|---:|---|---|"]
    for i, o in enumerate(outcomes, 1):
        msg = o.message.replace("|", "\\|").replace(str(work) + "/", "")
        rows.append(f"| {i} | {o.case.area} | {o.case.what} | {o.status} | {msg} | "
                    f"{'yes' if o.held else 'NO: ' + o.why} |")
    held = sum(o.held for o in outcomes)
    rows.append("")
    rows.append(f"{held} of {len(outcomes)} bad inputs gave one line on stderr, exit 2, no traceback and no output.")
    text = "\n".join(rows)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0 if held == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
