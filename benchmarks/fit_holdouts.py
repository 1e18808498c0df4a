"""Within-source hold-outs of the fitted parameters that only one source can fit (issue #16).

``moesim reproduce`` holds each source out in turn, but a parameter fitted on one source's points alone then falls
back to its neutral value there, which says nothing about how well the fit carries across that source's runs. This
script fits each such parameter on some of its points (the other parameters at their committed values) and prints
how the rest come out, predicted / published:

- ``server.cpu_int4_compute_rate`` (KTransformers V0.2's prefill rates): 8 experts -> 6 experts and V0.2.1;
  one socket -> two sockets; two sockets -> one socket; and the neutral rate (the stated one) for comparison;
- ``ktransformers.numa_split_gain`` (its two-socket decode rates): V0.2 -> V0.2.1 and back.

    python benchmarks/fit_holdouts.py
"""

from __future__ import annotations

SPLITS = {
    "server.cpu_int4_compute_rate": (
        ("8 experts -> 6 experts and V0.2.1", ("kt-v02-2s-ttft", "kt-v02-1s-ttft"),
         ("kt-v02-2s-6e-ttft", "kt-v02-1s-6e-ttft", "kt-v021-1k-ttft")),
        ("one socket -> two sockets", ("kt-v02-1s-ttft", "kt-v02-1s-6e-ttft"),
         ("kt-v02-2s-ttft", "kt-v02-2s-6e-ttft", "kt-v021-1k-ttft")),
        ("two sockets -> one socket", ("kt-v02-2s-ttft", "kt-v02-2s-6e-ttft", "kt-v021-1k-ttft"),
         ("kt-v02-1s-ttft", "kt-v02-1s-6e-ttft")),
    ),
    "ktransformers.numa_split_gain": (
        ("V0.2 -> V0.2.1", ("kt-v02-2s", "kt-v02-2s-6e"), ("kt-v021-1k", "kt-v021-2", "kt-v021-8k")),
        ("V0.2.1 -> V0.2", ("kt-v021-1k",), ("kt-v02-2s", "kt-v02-2s-6e")),
    ),
}


def main() -> int:
    from moesim.reproduce.catalogue import read_catalogue
    from moesim.reproduce.fit import REGISTRY, fit_one, memoized, values
    from moesim.reproduce.run import predict as predict_outcome

    points = {p.id: p for p in read_catalogue()}
    predict = memoized(lambda p: predict_outcome(p).predicted)

    def ratios(ids, setting) -> str:
        with values(setting):
            return ", ".join(f"{i} {predict(points[i]) / points[i].value:.2f}" for i in ids)

    for name, splits in SPLITS.items():
        param = REGISTRY[name]
        fixed = {n: REGISTRY[n].read() for n in REGISTRY if n != name}
        print(f"{name} (committed {param.read():.4g}, fitted on {', '.join(param.points)})")
        for label, fit_ids, held in splits:
            value, rms = fit_one(param, [points[i] for i in fit_ids], fixed, predict)
            print(f"  {label}: fitted {value:.4g} on {len(fit_ids)} (rms log {rms:.3f}); held out: "
                  f"{ratios(held, {**fixed, name: value})}")
        print(f"  neutral ({param.neutral:g}): {ratios(param.points, {**fixed, name: param.neutral})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
