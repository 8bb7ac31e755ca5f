"""Datasets, batching and packing."""
