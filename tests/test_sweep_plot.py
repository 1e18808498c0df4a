"""The sweep plot tells formats and batch sizes apart and keeps the oracle off the Pareto front (#15 finding 10)."""

from __future__ import annotations

from moesim.simulator.sweep import is_oracle, plot_series, realisable_front, write_plot


def row(policy, fmt, batch, mib, tpot, cache_policy="lru", prefetch="none"):
    return {"policy": policy, "expert_format": fmt, "batch": batch, "peak_gpu_mib": mib, "tpot_mean_s": tpot,
            "feasible": True, "cache_policy": cache_policy, "prefetch": prefetch}


def test_formats_and_batches_are_separate_series_and_belady_is_not_on_the_front(tmp_path):
    rows = [row("lru", "int4", 1, 4096, 0.2), row("lru", "int2", 1, 3072, 0.25), row("lru", "int4", 8, 5120, 0.05),
            row("belady", "int4", 1, 2048, 0.01, cache_policy="belady")]
    series = plot_series(rows)
    keys = {(s.policy, s.expert_format, s.batch) for s in series}
    assert keys == {("lru", "int4", 1), ("lru", "int2", 1), ("lru", "int4", 8), ("belady", "int4", 1)}
    front = realisable_front(series)
    assert (2.0, 10.0) not in front  # the oracle beats everything but is not realisable
    assert front == [(3.0, 250.0), (4.0, 200.0), (5.0, 50.0)]
    assert is_oracle(rows[-1]) and is_oracle(row("x", "int4", 1, 1, 1, prefetch="oracle"))
    path = write_plot(rows, tmp_path / "p.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
