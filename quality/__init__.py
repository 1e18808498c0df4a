"""Output quality (perplexity) under expert quantization and gating, and a small trained demo MoE.

The quality table is the interface to the rest of moesim (cost model, ``moesim search --max-ppl``)::

    from moesim.quality import load_quality_table, lookup_perplexity
    table = load_quality_table("quality.json")
    ppl = lookup_perplexity(table, "demo-model", expert_bits=4, group_size=64, gating=0.0, top_k=None)

Importing this package does not import torch; the measuring modules do.
"""

from moesim.quality.table import (
    QualityRow,
    QualityTable,
    load_quality_table,
    lookup_perplexity,
    lookup_row,
    write_quality_table,
)

__all__ = ["QualityRow", "QualityTable", "load_quality_table", "lookup_perplexity", "lookup_row",
           "write_quality_table"]
