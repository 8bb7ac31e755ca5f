"""The six PrunePEFT criteria, per module group, as sums over the group's parameters or hooked outputs.

Every criterion is returned with one orientation: **larger = prune first** (`prunability`). The raw statistics
(`GroupStats`) are plain sums, so on several ranks they are per-rank partial sums that are all-reduced (activations)
or sums over the gathered, rank-identical adapter weights and averaged gradients (docs/method.md, "PrunePEFT").
Textbook forms, where the official code differs (docs/method.md): SNIP/Taylor is sum|g*w| (the official code uses
sum|g|*w), gradient is sum|g| per step (not |sum of signed gradients|), activation is each group's own mean output
magnitude (the official code accumulated it across groups).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# criterion -> +1: the largest value prunes first; -1: the smallest prunes first
SIGN = {"weight": -1, "zeros": +1, "threshold": +1, "activation": -1, "snip": -1, "gradient": -1}


@dataclass
class GroupStats:
    """Per-group sums (float64, one entry per group) collected over a round's steps."""

    n_params: torch.Tensor  # parameters in the group
    sq_weight: torch.Tensor  # sum w^2 (final weights)
    zeros: torch.Tensor  # count of w == 0 (final weights)
    below: torch.Tensor  # count of |w| < t (final weights)
    act_abs: torch.Tensor  # sum over steps, tokens, features of |module output|
    act_count: torch.Tensor  # tokens x features those sums cover
    grad_abs: torch.Tensor  # sum over steps of sum |g|
    snip: torch.Tensor  # sum over steps of sum |g * w|
    steps: int


def weight_stats(weights: list[list[torch.Tensor]], threshold: float) -> tuple[torch.Tensor, ...]:
    """(n_params, sum w^2, zeros, below threshold) per group from each group's full weight tensors."""
    out = torch.zeros(4, len(weights), dtype=torch.float64)
    for g, tensors in enumerate(weights):
        for w in tensors:
            w = w.detach().double()
            out[0, g] += w.numel()
            out[1, g] += (w * w).sum()
            out[2, g] += (w == 0).sum()
            out[3, g] += (w.abs() < threshold).sum()
    return tuple(out)


def values(stats: GroupStats) -> dict[str, torch.Tensor]:
    """Each criterion's value Theta per group, in the paper's form (before orientation)."""
    n = stats.n_params.clamp_min(1)
    steps = max(stats.steps, 1)
    return {
        "weight": stats.sq_weight / n,
        "zeros": stats.zeros / n,
        "threshold": stats.below / n,
        "activation": stats.act_abs / stats.act_count.clamp_min(1),
        "snip": stats.snip / n / steps,
        "gradient": stats.grad_abs / n / steps,
    }


def prunability(stats: GroupStats) -> dict[str, torch.Tensor]:
    """sigma_m * Theta_m: larger = prune first, for every criterion (the port's orientation)."""
    return {name: SIGN[name] * v for name, v in values(stats).items()}
