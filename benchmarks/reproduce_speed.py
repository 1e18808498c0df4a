"""How long `moesim reproduce`'s fit and hold-outs take with the memo keyed by what each prediction read.

``moesim reproduce`` fits every registered parameter, then refits them once per held-out source and model. Each
refit simulates the points of every parameter again wherever a value changed. The memo
(``moesim.reproduce.fit.memoized``) keys a prediction by the fitted values its simulation read
(``moesim.fitted.reads``), so a refit of accelerate's cost leaves the KTransformers points, the slowest to
simulate, as they were. This script runs the fit, leave-one-source-out and leave-one-model-out twice in one
process: keyed by the values read, then keyed by every registered value (the memo before; the same
registry with no parameter's cell known). It prints both times, their ratio, the number of simulations
and whether the fitted values and held-out errors are identical. The second run finds the routing traces
already synthesized, so the ratio understates the gain a little.

    python benchmarks/reproduce_speed.py          # about 8 minutes on 2 cores
"""

from __future__ import annotations

import time
from dataclasses import replace


def main() -> int:
    from moesim.reproduce import fit, run
    from moesim.reproduce.catalogue import read_catalogue

    points = read_catalogue()

    def fit_and_hold_out(registry, label: str):
        simulations = 0

        def counted(p):
            nonlocal simulations
            simulations += 1
            return run.predict(p)

        outcome = fit.memoized(counted, registry)

        def value(p) -> float:
            return outcome(p).predicted

        start = time.perf_counter()
        fits = fit.fit_all(points, value, registry=registry)
        by_source = fit.leave_one_source_out(points, value, fits, registry=registry)
        by_model = fit.leave_one_model_out(points, value, fits, registry=registry)
        seconds = time.perf_counter() - start
        print(f"{label:<44} {seconds:7.1f} s  {simulations:5d} simulations", flush=True)
        return {name: r.value for name, r in fits.items()}, by_source, by_model, seconds

    print(f"fit + leave-one-source-out + leave-one-model-out over {len(points)} catalogue points")
    read = fit_and_hold_out(fit.REGISTRY, "memo keyed by the values read")
    every = fit_and_hold_out({name: replace(param, cell=None) for name, param in fit.REGISTRY.items()},
                             "memo keyed by every value (before)")
    print(f"speed-up {every[3] / read[3]:.2f}x; fitted values and held-out errors identical: {read[:3] == every[:3]}")
    return 0 if read[:3] == every[:3] else 1


if __name__ == "__main__":
    raise SystemExit(main())
