"""APT's parameter cost model and its budgeted block selection (docs/method.md, "APT").

Why: APT prunes to a parameter budget, not to per-kind ratios. Blocks of every kind (KV groups, FFN neurons and,
when hidden-dimension pruning is on, hidden dimensions) compete in one list sorted by salience per parameter, and
the largest prefix whose kept model fits the budget survives. The cost model counts exactly the parameters of the
decoder layers (projection weights and biases, the two norms per layer, the final norm); embeddings and the LM head
are not counted, as in the reference, unless hidden dimensions are pruned: then they shrink with the hidden width and
the count (and so the budget) covers the whole model, a hidden dimension costing its embedding row and its LM head
column when untied (`CostModel.embedding`). With hidden dimensions kept at d', the count is d' * A + B, where A (per
hidden dimension) and B (biases that do not scale with d') are sums over the kept blocks, so the count of a prefix
is monotone in its length and a binary search finds the largest prefix under the budget.

`plan_for_budget` is the one entry point a pruning schedule calls, once (one-shot) or at every checkpoint (gradual):
it takes the current blocks' salience and the current shapes and returns the blocks to keep.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import LightPeftError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CostModel:
    """Parameter counts of a LLaMA-family model's decoder layers (GQA allowed; widths may differ per layer).

    `shapes`: per layer num_attention_heads, num_key_value_heads, intermediate_size; `biases`: which projections
    carry biases ({"qkv", "o", "mlp"}, e.g. Qwen2's q/k/v). `embedding`: parameters per hidden dimension outside
    the decoder, counted only when hidden dimensions are pruned (vocab size, twice that with an untied LM head; 0: the
    decoder-only count).
    """

    shapes: tuple[dict, ...]
    hidden_size: int
    head_dim: int
    biases: frozenset[str] = frozenset()
    embedding: int = 0
    head_norms: bool = False  # Qwen3's q_norm / k_norm: 2 x head_dim per layer, whatever is pruned

    def rep(self, i: int) -> int:
        s = self.shapes[i]
        return s["num_attention_heads"] // s["num_key_value_heads"]

    # one block's share of the count, at hidden width d
    def group_per_dim(self, i: int) -> int:
        return self.head_dim * (2 * self.rep(i) + 2)  # q, o: rep heads; k, v: one head

    def group_fixed(self, i: int) -> int:
        return self.head_dim * (self.rep(i) + 2) if "qkv" in self.biases else 0

    def neuron_per_dim(self) -> int:
        return 3

    def neuron_fixed(self) -> int:
        return 2 if "mlp" in self.biases else 0  # gate and up biases

    def layer_fixed(self) -> int:
        return 2 * self.head_dim if self.head_norms else 0

    def layer_per_dim(self) -> int:
        return 2 + ("o" in self.biases) + ("mlp" in self.biases)  # two norms, o_proj and down_proj biases

    def count(self, groups: list[int], neurons: list[int], hidden: int) -> int:
        """Parameters of the decoder with `groups[i]` KV groups and `neurons[i]` FFN neurons in layer i and `hidden`
        hidden dimensions."""
        per_dim = 1 + self.embedding + sum(self.layer_per_dim() + g * self.group_per_dim(i) + f * self.neuron_per_dim()
                          for i, (g, f) in enumerate(zip(groups, neurons, strict=True)))
        fixed = sum(self.layer_fixed() + g * self.group_fixed(i) + f * self.neuron_fixed()
                    for i, (g, f) in enumerate(zip(groups, neurons, strict=True)))
        return hidden * per_dim + fixed

    def dense(self) -> int:
        return self.count([s["num_key_value_heads"] for s in self.shapes],
                          [s["intermediate_size"] for s in self.shapes], self.hidden_size)


def _order(values: torch.Tensor) -> torch.Tensor:
    return torch.sort(values.double(), descending=True, stable=True).indices


def plan_for_budget(salience: dict[str, list[torch.Tensor]], cost: CostModel, density: float,
                    reference_params: int | None = None) -> dict:
    """The blocks to keep so that the decoder's parameter count is at most `density` x `reference_params` (default:
    the current dense count; a gradual schedule passes the original model's count after physical prunes).

    `salience`: "group" and "ffn" (and optionally "hidden": one tensor of d scores) per layer. Each layer keeps its
    best group and neuron whatever the budget (a layer is never emptied, docs/method.md); the other blocks are sorted
    by salience / cost (ties: lower layer and index first) and the largest prefix within the budget is kept.
    Returns kept indices per layer ("group", "ffn"), "hidden" (kept dims, or None), and the counts.
    """
    if not 0.0 < density <= 1.0:
        raise LightPeftError(f"target density {density} is outside (0, 1]")
    n_layers = len(cost.shapes)
    hidden_scores = salience.get("hidden")
    d = cost.hidden_size
    target = int(density * (reference_params if reference_params is not None else cost.dense()))
    # candidates: (kind code, layer, index, per-dim cost a, fixed cost b, density rho); 0 group, 1 neuron, 2 hidden
    kinds, layers, index, per_dim, fixed, rho = [], [], [], [], [], []
    forced = {"group": [], "ffn": []}
    for code, kind in enumerate(("group", "ffn")):
        for i, s in enumerate(salience[kind]):
            a = cost.group_per_dim(i) if kind == "group" else cost.neuron_per_dim()
            b = cost.group_fixed(i) if kind == "group" else cost.neuron_fixed()
            ratio = s.double() / (d * a + b)
            best = int(_order(ratio)[0])
            forced[kind].append(best)
            rest = [j for j in range(s.numel()) if j != best]
            kinds += [code] * len(rest)
            layers += [i] * len(rest)
            index += rest
            per_dim += [a] * len(rest)
            fixed += [b] * len(rest)
            rho.append(ratio[rest])
    per_dim_forced = 1 + cost.embedding + sum(cost.layer_per_dim() + cost.group_per_dim(i) + cost.neuron_per_dim()
                             for i in range(n_layers))
    fixed_forced = sum(cost.layer_fixed() + cost.group_fixed(i) + cost.neuron_fixed() for i in range(n_layers))
    hidden_forced = d
    if hidden_scores is not None:
        per_hidden = cost.dense() // d  # a hidden dimension's cost at the current widths (its density denominator)
        best = int(_order(hidden_scores)[0])
        rest = [j for j in range(d) if j != best]
        kinds += [2] * len(rest)
        layers += [-1] * len(rest)
        index += rest
        per_dim += [0] * len(rest)
        fixed += [0] * len(rest)
        rho.append(hidden_scores.double()[rest] / per_hidden)
        hidden_forced, forced["hidden"] = 1, [best]
    rho_all = torch.cat(rho) if rho else torch.zeros(0, dtype=torch.float64)
    order = _order(rho_all)
    kinds_t = torch.tensor(kinds, dtype=torch.long)[order]
    a = torch.tensor(per_dim, dtype=torch.float64)[order]
    b = torch.tensor(fixed, dtype=torch.float64)[order]
    # count after keeping the forced blocks and the first i sorted ones, i = 0..n (exact in float64 below 2^53)
    zero = torch.zeros(1, dtype=torch.float64)
    dims = hidden_forced + torch.cat([zero, torch.cumsum((kinds_t == 2).double(), 0)])
    counts = dims * (per_dim_forced + torch.cat([zero, torch.cumsum(a, 0)])) + fixed_forced + \
        torch.cat([zero, torch.cumsum(b, 0)])
    n_keep = int(torch.searchsorted(counts, torch.tensor([float(target)], dtype=torch.float64), right=True)) - 1
    if n_keep < 0:
        log.warning("APT budget %d is below the smallest model that keeps one KV group and one FFN neuron per layer "
                    "(%d parameters); keeping that", target, int(counts[0]))
        n_keep = 0
    keep = {"group": [{f} for f in forced["group"]], "ffn": [{f} for f in forced["ffn"]],
            "hidden": set(forced.get("hidden", []))}
    for j in order[:n_keep].tolist():
        kind = ("group", "ffn", "hidden")[kinds[j]]
        (keep[kind] if kind == "hidden" else keep[kind][layers[j]]).add(index[j])
    kept_params = int(counts[n_keep])
    out = {"group": [sorted(k) for k in keep["group"]], "ffn": [sorted(k) for k in keep["ffn"]],
           "hidden": sorted(keep["hidden"]) if hidden_scores is not None else None,
           "target_params": target, "kept_params": kept_params, "dense_params": cost.dense(),
           "density": kept_params / (reference_params or cost.dense()),
           "next_block_params": int(counts[n_keep + 1] - counts[n_keep]) if n_keep + 1 < len(counts) else 0}
    hidden_kept = d if out["hidden"] is None else len(out["hidden"])
    assert cost.count([len(g) for g in out["group"]], [len(f) for f in out["ffn"]], hidden_kept) == kept_params
    return out
