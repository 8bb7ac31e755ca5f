"""Specification of the planner: exact counts, scopes, GQA validity, uniform shapes, determinism, bad ratios."""

from __future__ import annotations

import pytest
import torch

from lightpeft_dist.config import PruneConfig, recipe_from_dict
from lightpeft_dist.errors import LightPeftError
from lightpeft_dist.pruning.plan import choose_heads, head_shapes, make_plan, plan_ffn, plan_peft
from lightpeft_dist.pruning.scores import Scores


def shapes(n_layers=3, heads=8, kv=8, ffn=20):
    return [{"num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": ffn}] * n_layers


def scores_for(shape_list, seed=0, modules=4, r=4):
    g = torch.Generator().manual_seed(seed)
    return Scores(head=[torch.rand(s["num_attention_heads"], generator=g) for s in shape_list],
                  ffn=[torch.rand(s["intermediate_size"], generator=g) for s in shape_list],
                  module={f"m{i}": float(torch.rand(1, generator=g)) for i in range(modules)},
                  rank={f"m{i}": torch.rand(r, generator=g) for i in range(modules)})


def plan(shape_list, scores=None, **cfg):
    return make_plan(scores or scores_for(shape_list), shape_list, PruneConfig(**cfg), "fp", 64, 8)


@pytest.mark.parametrize("ratio,n,expect_pruned", [(0.25, 8, 2), (1 / 3, 16, 5), (0.5, 20, 10), (0.0, 8, 0),
                                                   (0.3, 10, 3)])
def test_layerwise_counts_are_round_ratio_n(ratio, n, expect_pruned):
    p = plan(shapes(heads=n, kv=n, ffn=n), attn_ratio=ratio, ffn_ratio=ratio, ffn_scope="layerwise")
    for layer in p["layers"]:
        assert len(layer["q_heads"]) == n - expect_pruned
        assert len(layer["ffn"]) == n - expect_pruned


def test_global_ffn_prunes_exact_total_and_differs_from_layerwise():
    sh = shapes(n_layers=3, ffn=20)
    sc = scores_for(sh)
    sc.ffn[0] = sc.ffn[0] * 0.1  # layer 0 is much less important: global ranking should take most from it
    g = plan(sh, sc, ffn_ratio=0.3, ffn_scope="global")
    lw = plan(sh, sc, ffn_ratio=0.3, ffn_scope="layerwise")
    assert sum(len(lay["ffn"]) for lay in g["layers"]) == 60 - 18
    assert [len(lay["ffn"]) for lay in lw["layers"]] == [14, 14, 14]
    assert len(g["layers"][0]["ffn"]) < 14 < len(g["layers"][1]["ffn"])
    # global keeps exactly the top-42 scores overall
    flat = torch.cat(sc.ffn)
    kept = torch.cat([torch.tensor(lay["ffn"]) + 20 * i for i, lay in enumerate(g["layers"])])
    assert set(kept.tolist()) == set(torch.topk(flat, 42).indices.tolist())


def test_global_never_empties_a_layer_and_keeps_total_exact():
    sh = shapes(n_layers=2, ffn=10)
    sc = scores_for(sh)
    sc.ffn[0] = torch.zeros(10) - 1  # every neuron of layer 0 is worse than any of layer 1
    p = plan(sh, sc, ffn_ratio=0.6, ffn_scope="global")
    assert len(p["layers"][0]["ffn"]) == 1
    assert sum(len(lay["ffn"]) for lay in p["layers"]) == 20 - 12


def test_ties_break_toward_lower_index_and_plans_are_deterministic():
    sh = shapes(n_layers=1, heads=4, kv=4, ffn=6)
    sc = Scores(head=[torch.ones(4)], ffn=[torch.ones(6)], module={"a": 1.0, "b": 1.0}, rank={"a": torch.ones(2),
                                                                                               "b": torch.ones(2)})
    p = plan(sh, sc, attn_ratio=0.5, ffn_ratio=0.5, ffn_scope="layerwise", module_ratio=0.5, rank_ratio=0.5)
    assert p["layers"][0]["q_heads"] == [0, 1]
    assert p["layers"][0]["ffn"] == [0, 1, 2]
    assert p["peft_modules"] == {"a": [0]}
    assert plan(sh, sc, attn_ratio=0.5)["hash"] == plan(sh, sc, attn_ratio=0.5)["hash"]


def test_gqa_plan_keeps_equal_query_heads_per_kept_kv_group():
    # SmolLM2 layout: 9 query heads in 3 KV groups
    for seed in range(20):
        s = torch.rand(9, generator=torch.Generator().manual_seed(seed))
        q, kv = choose_heads(s, 3, 1 / 3)
        assert len(q) == 6
        per_group = {g: [h for h in q if h // 3 == g] for g in kv}
        assert sorted({h // 3 for h in q}) == kv
        assert len({len(v) for v in per_group.values()}) == 1


def test_gqa_rule_picks_the_shape_the_scores_favour():
    # group 2 worthless: dropping the whole group beats thinning every group
    s = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    assert choose_heads(s, 3, 1 / 3) == ([0, 1, 2, 3, 4, 5], [0, 1])
    # one weak head per group: thinning beats dropping a group
    s = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    assert choose_heads(s, 3, 1 / 3) == ([0, 1, 3, 5, 7, 8], [0, 1, 2])


def test_gqa_uneven_target_takes_nearest_valid_count():
    assert head_shapes(9, 3, 5) == [(2, 3), (3, 2)]  # counts 4 and 6 are both 1 away: more heads kept
    assert head_shapes(8, 2, 7) == [(2, 4)]  # 8 and 6 both 1 away from 7: more heads kept


def test_uniform_plan_has_one_shape_everywhere():
    sh = shapes(n_layers=4, heads=6, kv=2, ffn=12)
    p = plan(sh, attn_ratio=0.5, ffn_ratio=0.25, uniform=True, ffn_scope="global")
    layer_shapes = {(len(lay["q_heads"]), len(lay["kv_heads"]), len(lay["ffn"])) for lay in p["layers"]}
    assert len(layer_shapes) == 1 and p["summary"]["uniform"]
    assert layer_shapes.pop()[2] == 9


def test_module_and_rank_pruning_counts():
    sc = scores_for(shapes(), modules=8, r=4)
    peft = plan_peft(sc.module, sc.rank, PruneConfig(module_ratio=0.75, rank_ratio=0.5, rank_scope="layerwise"))
    assert len(peft) == 2 and all(len(r) == 2 for r in peft.values())
    top2 = sorted(sc.module, key=sc.module.get, reverse=True)[:2]
    assert sorted(peft) == sorted(top2)
    glob = plan_peft(sc.module, sc.rank, PruneConfig(module_ratio=0.0, rank_ratio=0.5, rank_scope="global"))
    assert sum(len(r) for r in glob.values()) == 16


def test_global_rank_pruning_can_drop_a_whole_module():
    rank = {"weak": torch.zeros(4), "strong": torch.ones(4)}
    peft = plan_peft({"weak": 1.0, "strong": 1.0}, rank, PruneConfig(module_ratio=0.0, rank_ratio=0.5))
    assert peft == {"strong": [0, 1, 2, 3]}


def test_random_control_differs_from_scored_plan_but_has_same_counts():
    sh = shapes()
    sc = scores_for(sh, seed=7)
    a, b = plan(sh, sc, attn_ratio=0.5, ffn_ratio=0.5), plan(sh, sc, attn_ratio=0.5, ffn_ratio=0.5, random=True)
    assert a["layers"] != b["layers"]
    assert a["summary"]["after"] == b["summary"]["after"]


def test_plan_ffn_layerwise_never_empty():
    assert [len(k) for k in plan_ffn([torch.rand(3)], 0.99, "layerwise")] == [1]


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_ratios_outside_unit_interval_are_rejected(bad):
    with pytest.raises(ValueError):
        PruneConfig(attn_ratio=bad)
    with pytest.raises(LightPeftError, match=r"prune\.ffn_ratio.*outside \[0, 1\)"):
        recipe_from_dict({"model": {"path": "m"}, "data": {"format": "text", "train_file": "t"},
                          "prune": {"ffn_ratio": bad}})


def spread(n: int, k: int = 7) -> torch.Tensor:
    """Distinct scores in a scrambled order, the same on every torch version (no RNG)."""
    return torch.tensor([float((k * i) % n) + 0.01 * i for i in range(n)])


def test_default_plan_is_unchanged_by_multiple_of():
    """`prune.multiple_of` off (1) plans byte-for-byte as before it existed: same layers, same hash (pinned)."""
    sh = shapes(n_layers=3, heads=6, kv=2, ffn=40)
    sc = Scores(head=[spread(6, 5), spread(6, 1), spread(6, 5).flip(0)], ffn=[spread(40), spread(40, 3), spread(40, 9)],
                module={"a": 0.3, "b": 0.7}, rank={"a": spread(4, 3), "b": spread(4)})
    default = plan(sh, sc)
    assert "multiple_of" not in default["prune"] and plan(sh, sc, multiple_of=1) == default
    assert default["hash"] == "aad0fa6ded54ae43"  # computed before multiple_of existed


@pytest.mark.parametrize("scope", ["global", "layerwise"])
@pytest.mark.parametrize("multiple", [8, 16])
def test_multiple_of_rounds_every_layers_ffn_and_keeps_its_top_units(scope, multiple):
    sh = [{"num_attention_heads": 8, "num_key_value_heads": 8, "intermediate_size": n} for n in (40, 64, 100)]
    sc = scores_for(sh, seed=3)
    sc.ffn[0] = sc.ffn[0] * 0.2  # global scope then takes more from layer 0
    p = plan(sh, sc, ffn_ratio=0.3, ffn_scope=scope, multiple_of=multiple)
    exact = plan(sh, sc, ffn_ratio=0.3, ffn_scope=scope)
    assert p["prune"]["multiple_of"] == multiple and p["hash"] != exact["hash"]
    for layer, exact_layer, s in zip(p["layers"], exact["layers"], sc.ffn):
        kept = layer["ffn"]
        assert len(kept) % multiple == 0 and 0 < len(kept) <= s.numel()
        assert abs(len(kept) - len(exact_layer["ffn"])) <= multiple / 2  # the nearest multiple
        assert kept == sorted(torch.topk(s, len(kept)).indices.tolist())  # the top-scored units of the layer


def test_round_to_multiple():
    from lightpeft_dist.pruning.plan import round_to_multiple

    assert round_to_multiple(90, 128, 32) == 96  # nearest
    assert round_to_multiple(48, 128, 32) == 64  # halves up
    assert round_to_multiple(10, 128, 32) == 32  # at least one multiple
    assert round_to_multiple(97, 100, 64) == 64  # never above the layer's width
    assert round_to_multiple(15, 20, 32) == 20  # a layer narrower than the multiple stays whole
    assert round_to_multiple(26, 40, 1) == 26


def test_multiple_of_rounds_kv_groups_when_head_dim_needs_it(caplog):
    # head_dim 8: widths of 32 need KV groups in fours
    sh = shapes(n_layers=2, heads=16, kv=8, ffn=32)
    p = plan(sh, attn_ratio=0.3, multiple_of=32)
    for layer in p["layers"]:
        assert len(layer["kv_heads"]) in (4, 8) and len(layer["q_heads"]) == 8  # 11 asked: 4x2 or 8x1 nearest
    heads = lambda p: [(lay["q_heads"], lay["kv_heads"]) for lay in p["layers"]]  # noqa: E731
    assert heads(plan(sh, attn_ratio=0.3, multiple_of=8)) == heads(plan(sh, attn_ratio=0.3))  # head_dim 8 fits
    with caplog.at_level("WARNING", logger="lightpeft_dist.pruning.plan"):
        few = plan(shapes(n_layers=1, heads=6, kv=2, ffn=32), attn_ratio=0.3, multiple_of=32)  # 2 groups < 4
    assert "not rounded" in caplog.text
    assert heads(few) == heads(plan(shapes(n_layers=1, heads=6, kv=2, ffn=32), attn_ratio=0.3))


@pytest.mark.parametrize("bad", [0, -32])
def test_multiple_of_below_one_is_rejected(bad):
    with pytest.raises(LightPeftError, match=r"prune\.multiple_of.*greater than or equal to 1"):
        recipe_from_dict({"model": {"path": "m"}, "data": {"format": "text", "train_file": "t"},
                          "prune": {"multiple_of": bad}})


def test_random_control_keeps_the_scored_peft_choices_unless_random_peft():
    sh = shapes()
    sc = scores_for(sh, seed=7, modules=8, r=4)
    scored = plan(sh, sc, attn_ratio=0.5, ffn_ratio=0.5)
    units = plan(sh, sc, attn_ratio=0.5, ffn_ratio=0.5, random=True)
    both = plan(sh, sc, attn_ratio=0.5, ffn_ratio=0.5, random=True, random_peft=True)
    assert units["peft_modules"] == scored["peft_modules"]
    assert both["peft_modules"] != scored["peft_modules"]
    assert units["layers"] != scored["layers"] and units["layers"] == both["layers"]  # the same unit noise
    assert units["summary"]["after"] == scored["summary"]["after"]
    with pytest.raises(ValueError, match="random_peft .* set random: true"):
        PruneConfig(random_peft=True)


def test_random_peft_keeps_the_old_random_plan_and_its_key():
    """Before random_peft existed, prune.random randomised the PEFT choices too: random + random_peft is that plan,
    byte for byte (hash pinned before the change) with the same cache key; random alone is a new plan and key."""
    from lightpeft_dist.keys import without_later_defaults

    sh = shapes(n_layers=3, heads=6, kv=2, ffn=40)
    sc = Scores(head=[spread(6, 5), spread(6, 1), spread(6, 5).flip(0)], ffn=[spread(40), spread(40, 3), spread(40, 9)],
                module={"a": 0.3, "b": 0.7, "c": 0.5}, rank={"a": spread(4, 3), "b": spread(4), "c": spread(4, 1)})
    old = plan(sh, sc, random=True, random_peft=True, module_ratio=0.34)
    assert old["hash"] == "52f22028a9c7d8a3" and "random_peft" not in old["prune"]
    new = plan(sh, sc, random=True, module_ratio=0.34)
    assert new["prune"]["random_peft"] is False and new["hash"] != old["hash"]
    assert new["peft_modules"] == plan(sh, sc, module_ratio=0.34)["peft_modules"] != old["peft_modules"]
    key = lambda **kw: without_later_defaults("prune", PruneConfig(**kw).model_dump(mode="json"))  # noqa: E731
    assert "random_peft" not in key() and "random_peft" not in key(random=True, random_peft=True)
    assert key(random=True)["random_peft"] is False


def test_normalised_global_ffn_ranking_ignores_a_layers_score_scale():
    sh = shapes(n_layers=3, ffn=20)
    sc = scores_for(sh, seed=5)
    scaled = Scores(head=sc.head, ffn=[sc.ffn[0], sc.ffn[1] * 100.0, sc.ffn[2]], module=sc.module, rank=sc.rank)
    kept = lambda p: [lay["ffn"] for lay in p["layers"]]  # noqa: E731
    norm, norm_scaled = (plan(sh, s, ffn_ratio=0.4, ffn_scope="global_normalized") for s in (sc, scaled))
    assert kept(norm) == kept(norm_scaled)
    assert sum(len(k) for k in kept(norm)) == 60 - 24  # the total stays exact
    assert len({len(k) for k in kept(norm)}) > 1  # still a global ranking: layers keep different counts
    glob, glob_scaled = (plan(sh, s, ffn_ratio=0.4, ffn_scope="global") for s in (sc, scaled))
    assert kept(glob) != kept(glob_scaled)
    assert len(kept(glob_scaled)[1]) == 20  # plain global ranking spends nothing on the loud layer
    assert "ffn_scope" in norm["prune"] and norm["hash"] != glob["hash"]
