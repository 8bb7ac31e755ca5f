"""Summary tables, plots and cross-run comparisons."""
