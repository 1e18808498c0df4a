"""accelerate's cost per offloaded weight matrix beyond its copy, measured (the fitted
``accelerate.weight_overhead_s`` of ``simulator/runtime.py`` is 0.82 ms, fitted to three published TPOTs).

accelerate's CPU offload (``cpu_offload``, or ``device_map`` entries on "cpu") puts an ``AlignDevicesHook`` on
every module with weights. Before the module runs, the hook loads each weight onto the GPU from ordinary
(pageable) host memory with ``set_module_tensor_to_device``; after it, it moves the weight back to "meta".
In accelerate v0.21-v0.27 each of those calls ends in ``torch.cuda.empty_cache()``, so the freed block is
returned to the driver and the next load allocates it again.

This script times, per expert of a Mixtral-8x7B-shaped layer (three bf16 matrices, batch 1), on a CUDA device:

- **hooked**: the expert's forward under ``cpu_offload`` (three hooked loads, the compute, three moves back);
- **copies**: three synchronous pageable copies of the same matrices (``tensor.to(device)``), then freed;
- **compute**: the forward with the weights already on the device;
- **empty_cache**: one ``torch.cuda.empty_cache()`` after freeing a matrix-sized block, and one allocation;

and prints the overhead per matrix = (hooked - copies - compute) / 3 (hooked - copies: the median over rounds
that time the two one after the other), for the installed accelerate and for any other release whose wheel is
unpacked at a path given with ``--also NAME=DIR`` (run in a subprocess with that directory on ``PYTHONPATH``,
ahead of the installed release). ``--shapes``: ``mixtral`` (4096 x 14336, 117 MB per matrix) and ``small``
(1024 x 1024, 2 MB: the overhead is then most of the time).

    python benchmarks/accelerate_hook_cost.py [--repeats 9] [--shapes small,mixtral] [--json F]
        [--also accelerate-0.26.1=/path/to/unpacked/wheel]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = {"mixtral": (4096, 14336), "small": (1024, 1024)}


def _expert_class():
    import torch
    from torch import nn

    class MixtralExpert(nn.Module):
        def __init__(self, hidden: int, inter: int):
            super().__init__()
            self.w1 = nn.Linear(hidden, inter, bias=False, dtype=torch.bfloat16)
            self.w3 = nn.Linear(hidden, inter, bias=False, dtype=torch.bfloat16)
            self.w2 = nn.Linear(inter, hidden, bias=False, dtype=torch.bfloat16)

        def forward(self, x):
            return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))

    return MixtralExpert


def _median_ms(fn, repeats: int) -> float:
    import torch

    fn()  # warm-up
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(shape: str, experts: int, repeats: int) -> dict:
    """The figures of one shape with the accelerate importable in this process."""
    import accelerate
    import torch
    from torch import nn

    hidden, inter = SHAPES[shape]
    dev = torch.device("cuda")
    torch.manual_seed(0)
    with torch.no_grad():
        cls = _expert_class()
        layer = nn.ModuleList([cls(hidden, inter) for _ in range(experts)])
        x = torch.randn(1, hidden, dtype=torch.bfloat16, device=dev)
        host = [[m.weight.data for m in (e.w1, e.w3, e.w2)] for e in layer]

        def copies():
            for mats in host:
                on_dev = [w.to(dev) for w in mats]
                torch.cuda.synchronize()
                del on_dev

        resident = [cls(hidden, inter).to(dev) for _ in range(experts)]

        def compute():
            for e in resident:
                e(x)

        compute_ms = _median_ms(compute, repeats) / experts
        resident.clear()
        torch.cuda.empty_cache()

        nbytes = hidden * inter * 2

        def free_and_empty():
            block = torch.empty(nbytes, dtype=torch.uint8, device=dev)
            del block
            torch.cuda.empty_cache()

        empty_ms = _median_ms(free_and_empty, repeats * 4)

        accelerate.cpu_offload(layer, execution_device=dev)

        def hooked():
            for e in layer:
                e(x)

        # copies and hooked forwards alternate, round by round: the host's staging copy rate moves by several
        # percent between rounds, as much as the overhead of a 117 MB matrix, so the rounds are paired
        rounds = [(_median_ms(copies, 1) / experts, _median_ms(hooked, 1) / experts) for _ in range(repeats)]
        copy_ms = statistics.median(c for c, _ in rounds)
        hooked_ms = statistics.median(h for _, h in rounds)
        paired = statistics.median(h - c for c, h in rounds)
    return {"accelerate": accelerate.__version__, "torch": torch.__version__, "shape": shape,
            "matrix_mb": round(nbytes / 1e6, 1), "hooked_ms": hooked_ms, "copies_ms": copy_ms,
            "compute_ms": compute_ms, "alloc_and_empty_cache_ms": empty_ms, "rounds": repeats,
            "overhead_per_matrix_ms": (paired - compute_ms) / 3}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--shapes", default="small,mixtral")
    ap.add_argument("--also", action="append", default=[], help="NAME=DIR: another accelerate, unpacked at DIR")
    ap.add_argument("--json", default=None, help="write every row to this file")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a subprocess: one shape, print JSON
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.experts, args.repeats)))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("accelerate_hook_cost: needs a CUDA device")
        return 2
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    rows = []
    setups = [("installed", None)] + [tuple(a.split("=", 1)) for a in args.also]
    for label, path in setups:
        for shape in args.shapes.split(","):
            # PYTHONPATH comes before site-packages: the unpacked release shadows the installed one
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [path, os.environ.get("PYTHONPATH")])))
            out = subprocess.run([sys.executable, __file__, "--one", shape, "--repeats", str(args.repeats),
                                  "--experts", str(args.experts)], capture_output=True, text=True, env=env)
            if out.returncode:
                print(f"  {label} {shape}: failed: {out.stderr.strip().splitlines()[-1] if out.stderr else '?'}")
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["setup"] = label
            rows.append(row)
            print(f"  accelerate {row['accelerate']:<8} {shape:<8} matrix {row['matrix_mb']:>6.1f} MB: per expert "
                  f"hooked {row['hooked_ms']:7.2f} ms, copies {row['copies_ms']:7.2f}, compute "
                  f"{row['compute_ms']:5.2f} -> overhead per matrix {row['overhead_per_matrix_ms']:6.3f} ms "
                  f"(one allocation + empty_cache: {row['alloc_and_empty_cache_ms']:.3f} ms)")
    if args.json:
        from moesim.atomic import write_text_atomic

        write_text_atomic(args.json, json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
