"""`prune.allocation: budget`: spend the pruning where it costs least per parameter, across layers and kinds.

Why: the per-layer ratios prune every layer by the same share, but layers are not equally needed. On SmolLM2 and
two real tasks, APT's budgeted search (pruning/budget.py) keeps the early layers whole and prunes the late ones hard,
and keeps LoRA's accuracy at 35% pruned where equal per-layer shares lose 15 points (docs/results.md). This module
gives Light-PEFT's planner the same allocation over its own unit scores:

- the budget: the parameter count that the per-layer ratios (`attn_ratio`, `ffn_ratio`) would keep, so a recipe's
  ratios still say how much is pruned and only where it is pruned changes;
- the blocks: KV groups (all of a group's query heads; a group's score is the sum of its heads' scores) and FFN
  neurons of every layer, in one list sorted by score / parameters (`plan_for_budget`; each layer keeps its best
  group and neuron);
- the scores must be additive estimates of what removing a unit costs the loss, so that a group's score is its
  heads' sum and scores compare across layers and kinds: first-order Taylor importance is (pruning/taylor.py). The
  masks, their movement and the activation scores (activation x output weight norm, whose scale differs between
  layers) are not, and the config refuses them with this allocation.

The random control (`prune.random`) keeps the scored plan's per-layer counts and picks random units within each
layer, so it differs from the scored plan in which units survive and in nothing else.
"""

from __future__ import annotations

import logging

import torch

from .budget import CostModel, plan_for_budget
from .scores import Scores

log = logging.getLogger(__name__)


def group_scores(head: torch.Tensor, n_kv: int) -> torch.Tensor:
    """A KV group's score: the sum of its query heads' scores (HF maps query head h to group h // (H / n_kv))."""
    return head.double().view(n_kv, -1).sum(1)


def _top(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(torch.sort(scores.double(), descending=True, stable=True).indices[:k].tolist())


def budget_units(scores: Scores, shapes: list[dict[str, int]], hidden_size: int, head_dim: int,
                 layerwise: list[tuple[list[int], list[int], list[int]]],
                 random_scores: Scores | None = None) -> tuple[list[tuple[list[int], list[int]]], list[list[int]]]:
    """Kept (query heads, KV heads) and FFN neurons per layer.

    `layerwise`: the per-layer plan at the recipe's ratios as (query heads, KV heads, FFN neurons) per layer; its
    parameter count is the budget. With `random_scores`, each layer keeps as many groups and neurons as the scored
    allocation, chosen by those scores instead.
    """
    cost = CostModel(tuple(shapes), hidden_size, head_dim)
    budget = cost.dense() - hidden_size * sum(  # the per-layer plan's count (it may thin a group's query heads)
        head_dim * (2 * (s["num_attention_heads"] - len(q)) + 2 * (s["num_key_value_heads"] - len(kv)))
        + cost.neuron_per_dim() * (s["intermediate_size"] - len(f)) for s, (q, kv, f) in zip(shapes, layerwise))
    salience = {"group": [group_scores(h, s["num_key_value_heads"]) for h, s in zip(scores.head, shapes)],
                "ffn": [f.double() for f in scores.ffn]}
    kept = plan_for_budget(salience, cost, budget / cost.dense())
    if random_scores is not None:
        kept["group"] = [_top(group_scores(h, s["num_key_value_heads"]), len(g))
                         for h, s, g in zip(random_scores.head, shapes, kept["group"])]
        kept["ffn"] = [_top(f, len(k)) for f, k in zip(random_scores.ffn, kept["ffn"])]
    heads = []
    for i, groups in enumerate(kept["group"]):
        rep = cost.rep(i)
        heads.append(([g * rep + j for g in groups for j in range(rep)], groups))
    log.info("allocation budget: %d of %d decoder parameters (the per-layer ratios' count), kept %d; KV groups per "
             "layer %s; FFN neurons per layer %s%s", budget, cost.dense(), kept["kept_params"],
             [len(g) for g in kept["group"]], [len(f) for f in kept["ffn"]],
             " (random units at the scored counts)" if random_scores is not None else "")
    return heads, kept["ffn"]
