"""Which criteria score which partition: the official fixed table, or counts from a warm-up (docs/method.md).

Warm-up rule (the paper's section 4.1, as both reference implementations code it): each criterion's `top` most
prunable groups are counted per partition. Horizontal: every partition gets the criterion or criteria that picked
its groups most often (ties: all). Vertical: every criterion is also added to the partition(s) where it picked most
(when it picked anything). Partitions without groups on this model get nothing and are never scored.
With `partitions: none` the counts run over the one partition, where every criterion counts all its `top` choices,
so the warm-up assigns all six. `criterion` (a single-criterion search) gives every partition that one criterion.
"""

from __future__ import annotations

import torch

from .criteria import SIGN
from .mixing import ONE_PARTITION, partition_name
from .section import BANDS, DEFAULT_TABLE, PrunePeftConfig


def table_assignment(table: dict[str, dict[str, list[str]]] | None, kinds: list[str]) -> dict[str, list[str]]:
    table = table or DEFAULT_TABLE
    return {partition_name(k, b): list(table[k][b]) for k in kinds for b in BANDS}


def fixed_assignment(cfg: PrunePeftConfig, kinds: list[str]) -> dict[str, list[str]]:
    """`assignment: default`, for either partitioning: the table per kind x band; with `partitions: none` the one
    partition gets the union of the table's criteria for these kinds (in SIGN's order, so the union is the same
    whatever the table's order); with `criterion` every partition gets just that one."""
    table = table_assignment(cfg.table, kinds) if cfg.criterion is None else {}
    if cfg.partitions == "none":
        union = {m for names in table.values() for m in names}
        return {ONE_PARTITION: [cfg.criterion] if cfg.criterion else [m for m in SIGN if m in union]}
    if cfg.criterion is not None:
        return {partition_name(k, b): [cfg.criterion] for k in kinds for b in BANDS}
    return table


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
