"""Model families, loading, the pruned-model config, attention choice, 4-bit loading, fast paths."""
