"""Output quality (perplexity) under expert quantization and gating, and a small trained demo MoE."""
