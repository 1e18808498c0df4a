"""moesim: simulate Mixture-of-Experts expert offloading from real routing traces.

Stages live in their own subpackages: ``moesim.tracer`` (record and import routing traces),
``moesim.calib`` (hardware profiles), ``moesim.simulator`` (SimPy replay under offloading policies),
``moesim.costmodel`` (fitted predictor and configuration search), ``moesim.engine`` (a real offloading
engine for validation) and ``moesim.quality`` (perplexity under quantization and gating).
"""

__version__ = "0.1.0"
