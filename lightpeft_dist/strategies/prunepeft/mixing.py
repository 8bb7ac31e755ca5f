"""Partitions (module kind x depth band) and the hybrid score: a rank-weighted softmax per partition.

Port's form (docs/method.md, "PrunePEFT"): inside a partition b with assigned criteria C_b, for each m in C_b,
rank_m(g) is g's position in m's prune-first order over b's groups (0 = most prunable), w = 5 / (1 + e^(rank - 3)),
soft_m(g) = softmax over b's groups of sigma_m * Theta_m. S(g) = (1/|C_b|) * sum_m w_m(g) * soft_m(g); the 1/|C_b|
is our change (a partition with more criteria would otherwise get larger scores). All partitions are then sorted
together, descending, ties toward the lower group index; the first k are removed. `partitions: none` (an ablation)
puts every group in one partition, so ranks and softmax run over all groups at once.
"""

from __future__ import annotations

import torch

from .section import BANDS

EDGES = (0.2, 0.5, 0.8)


def band_of(layer: int, n_layers: int) -> str:
    """Depth band of a layer: relative depth layer / n_layers below 20, 50, 80 percent, else the top band."""
    depth = layer / n_layers
    for edge, band in zip(EDGES, BANDS):
        if depth < edge:
            return band
    return BANDS[-1]


def rank_weight(rank: torch.Tensor) -> torch.Tensor:
    return 5.0 / (1.0 + torch.exp(rank.double() - 3.0))


def prune_first_rank(v: torch.Tensor) -> torch.Tensor:
    """Position of each entry in descending order of v (0 = largest = most prunable); ties: lower index first."""
    order = torch.sort(v.double(), descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(v.numel())
    return rank


def hybrid_scores(prunable: dict[str, torch.Tensor], partitions: list[str],
                  assigned: dict[str, list[str]]) -> torch.Tensor:
    """S(g) per group (float64). `prunable[m]`: sigma_m * Theta_m over all groups; `partitions[g]`: g's partition;
    `assigned[partition]`: its criteria."""
    n = len(partitions)
    out = torch.zeros(n, dtype=torch.float64)
    for part in dict.fromkeys(partitions):
        idx = torch.tensor([g for g in range(n) if partitions[g] == part])
        crits = assigned[part]
        for m in crits:
            v = prunable[m].double()[idx]
            out[idx] += rank_weight(prune_first_rank(v)) * torch.softmax(v, dim=0) / len(crits)
    return out


def removal(scores: torch.Tensor, k: int) -> list[int]:
    """The k groups to remove: highest hybrid score first, ties toward the lower index."""
    return torch.sort(scores, descending=True, stable=True).indices[:k].tolist()


def partition_name(kind: str, band: str) -> str:
    return f"{kind}/{band}"


ONE_PARTITION = "all"  # `partitions: none`: every group in one partition


def group_partitions(kinds_layers: list[tuple[str, int]], n_layers: int, mode: str = "kind_band") -> list[str]:
    """Each group's partition from its (kind, layer): kind x depth band, or the one partition of `partitions: none`
    (hybrid without partitions: ranks and softmax then run over all groups at once)."""
    if mode == "none":
        return [ONE_PARTITION] * len(kinds_layers)
    return [partition_name(kind, band_of(layer, n_layers)) for kind, layer in kinds_layers]
