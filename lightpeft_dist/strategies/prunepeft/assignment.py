"""Which criteria score which partition: the official fixed table, or counts from a warm-up (docs/method.md).

Warm-up rule (the paper's section 4.1, as both reference implementations code it): each criterion's `top` most
prunable groups are counted per partition. Horizontal: every partition gets the criterion or criteria that picked
its groups most often (ties: all). Vertical: every criterion is also added to the partition(s) where it picked most
(when it picked anything). Partitions without groups on this model get nothing and are never scored.
"""

from __future__ import annotations

import torch

from .criteria import SIGN
from .mixing import partition_name
from .section import BANDS, DEFAULT_TABLE


def table_assignment(table: dict[str, dict[str, list[str]]] | None, kinds: list[str]) -> dict[str, list[str]]:
    table = table or DEFAULT_TABLE
    return {partition_name(k, b): list(table[k][b]) for k in kinds for b in BANDS}


def choice_counts(prunable: dict[str, torch.Tensor], partitions: list[str], top: int) -> dict[str, dict[str, int]]:
    """criterion -> partition -> how many of its `top` most prunable groups lie there."""
    counts: dict[str, dict[str, int]] = {}
    for m in SIGN:
        order = torch.sort(prunable[m].double(), descending=True, stable=True).indices[:top].tolist()
        counts[m] = {p: 0 for p in dict.fromkeys(partitions)}
        for g in order:
            counts[m][partitions[g]] += 1
    return counts


def warmup_assignment(counts: dict[str, dict[str, int]]) -> dict[str, list[str]]:
    """Horizontal then vertical rule over the counts; criteria in the fixed order of SIGN."""
    parts = list(next(iter(counts.values())))
    chosen: dict[str, set[str]] = {p: set() for p in parts}
    for p in parts:
        best = max(counts[m][p] for m in counts)
        chosen[p].update(m for m in counts if counts[m][p] == best)
    for m, per_part in counts.items():
        best = max(per_part.values())
        if best > 0:
            for p, c in per_part.items():
                if c == best:
                    chosen[p].add(m)
    return {p: [m for m in SIGN if m in chosen[p]] for p in parts}
