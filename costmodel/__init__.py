"""Stage 4: fitted cost model and configuration search."""
