"""Distillation from the unpruned base during fine-tuning (train.distill_weight): what the loss is, and that the
teacher really is the unpruned base model."""

import math

import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from dist_checks import run_stages
from lightpeft_dist.config import recipe_from_dict
from lightpeft_dist.training.distill import distill_kl
from lightpeft_dist.io_utils import read_json
from lightpeft_dist.pipeline.train import train_key


def test_distill_kl_is_temperature_scaled_kl_over_attended_tokens():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    t = 2.0
    kept = mask.bool()
    expected = F.kl_div(F.log_softmax(student[kept] / t, -1), F.log_softmax(teacher[kept] / t, -1),
                        log_target=True, reduction="batchmean") * t * t
    assert math.isclose(float(distill_kl(student, teacher, mask, t)), float(expected), rel_tol=1e-5)
    assert float(distill_kl(teacher, teacher, mask, t)) == 0.0
    # padded positions do not count, whatever their logits
    noisy = student.clone()
    noisy[0, 3:] = 100.0
    assert math.isclose(float(distill_kl(noisy, teacher, mask, t)), float(expected), rel_tol=1e-5)


def _recipe(tmp_path, tiny_recipe, prune: dict, train: dict):
    raw = {**tiny_recipe, "prune": {**tiny_recipe["prune"], **prune}, "train": {**tiny_recipe["train"], **train}}
    raw["peft"] = {**raw["peft"], "dropout": 0.0}
    path = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*')))}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_teacher_is_the_unpruned_base_and_distillation_changes_training(tmp_path, tiny_recipe):
    keep_all = {"attn_ratio": 0.0, "ffn_ratio": 0.0, "module_ratio": 0.0, "rank_ratio": 0.0}
    distil = {"distill_weight": 1.0, "distill_temperature": 2.0, "warm_start": False}
    # Nothing pruned and a fresh LoRA (B = 0): the student is the teacher, so the pure distillation loss starts at 0.
    same = tmp_path / "same"
    run_stages(same, "estimate", "plan", "prune", "train", config=_recipe(tmp_path, tiny_recipe, keep_all, distil))
    losses = read_json(same / "train" / "train.json")["losses"]
    assert abs(losses[0]) < 1e-6 and losses[-1] > 0  # then LoRA moves and the student departs a little
    assert read_json(same / "train" / "train.json")["distill"]["weight"] == 1.0

    # Pruned: the student differs from the teacher from the first step.
    pruned_cfg = _recipe(tmp_path, tiny_recipe, {}, distil)
    pruned = tmp_path / "pruned"
    run_stages(pruned, "estimate", "plan", "prune", "train", config=pruned_cfg)
    assert read_json(pruned / "train" / "train.json")["losses"][0] > 1e-3

    # Same pruned model without distillation: a different adapter, and a key that ignores the unused settings.
    plain_cfg = _recipe(tmp_path, tiny_recipe, {}, {"warm_start": False})
    run_stages(pruned, "train", config=plain_cfg)  # reuses estimate/plan/prune, retrains
    plain = load_file(pruned / "train" / "adapter" / "adapter_model.safetensors")
    run_stages(pruned, "train", config=pruned_cfg)
    distilled = load_file(pruned / "train" / "adapter" / "adapter_model.safetensors")
    assert max(float((plain[k] - distilled[k]).abs().max()) for k in plain) > 1e-4
    raw = yaml.safe_load(plain_cfg.read_text())
    off = recipe_from_dict({**raw, "train": {**raw["train"], "distill_temperature": 5.0}})
    assert train_key(off, pruned) == train_key(recipe_from_dict(raw), pruned)
