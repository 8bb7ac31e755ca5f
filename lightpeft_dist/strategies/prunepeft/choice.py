"""Which groups one round removes: the top hybrid scores (the method), or k drawn at random (the paper's ablation).

Why random removal is a function of (seed, round) alone: every rank must remove the same groups without exchanging
anything, a resumed search must repeat the uninterrupted one's choices, and the ablation must not depend on the
criteria at all (so it does not read them) nor on torch's global RNG, which the rounds' training consumes. The
rounds still train under random removal, so its cost matches the hybrid search's and its record keeps the
criteria's values for comparison (docs/method.md, "PrunePEFT", "Ablations").
"""

from __future__ import annotations

import torch

from ...io_utils import sha256_json
from .mixing import hybrid_scores, removal
from .section import PrunePeftConfig


def round_generator(seed: int, round_no: int) -> torch.Generator:
    """A generator private to one round, seeded from (prunepeft.seed, round number) through a hash, so that nearby
    seeds or rounds do not give related streams and any integer seed (negative ones too) is accepted."""
    return torch.Generator().manual_seed(int(sha256_json({"seed": seed, "round": round_no})[:15], 16))


def random_removal(n_alive: int, k: int, seed: int, round_no: int) -> list[int]:
    """k distinct positions among the `n_alive` alive groups, uniformly at random (in the drawn order)."""
    return torch.randperm(n_alive, generator=round_generator(seed, round_no))[:k].tolist()


def round_removal(cfg: PrunePeftConfig, prunable: dict[str, torch.Tensor], partitions: list[str],
                  assigned: dict[str, list[str]], round_no: int) -> tuple[list[int], torch.Tensor | None]:
    """Positions (among the alive groups, whose partitions are `partitions`) to remove in round `round_no`
    (1-based), and the hybrid scores they came from (None for random removal)."""
    if cfg.removal == "random":
        return random_removal(len(partitions), cfg.per_round, cfg.seed, round_no), None
    mixed = hybrid_scores(prunable, partitions, assigned)
    return removal(mixed, cfg.per_round), mixed
