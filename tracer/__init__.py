"""Stage 1: routing traces. The format (``format``), recording from HF models, importers and statistics."""

from moesim.tracer.format import (
    DECODE,
    PREFILL,
    LayerSteps,
    RecordedEngine,
    Trace,
    TraceCells,
    TraceMeta,
    TraceSource,
    TraceWriter,
    load_shape,
    read_trace,
    read_trace_meta,
    write_trace,
)

__all__ = [
    "DECODE", "PREFILL", "LayerSteps", "RecordedEngine", "Trace", "TraceCells", "TraceMeta", "TraceSource",
    "TraceWriter", "load_shape", "read_trace", "read_trace_meta", "write_trace",
]
