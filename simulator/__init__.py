"""Stage 3: SimPy discrete-event replay of traces under offloading policies.

Use::

    from moesim.simulator.config import SimConfig
    from moesim.simulator.presets import get_preset
    from moesim.simulator.run import simulate

    result = simulate("qwen3-30b-a3b-bigmoeonedge", "rtx-3060", SimConfig(get_preset("lru"), cache_experts=16))
    result.tpot_mean_s, result.to_row()

Modules: ``policies`` (the policy interface and registries), ``cache``, ``prefetch``, ``placement``,
``transfer`` (parts), ``gating``, ``predictor`` (the learned prefetcher's model), ``presets`` (named
systems), ``config`` (typed configuration), ``workload`` (a trace as forward steps), ``costs`` (lookup
tables from a profile), ``memory`` (peak GPU memory and cache sizing), ``engine`` (the SimPy engine),
``run`` (assembly and results), ``results``, ``timeline`` (Chrome trace), ``sweep`` and ``cli``.
"""
