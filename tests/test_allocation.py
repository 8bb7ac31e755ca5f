"""Specification of `prune.allocation: budget` (lightpeft_dist/pruning/allocation.py): the per-layer ratios' parameter
count, spent across layers and kinds by Taylor score per parameter; its random control keeps the scored per-layer
counts; the plan slices like any other (masked == pruned)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from lightpeft_dist.config import PruneConfig
from lightpeft_dist.pruning.budget import CostModel
from lightpeft_dist.pruning.plan import make_plan, prunable_params
from lightpeft_dist.pruning.scores import Scores

# 4 layers, GQA 6 query heads in 2 KV groups, 16 FFN neurons, hidden 12, head_dim 2
SHAPES = [{"num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 16} for _ in range(4)]
HIDDEN, HEAD_DIM = 12, 2
BUDGET = dict(attn_ratio=0.5, ffn_ratio=0.4, module_ratio=0.0, rank_ratio=0.0, ffn_scope="layerwise", unit_scores="taylor",
              allocation="budget")


def scores(layer_scale=(1.0, 1.0, 1.0, 1.0), seed: int = 0) -> Scores:
    g = torch.Generator().manual_seed(seed)
    return Scores(head=[c * torch.rand(6, generator=g) for c in layer_scale],
                  ffn=[c * torch.rand(16, generator=g) for c in layer_scale],
                  module={"m0": 1.0, "m1": 0.5}, rank={"m0": torch.rand(4, generator=g), "m1": torch.rand(4, generator=g)})


def plan(s: Scores, shapes=SHAPES, **cfg):
    return make_plan(s, shapes, PruneConfig(**{**BUDGET, **cfg}), "fp", HIDDEN, HEAD_DIM)


def kept_params(p: dict) -> int:
    return p["summary"]["prunable_params_after"]


def test_budget_keeps_at_most_the_per_layer_plans_count_and_within_one_block():
    s = scores(seed=3)
    layerwise, budget = plan(s, allocation="layerwise"), plan(s)
    biggest_block = CostModel(tuple(SHAPES), HIDDEN, HEAD_DIM).group_per_dim(0) * HIDDEN
    assert kept_params(layerwise) - biggest_block < kept_params(budget) <= kept_params(layerwise)
    assert prunable_params(SHAPES, HIDDEN, HEAD_DIM) > kept_params(layerwise)


def test_budget_prunes_the_layer_whose_units_matter_least():
    # layer 2's units all score 100x lower: the budget plan takes its pruning there first; per-layer ratios cannot
    s = scores((1.0, 1.0, 0.01, 1.0))
    budget, layerwise = plan(s), plan(s, allocation="layerwise")
    ffn = [len(lp["ffn"]) for lp in budget["layers"]]
    assert ffn[2] == 1 and len(budget["layers"][2]["kv_heads"]) == 1  # emptied down to the one unit each layer keeps
    assert min(ffn[i] for i in (0, 1, 3)) > ffn[2]
    assert len({len(lp["ffn"]) for lp in layerwise["layers"]}) == 1


def test_budget_keeps_whole_kv_groups_and_is_scale_invariant():
    s = scores(seed=5)
    p = plan(s)
    for lp in p["layers"]:
        assert lp["q_heads"] == [g * 3 + j for g in lp["kv_heads"] for j in range(3)]
    scaled = Scores([7.0 * h for h in s.head], [7.0 * f for f in s.ffn], s.module, s.rank)
    assert plan(scaled)["layers"] == p["layers"]


# SmolLM2's head layout, 9 query heads in 3 KV groups: the per-layer plan at 6 heads can keep 2 groups of 3 or 3 of
# 2, so the scored and the random per-layer plans may differ in parameter count; the budget is the scored one's
SHAPES_9_3 = [{"num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 16} for _ in range(4)]


@pytest.mark.parametrize("shapes", [SHAPES, SHAPES_9_3])
def test_random_control_keeps_the_scored_counts_and_peft_choices_but_not_the_units(shapes):
    g = torch.Generator().manual_seed(7)
    s = scores((1.0, 0.3, 0.1, 1.0), seed=7)
    s.head = [c * torch.rand(sh["num_attention_heads"], generator=g) for c, sh in zip((1.0, 0.3, 0.1, 1.0), shapes)]
    scored, rnd = plan(s, shapes, attn_ratio=0.34), plan(s, shapes, attn_ratio=0.34, random=True, seed=11)
    counts = lambda p: [(len(lp["kv_heads"]), len(lp["ffn"])) for lp in p["layers"]]  # noqa: E731
    assert counts(rnd) == counts(scored) and kept_params(rnd) == kept_params(scored)
    assert rnd["peft_modules"] == scored["peft_modules"]
    assert [lp["ffn"] for lp in rnd["layers"]] != [lp["ffn"] for lp in scored["layers"]]
    assert rnd["hash"] != scored["hash"] and plan(s, shapes, attn_ratio=0.34, random=True, seed=11)["hash"] == rnd["hash"]


def test_layerwise_plans_keep_their_old_prune_record_and_hash():
    cfg = {k: v for k, v in BUDGET.items() if k != "allocation"}
    p = make_plan(scores(), SHAPES, PruneConfig(**cfg), "fp", HIDDEN, HEAD_DIM)
    assert "allocation" not in p["prune"]  # plans made before the option hash as they did
    assert plan(scores())["prune"]["allocation"] == "budget"


@pytest.mark.parametrize("bad, needle", [({"unit_scores": "masks"}, "unit_scores: taylor"),
                                         ({"unit_scores": "activation"}, "unit_scores: taylor"),
                                         ({"uniform": True}, "allocation: layerwise"),
                                         ({"multiple_of": 64}, "allocation: layerwise")])
def test_budget_refuses_what_it_cannot_honour(bad, needle):
    with pytest.raises(ValidationError, match=needle):
        PruneConfig(**{**BUDGET, **bad})


@pytest.mark.parametrize("layout", ["llama-gqa", "qwen2-bias"])
def test_budget_plan_masked_equals_pruned(tmp_path, layout):
    """A budget plan has different widths per layer; slicing it gives the masked model's logits (with the adapter)."""
    from peft import PeftModel

    from conftest import prune_and_reload
    from test_prune_equivalence import INPUT, build, masked_twin

    base_dir, peft_model, p = build(tmp_path, layout, PruneConfig(**{**BUDGET, "rank_ratio": 0.5}))
    widths = {(len(lp["q_heads"]), len(lp["ffn"])) for lp in p["layers"]}
    assert len(widths) > 1 and p["summary"]["prunable_fraction_pruned"] > 0.2
    masked, _ = masked_twin(peft_model, p)
    pruned, adapter = prune_and_reload(base_dir, p, peft_model.config, tmp_path / "adapter", tmp_path)
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(pruned, adapter).eval()(INPUT).logits
    assert torch.allclose(adapted, masked, atol=1e-4), (adapted - masked).abs().max()
