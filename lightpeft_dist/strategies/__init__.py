"""Pruning strategies: each decides what to prune; the pruning kit and the pipeline do the rest."""
