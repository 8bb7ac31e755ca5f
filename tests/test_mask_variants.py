"""Specification of the estimate's mask variants (docs/method.md, "Mask variants"): each is off by default and then
keeps every earlier cache key; each, switched on, changes exactly what it claims to.

- estimate.mask_warmup_steps: the mask groups' LR ramps up (step 0 uses 1/W of it), the PEFT group's does not;
- estimate.l1_per_mask: the L1 term is lambda x mean|m| instead of lambda x sum|m|;
- estimate.loss_on: all_tokens: the estimation loss is the cross-entropy over every real token, by hand;
- prune.unit_scores: movement: sum over steps of |delta m|, recorded at every step.
The end-to-end checks use one-step estimates: at step 0 the LoRA B matrices are 0 and the masks 1, so the model is
the base model and the first recorded loss can be computed by hand; and AdamW's first step moves every mask by
exactly its LR (g / |g|), so the warm-up shows in the mask values themselves.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from lightpeft_dist.cli import main
from lightpeft_dist.config import EstimateConfig, recipe_from_dict, recipe_to_dict
from lightpeft_dist.io_utils import sha256_json
from lightpeft_dist.models.loading import load_model, load_tokenizer
from lightpeft_dist.pruning.movement import MovementTracker
from lightpeft_dist.pruning.scores import load_scores
from lightpeft_dist.runtime import current
from lightpeft_dist.strategies.lightpeft import estimate_key, estimate_schedule, mask_lrs
from lightpeft_dist.training.loop import train_batches
from conftest import tiny_recipe_dict

NEW = ("mask_warmup_steps", "l1_per_mask", "loss_on")


def test_variants_off_keep_the_estimate_key_of_earlier_runs(tmp_path):
    recipe = recipe_from_dict(tiny_recipe_dict(tmp_path))
    d = recipe_to_dict(recipe)
    before = {k: d[k] for k in ("model", "data", "peft")}
    before["estimate"] = {k: v for k, v in d["estimate"].items() if k not in NEW}  # what runs before them hashed
    assert estimate_key(recipe) == sha256_json(before)[:16]
    keys = {estimate_key(recipe)}
    for field, value in (("mask_warmup_steps", 3), ("l1_per_mask", True), ("loss_on", "all_tokens")):
        keys.add(estimate_key(recipe.model_copy(update={"estimate": recipe.estimate.model_copy(
            update={field: value})})))
    assert len(keys) == 4


def test_mask_warmup_ramps_the_mask_groups_only():
    cfg = EstimateConfig(steps=8, lr=1e-2, mask_lr_coef=2.0, mask_warmup_steps=4)
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr, "name": name}
              for name, lr in (("peft", 1e-2), ("head_masks", 2e-2), ("ffn_masks", 2e-2))]
    opt = torch.optim.AdamW(groups)
    sched = estimate_schedule(opt, cfg)
    seen = []
    for _ in range(cfg.steps):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    peft = [1e-2 * (1 - s / 8) for s in range(8)]
    # (s + 1) / W while s < W, then linear decay to 0 at `steps` over the remaining steps (schedules.lr_factor)
    masks = [2e-2 * f for f in (1 / 4, 2 / 4, 3 / 4, 1.0, 1.0, 3 / 4, 2 / 4, 1 / 4)]
    assert [s[0] for s in seen] == pytest.approx(peft)
    assert [s[1] for s in seen] == pytest.approx(masks) and [s[2] for s in seen] == pytest.approx(masks)
    assert mask_lrs(cfg) == pytest.approx(masks)
    off = EstimateConfig(steps=8, lr=1e-2, mask_lr_coef=2.0)
    assert mask_lrs(off) == pytest.approx([2 * x for x in peft])  # no warm-up: the reference's schedule


def test_movement_tracker_sums_the_absolute_steps():
    head, ffn = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(5))
    opt = torch.optim.SGD([head, ffn], lr=0.1)
    tracker = MovementTracker([head], [ffn])
    g = torch.Generator().manual_seed(0)
    path = [torch.cat([head.detach(), ffn.detach()]).clone()]
    for _ in range(6):
        for p in (head, ffn):
            p.grad = torch.randn(p.shape, generator=g)
        tracker.before_step()
        opt.step()
        tracker.after_step()
        path.append(torch.cat([head.detach(), ffn.detach()]).clone())
    expected = torch.stack(path).diff(dim=0).abs().sum(0).double()
    h, f = tracker.results()
    torch.testing.assert_close(torch.cat([h[0], f[0]]).double(), expected, rtol=1e-6, atol=1e-9)
    assert float(expected.sum()) > float((path[-1] - path[0]).abs().sum())  # a path, not the net displacement


def hand_loss(raw: dict, all_tokens: bool) -> float:
    """Cross-entropy of the base model on step 0's batch, over the label tokens or every real token."""
    recipe = recipe_from_dict(raw)
    cfg = recipe.estimate
    tok = load_tokenizer(recipe.model)
    batch = train_batches(recipe.data, tok, cfg.seq_len, cfg.batch_size, cfg.grad_accum, cfg.seed,
                          current()).batch_for_step(0)
    model = load_model(recipe.model.path).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    targets = batch["input_ids"] if all_tokens else batch["labels"]
    keep = batch["attention_mask"].bool() if all_tokens else batch["labels"] != -100
    keep = keep[:, 1:]
    return float(F.cross_entropy(logits[:, :-1][keep], targets[:, 1:][keep]))


@pytest.mark.parametrize("variant", ["reference", "variants"])
def test_one_step_estimate_loss_warmup_and_movement(tmp_path, variant):
    raw = tiny_recipe_dict(tmp_path)
    raw["estimate"].update(steps=1, l1=0.05)
    on = variant == "variants"
    if on:
        raw["estimate"].update(mask_warmup_steps=4, l1_per_mask=True, loss_on="all_tokens")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    assert main(["estimate", "--config", str(tmp_path / "r.yaml"), "--run-dir", str(run)]) == 0
    record = json.loads((run / "estimate" / "estimate.json").read_text())
    n = record["n_masks"]
    masks = load_scores(run / "estimate" / "scores.safetensors")
    assert n == sum(t.numel() for t in masks.head + masks.ffn)
    l1_term = 0.05 * (1.0 if on else n)  # every mask is 1 at step 0: mean|m| = 1, sum|m| = n
    assert record["losses"][0] == pytest.approx(hand_loss(raw, all_tokens=on) + l1_term, rel=1e-5)
    lr0 = 1e-2 * (0.25 if on else 1.0)  # estimate.lr 1e-2, mask_lr_coef 1; warm-up over 4 steps: 1/4 at step 0
    assert record["mask_lrs"] == pytest.approx([lr0])
    moved = torch.cat([(t - 1).abs() for t in masks.head + masks.ffn])
    # AdamW's first step is lr x g / (|g| + eps): the LR itself, a little less where |g| is within a few eps
    assert float(moved.max()) <= lr0 * (1 + 1e-4)  # (fp32 masks near 1: steps of 6e-8)
    torch.testing.assert_close(moved, torch.full_like(moved, lr0), rtol=1e-2, atol=0)
    movement = load_scores(run / "estimate" / "movement_scores.safetensors")
    torch.testing.assert_close(torch.cat(movement.head + movement.ffn), moved, rtol=1e-5, atol=1e-9)
    if not on:
        assert main(["plan", "--run-dir", str(run), "--prune.unit_scores=movement"]) == 0
        assert json.loads((run / "plan.json").read_text())["prune"]["unit_scores"] == "movement"


def test_quality_study_variant_rows_change_only_what_they_name(tmp_path):
    """The study's variant rows (benchmarks/quality/rows.py): `taylor` and `movement` plan from the seed's shared
    estimate (same estimate key) with their unit scores; the mask variants get an estimate of their own; the rounded
    row is the taylor row with prune.multiple_of and its own level ratios (solved under the rounding)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.quality.rows import ESTIMATE_VARIANTS, ROUNDED, Study, row_specs

    study = Study(tmp_path, tiny_recipe_dict(tmp_path))
    shared = estimate_key(study.recipe(0))
    specs = {m: (prune, train) for m, _, prune, train in
             row_specs({0.35: {"attn_ratio": 0.3, "ffn_ratio": 0.4}}, {"module_ratio": 0.5, "rank_ratio": 0.5},
                       {0.35: {"attn_ratio": 0.3, "ffn_ratio": 0.45}})}
    for method, extra in ROUNDED.items():
        recipe = study.recipe(0, prune=specs[method][0], train=specs[method][1])
        assert recipe.prune.multiple_of == extra["multiple_of"] > 1 and recipe.prune.unit_scores == "taylor"
        assert recipe.prune.ffn_ratio == 0.45 and recipe.prune.module_ratio == 0.5
        assert estimate_key(recipe) == shared
    for method in ("taylor", "movement"):
        recipe = study.recipe(0, prune=specs[method][0], train=specs[method][1])
        assert recipe.prune.unit_scores == method and estimate_key(recipe) == shared
    keys = {shared}
    for method, est in ESTIMATE_VARIANTS.items():
        recipe = study.recipe(0, prune=specs[method][0], train=specs[method][1], estimate=est)
        assert recipe.prune.unit_scores == "masks" and recipe.prune.random is False
        keys.add(estimate_key(recipe))
    assert len(keys) == 1 + len(ESTIMATE_VARIANTS)
    assert study.recipe(0, estimate=ESTIMATE_VARIANTS["masks_alltok"]).estimate.loss_on == "all_tokens"
