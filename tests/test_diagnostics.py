"""Specification of the report's score diagnostics (reporting/diagnostics.py, reporting/damage.py): the rank
correlation is Spearman's (ties averaged), the L1-floor share and the mask movement are exact on hand-made masks, an
older estimate record without its LR schedule gets the one it ran with, the report of a real tiny run carries the
section in summary.md and summary.json, and `--damage` reports the perplexity a direct computation gives for the
base model pruned by `lightpeft plan` + `lightpeft prune`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from lightpeft_dist.cli import main
from lightpeft_dist.config import recipe_from_dict
from lightpeft_dist.data.batches import encode_example, load_rows
from lightpeft_dist.models.loading import load_model, load_tokenizer
from lightpeft_dist.pruning.scores import Scores, load_scores
from lightpeft_dist.reporting.diagnostics import mask_lr_sum, mask_statistics, spearman
from conftest import tiny_recipe_dict


def test_spearman_is_pearson_on_average_ranks():
    a = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0])
    b = np.array([2.0, 7.0, 1.0, 8.0, 2.0, 8.0, 1.0, 8.0])
    ranks_a = np.array([4, 1.5, 5, 1.5, 6, 8, 3, 7])  # by hand: the two 1s share rank (1 + 2) / 2
    ranks_b = np.array([3.5, 5, 1.5, 7, 3.5, 7, 1.5, 7])
    assert spearman(a, b) == pytest.approx(np.corrcoef(ranks_a, ranks_b)[0, 1], abs=1e-12)
    x = np.random.default_rng(0).normal(size=50)
    y = x + np.random.default_rng(1).normal(size=50)
    rank = lambda v: np.argsort(np.argsort(v)).astype(float)  # noqa: E731 (no ties)
    assert spearman(torch.tensor(x), torch.tensor(y)) == pytest.approx(np.corrcoef(rank(x), rank(y))[0, 1])
    assert spearman(x, -x) == pytest.approx(-1.0) and spearman(x, np.ones(50)) is None


def test_floor_share_and_movement_are_exact_on_synthetic_masks():
    s = 0.01  # sum of the mask LRs: the floor is 0.99, "at it" within 2% of s = 0.0002
    head = [torch.tensor([0.99, 0.9901, 0.991, 1.005], dtype=torch.float64)]
    ffn = [torch.tensor([0.99, 1.0], dtype=torch.float64), torch.tensor([0.9950, 0.9902], dtype=torch.float64)]
    stats = mask_statistics(Scores(head=head, ffn=ffn), s)
    assert stats["floor"] == pytest.approx(0.99)
    assert stats["head"]["floor_share"] == 0.5  # 0.99 and 0.9901; 0.991 is 0.001 above
    assert stats["head"]["movement_mean"] == pytest.approx((1.0 + 0.99 + 0.9 + 0.5) / 4)
    assert stats["head"]["movement_max"] == pytest.approx(1.0)
    assert stats["ffn"]["floor_share"] == 0.5 and stats["ffn"]["layers"][0]["floor_share"] == 0.5
    assert stats["ffn"]["movement_mean"] == pytest.approx((1.0 + 0.0 + 0.5 + 0.98) / 4)
    assert stats["ffn"]["layers"][1]["movement_mean"] == pytest.approx((0.5 + 0.98) / 2)


def test_an_older_record_gets_the_schedule_it_ran_with():
    """Before `mask_lrs` was recorded every estimate decayed linearly from lr x mask_lr_coef without warm-up."""
    old = {"steps": 6, "recipe": {"estimate": {"steps": 6, "lr": 1e-2, "mask_lr_coef": 0.5}}}
    assert mask_lr_sum(old) == pytest.approx(0.5e-2 * sum(1 - s / 6 for s in range(6)))
    assert mask_lr_sum({"mask_lrs": [0.1, 0.2]}) == pytest.approx(0.3)


def direct_perplexity(model, raw: dict, seq_len: int) -> float:
    """exp(mean cross-entropy) over every token of the validation examples, one example at a time."""
    recipe = recipe_from_dict(raw)
    tok = load_tokenizer(recipe.model)
    total, n = 0.0, 0
    with torch.no_grad():
        for row in load_rows(recipe.data, "eval"):
            ids = torch.tensor([encode_example(row, recipe.data, tok, seq_len)["input_ids"]])
            logits = model(input_ids=ids).logits[0].double()
            total += float(F.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum"))
            n += ids.shape[1] - 1
    return float(np.exp(total / n))


def test_report_of_a_tiny_run_has_the_diagnostics_and_the_damage(tmp_path):
    raw = tiny_recipe_dict(tmp_path)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    assert main(["estimate", "--config", str(tmp_path / "r.yaml"), "--run-dir", str(run)]) == 0
    assert main(["report", "--run-dir", str(run)]) == 0
    md = (run / "report" / "summary.md").read_text()
    diag = json.loads((run / "report" / "summary.json").read_text())["diagnostics"]
    assert "## Score diagnostics" in md and "at the L1 floor" in md and "damage" not in diag
    assert diag["score_kinds"] == ["masks", "activation", "taylor", "movement", "salience"]
    scores = {k: load_scores(run / "estimate" / f) for k, f in
              (("masks", "scores.safetensors"), ("taylor", "taylor_scores.safetensors"))}
    ffn = [spearman(a, b) for a, b in zip(scores["masks"].ffn, scores["taylor"].ffn)]
    assert diag["rank_correlation"]["ffn"]["masks~taylor"] == pytest.approx(ffn)
    lr_sum = 1e-2 * sum(1 - s / 6 for s in range(6))  # the tiny recipe: lr 1e-2, 6 steps, linear decay
    assert diag["masks"]["mask_lr_sum"] == pytest.approx(lr_sum)
    moved = torch.cat([(t.double() - 1).abs() / lr_sum for t in scores["masks"].ffn])
    assert diag["masks"]["ffn"]["movement_mean"] == pytest.approx(float(moved.mean()))

    assert main(["report", "--run-dir", str(run), "--damage"]) == 0
    damage = json.loads((run / "report" / "summary.json").read_text())["diagnostics"]["damage"]
    assert [r["scores"] for r in damage["rows"]] == ["masks", "activation", "taylor", "movement", "salience", "random"]
    assert "validation split" in damage["text"] and "Perplexity of the pruned base" in \
        (run / "report" / "summary.md").read_text()
    seq_len = raw["estimate"]["seq_len"]
    assert damage["base"] == pytest.approx(direct_perplexity(load_model(raw["model"]["path"]), raw, seq_len),
                                           rel=1e-5)
    assert main(["plan", "--run-dir", str(run), "--prune.unit_scores=taylor"]) == 0
    assert main(["prune", "--run-dir", str(run)]) == 0
    pruned = direct_perplexity(load_model(str(run / "pruned_model")), raw, seq_len)
    taylor = next(r for r in damage["rows"] if r["scores"] == "taylor")
    assert taylor["perplexity"] == pytest.approx(pruned, rel=1e-5) and pruned != pytest.approx(damage["base"])
