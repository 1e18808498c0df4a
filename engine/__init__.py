"""A real, minimal offloading engine used to validate the simulator (``moesim validate``).

The engine runs a Mixture-of-Experts model's layers with torch (real transformers modules for the
non-expert part, calibration's expert kernels for bf16/int8/int4 experts) and makes every offloading
decision with the simulator's own policy objects, built and called exactly as the simulator does, with
routing forced from a trace; so the measured run and the simulation see identical decisions.

Modules:

``shapes``    which model runs (a checkpoint, a model config, or the trace's own model; ``--layers N``),
              and the trace fitted to it (remapped layers/experts/top-k, cut requests and tokens)
``kernels``   expert weights as flat tensors in one format, computed with calibration's kernels
``store``     the experts in host memory (one pinned slab on CUDA) and the device's expert buffers
``lanes``     the copy engine and the CPU expert pool: worker threads (CUDA streams and events on GPU)
``model``     the transformers model with each MoE block's experts replaced by the executor's hook
``policies``  the simulator's policy objects, built as ``simulator/run.py`` builds them, and recorders
              that log every decision call
``runner``    the executor: a line-by-line counterpart of ``simulator/engine.py``'s forward step
``memory``    device memory as measured (torch's allocator and nvidia-ml-py; device tensors on CPU)
``validate``  simulate + run + compare, one row per metric; ``report`` renders JSON and Markdown
``cli``       ``moesim validate``
"""
