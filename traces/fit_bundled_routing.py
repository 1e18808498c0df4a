"""Regenerate the bundled routing models in ``traces/routing/`` (``moesim trace synth --routing NAME``).

Run from the repository root, with the shared data beside it (``../shared``):

    python traces/fit_bundled_routing.py

- ``mixtral-8x7b-published``: fitted to published statistics (``tracer/mixtral_published.py`` says which);
- one model per bundled real trace, fitted to the whole trace, exactly what this writes:

    moesim trace fit <bundled trace name> --out traces/routing/<bundled trace name>.json
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TRACES = ("qwen3-30b-a3b-bigmoeonedge", "gemma-4-26b-a4b-bigmoeonedge", "gpt-oss-120b-bigmoeonedge")


def main() -> int:
    from moesim.cli import cli
    from moesim.modelspec import load_model_shape
    from moesim.tracer.mixtral_published import fit_mixtral
    from moesim.tracer.routing import write_routing

    out = REPO / "traces" / "routing"
    out.mkdir(parents=True, exist_ok=True)
    model = fit_mixtral(SHARED, load_model_shape("mixtral-8x7b"), log=print)
    write_routing(out / "mixtral-8x7b-published.json", model)
    print(f"wrote {out / 'mixtral-8x7b-published.json'}", flush=True)
    for name in TRACES:
        args = ["trace", "fit", name, "--out", str(out / f"{name}.json")]
        print("moesim " + " ".join(args), flush=True)
        rc = cli.main(args=args, prog_name="moesim", standalone_mode=False)
        if rc:
            return int(rc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
